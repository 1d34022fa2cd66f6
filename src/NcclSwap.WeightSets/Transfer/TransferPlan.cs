using System.Text.Json;
using NcclSwap.DataPlane;

namespace NcclSwap.WeightSets;

/// <summary>
/// One part of a tensor that one or more destination ranks hold: part <see cref="Part"/> of <see cref="Parts"/>
/// along <see cref="SplitDimension"/> (whole when null), <see cref="Runs"/> contiguous runs of <see cref="RunBytes"/>
/// bytes, <see cref="Stride"/> bytes apart, from <see cref="Offset"/> of the tensor.
/// </summary>
public sealed record TensorPart(string Tensor, int Part, int Parts, int? SplitDimension, long Offset, long RunBytes, long Runs, long Stride)
{
    public long Bytes => RunBytes * Runs;

    /// <summary>The name its bytes go by in a bucket: the tensor's, with the part when it is cut.</summary>
    public string Key => Parts == 1 ? Tensor : $"{Tensor}#{Part}/{Parts}";
}

/// <summary>
/// Bytes one source sends to one set of destinations: a broadcast when the set holds several ranks, a send/receive
/// when it holds one; its parts packed into <see cref="Buckets"/>.
/// </summary>
public sealed record Transfer(int Source, IReadOnlyList<int> Destinations, IReadOnlyList<TensorPart> Parts, BucketPlan Buckets)
{
    public bool IsBroadcast => Destinations.Count > 1;

    public long Bytes => Parts.Sum(p => p.Bytes);

    /// <summary>What each destination receives: the parts' bytes plus the padding between them in buckets.</summary>
    public long ReceivedBytes => Buckets.Buckets.Sum(b => b.Bytes);

    /// <summary>Its parts by the name their bytes go by in the buckets (<see cref="TensorPart.Key"/>).</summary>
    internal IReadOnlyDictionary<string, TensorPart> ByKey { get; } = Parts.ToDictionary(p => p.Key, StringComparer.Ordinal);
}

/// <summary>
/// What each of <see cref="Sources"/> sources sends to each of <see cref="Destinations"/> tensor-parallel ranks so
/// that every rank receives exactly the parts of the tensors it holds (<see cref="ModelLayout"/>), and nothing else:
/// a part that several ranks hold is broadcast to them once, a part one rank holds is sent to it. Every source can
/// send every tensor (a trainer after its all-gather); parts are given to sources largest first, each to the source
/// with the fewest bytes so far (ties to the lowest rank), so the plan depends only on the layout and the three
/// numbers, and every process computes the same one, once per layout.
/// </summary>
public sealed class TransferPlan
{
    public const string Format = "nccl-swap-transfer-plan/1";

    private TransferPlan(ModelLayout layout, int sources, int destinations, long bucketBytes, IReadOnlyList<Transfer> transfers)
    {
        Layout = layout;
        Sources = sources;
        Destinations = destinations;
        BucketBytes = bucketBytes;
        Transfers = transfers;
    }

    public ModelLayout Layout { get; }

    public int Sources { get; }

    public int Destinations { get; }

    public long BucketBytes { get; }

    public IReadOnlyList<Transfer> Transfers { get; }

    /// <summary>What a broadcast of every byte to every destination would move: the model's bytes times the destinations.</summary>
    public long BroadcastBytes => checked(Layout.TotalBytes * Destinations);

    public static TransferPlan Create(ModelLayout layout, int sources, int destinations, long bucketBytes = 256L << 20)
    {
        if (sources < 1)
            throw new ArgumentOutOfRangeException(nameof(sources), $"{sources} sources: at least one is needed");
        if (destinations < 1)
            throw new ArgumentOutOfRangeException(nameof(destinations), $"{destinations} destinations: at least one is needed");
        var groups = new Dictionary<string, (int[] Ranks, List<TensorPart> Parts)>(StringComparer.Ordinal);
        foreach (LayoutTensor tensor in layout.Tensors)
            foreach ((TensorPart part, int[] ranks) in Cut(tensor, destinations))
            {
                string key = string.Join(',', ranks);
                if (!groups.TryGetValue(key, out var group))
                    groups[key] = group = (ranks, []);
                group.Parts.Add(part);
            }

        // Parts to sources, largest first, each to the least loaded (deterministic: ties by order and rank).
        var load = new long[sources];
        var assigned = new Dictionary<(int Source, string Destinations), List<TensorPart>>();
        var order = groups.SelectMany(g => g.Value.Parts.Select((p, i) => (Group: g.Key, Part: p, Index: i)))
            .OrderByDescending(x => x.Part.Bytes).ThenBy(x => x.Group, StringComparer.Ordinal).ThenBy(x => x.Index);
        foreach (var (group, part, _) in order)
        {
            int source = 0;
            for (int s = 1; s < sources; s++)
                if (load[s] < load[source])
                    source = s;
            load[source] += part.Bytes;
            if (!assigned.TryGetValue((source, group), out var parts))
                assigned[(source, group)] = parts = [];
            parts.Add(part);
        }

        var position = layout.Tensors.Select((t, i) => (t.Name, i)).ToDictionary(x => x.Name, x => x.i, StringComparer.Ordinal);
        var transfers = new List<Transfer>();
        foreach (var ((source, group), parts) in assigned.OrderBy(a => a.Key.Source).ThenBy(a => groups[a.Key.Destinations].Ranks[0]).ThenBy(a => a.Key.Destinations, StringComparer.Ordinal))
        {
            // Parts in layout order within a transfer, so that buckets follow the model.
            var ordered = parts.OrderBy(p => position[p.Tensor]).ThenBy(p => p.Part).ToList();
            BucketPlan buckets = BucketPlan.Create(ordered.Select(p => (p.Key, p.Bytes)), bucketBytes);
            transfers.Add(new Transfer(source, groups[group].Ranks, ordered, buckets));
        }
        return new TransferPlan(layout, sources, destinations, bucketBytes, transfers);
    }

    /// <summary>
    /// What destination <paramref name="destination"/> receives, as a plan of that one destination: the transfers that
    /// reach it, each with its parts and buckets as they are (so the same bytes in the same buckets), sent to it alone.
    /// One GPU of a tensor-parallel group, run on its own (a single-GPU machine, a benchmark of one rank's share).
    /// </summary>
    public TransferPlan ForDestination(int destination) => ForDestinations([destination]);

    /// <summary>
    /// What <paramref name="destinations"/> receive, as a plan whose destination i is <c>destinations[i]</c> here: the
    /// transfers that reach any of them, with their parts and buckets as they are, sent to those of them it reaches
    /// (a broadcast to fewer, or a send where one is left). Part of a tensor-parallel group on fewer GPUs than it has.
    /// </summary>
    public TransferPlan ForDestinations(IReadOnlyList<int> destinations)
    {
        ArgumentOutOfRangeException.ThrowIfZero(destinations.Count);
        foreach (int d in destinations)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(d);
            ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(d, Destinations);
        }
        if (destinations.Distinct().Count() != destinations.Count)
            throw new ArgumentException($"destinations {string.Join(", ", destinations)} name one twice", nameof(destinations));
        var transfers = Transfers
            .Select(t => t with { Destinations = destinations.Select((d, i) => (d, i)).Where(x => t.Destinations.Contains(x.d)).Select(x => x.i).ToArray() })
            .Where(t => t.Destinations.Count > 0).ToList();
        return new TransferPlan(Layout, Sources, destinations.Count, BucketBytes, transfers);
    }

    /// <summary>
    /// The parts of <paramref name="tensor"/> across <paramref name="ranks"/> ranks and who holds each: one part for
    /// all when it is replicated; else min(ranks, shards) parts, rank r holding part r / (ranks / parts).
    /// </summary>
    internal static IEnumerable<(TensorPart Part, int[] Ranks)> Cut(LayoutTensor tensor, int ranks)
    {
        if (tensor.SplitDimension is not int dimension)
        {
            yield return (new TensorPart(tensor.Name, 0, 1, null, 0, tensor.Bytes, 1, tensor.Bytes), Enumerable.Range(0, ranks).ToArray());
            yield break;
        }
        int parts = Math.Min(ranks, tensor.Shards ?? ranks);
        if (ranks % parts != 0)
            throw new LayoutException($"tensor '{tensor.Name}': {ranks} ranks cannot share its {parts} parts evenly");
        long size = tensor.Shape[dimension];
        if (size % parts != 0)
            throw new LayoutException($"tensor '{tensor.Name}': dimension {dimension} ({size}) does not divide into {parts} parts");
        long outer = tensor.Shape.Take(dimension).Aggregate(1L, (a, d) => checked(a * d));
        long inner = tensor.Shape.Skip(dimension + 1).Aggregate(1L, (a, d) => checked(a * d));
        long elementBits = tensor.Dtype.Bits;
        long stride = tensor.Dtype.ByteLength(checked(size * inner)) ?? throw new LayoutException($"tensor '{tensor.Name}': its rows do not fill whole bytes");
        long runBytes = tensor.Dtype.ByteLength(checked(size / parts * inner))
            ?? throw new LayoutException($"tensor '{tensor.Name}': a part's rows of {size / parts * inner * elementBits} bits do not fill whole bytes");
        int share = ranks / parts;
        for (int p = 0; p < parts; p++)
        {
            var part = new TensorPart(tensor.Name, p, parts, dimension, p * runBytes, runBytes, outer, stride);
            yield return (part, Enumerable.Range(p * share, share).ToArray());
        }
    }

    /// <summary>Where a source keeps the whole model: every tensor, packed in layout order.</summary>
    public RegionLayout SourceLayout() => RegionLayout.Packed(Layout.Tensors.Select(t => (t.Name, t.Dtype.Name, t.Shape)));

    /// <summary>
    /// Where destination <paramref name="rank"/> keeps what it holds: each tensor's part as a tensor of its own (the
    /// split dimension divided by the parts), packed in layout order. A part's bytes in a bucket are exactly that tensor's.
    /// </summary>
    public RegionLayout DestinationLayout(int rank)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rank);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(rank, Destinations);
        var held = new Dictionary<string, TensorPart>(StringComparer.Ordinal);
        foreach (Transfer t in Transfers)
            if (t.Destinations.Contains(rank))
                foreach (TensorPart part in t.Parts)
                    held[part.Tensor] = part;
        return RegionLayout.Packed(Layout.Tensors.Select(t =>
        {
            TensorPart part = held[t.Name];
            long[] shape = (long[])t.Shape.Clone();
            if (part.SplitDimension is int d)
                shape[d] /= part.Parts;
            return (t.Name, t.Dtype.Name, shape);
        }));
    }

    /// <summary>
    /// The copies that fill bucket <paramref name="bucket"/> of <paramref name="transfer"/> at a source laid out as
    /// <paramref name="source"/> (<see cref="SourceLayout"/>): From is in the source's region, To in the bucket. A part
    /// cut along a later dimension is one strided copy of its whole rows, plus a partial row where a piece starts or
    /// ends within one; a part whose rows are contiguous is one plain copy.
    /// </summary>
    public static List<StridedCopy> PackCopies(Transfer transfer, int bucket, RegionLayout source)
    {
        var copies = new List<StridedCopy>();
        foreach ((BucketPiece piece, TensorPart part) in PartPieces(transfer, bucket))
        {
            long tensorAt = source[part.Tensor].Offset + part.Offset;
            if (part.Stride == part.RunBytes || part.Runs == 1)
            {
                copies.Add(new StridedCopy(tensorAt + piece.TensorOffset, 0, piece.BucketOffset, 0, piece.Bytes, 1));
                continue;
            }
            long done = 0;
            while (done < piece.Bytes)
            {
                long at = piece.TensorOffset + done; // in the part's bytes
                long row = at / part.RunBytes, within = at % part.RunBytes;
                long rows = within == 0 ? (piece.Bytes - done) / part.RunBytes : 0;
                if (rows > 0)
                {
                    copies.Add(new StridedCopy(tensorAt + row * part.Stride, part.Stride, piece.BucketOffset + done, part.RunBytes, part.RunBytes, rows));
                    done += rows * part.RunBytes;
                    continue;
                }
                long take = Math.Min(part.RunBytes - within, piece.Bytes - done);
                copies.Add(new StridedCopy(tensorAt + row * part.Stride + within, 0, piece.BucketOffset + done, 0, take, 1));
                done += take;
            }
        }
        return copies;
    }

    /// <summary><see cref="PackCopies"/> as one contiguous run per row.</summary>
    public static List<CopyRun> PackRuns(Transfer transfer, int bucket, RegionLayout source) =>
        PackCopies(transfer, bucket, source).SelectMany(c => c.Runs()).ToList();

    /// <summary>The ranges of bucket <paramref name="bucket"/> that hold tensor bytes (one per piece), in bucket order: what a bucket's digest covers.</summary>
    public static List<(long Offset, long Length)> Pieces(Transfer transfer, int bucket) =>
        transfer.Buckets.Buckets[bucket].Pieces.Select(p => (p.BucketOffset, p.Bytes)).ToList();

    /// <summary>The ranges of bucket <paramref name="bucket"/> of <paramref name="transfer"/> no piece covers (alignment padding): a packer zeroes them, so that a bucket's bytes, and its digest, depend on the tensors alone.</summary>
    public static List<(long Offset, long Length)> Gaps(Transfer transfer, int bucket)
    {
        var gaps = new List<(long, long)>();
        long at = 0;
        Bucket b = transfer.Buckets.Buckets[bucket];
        foreach (BucketPiece piece in b.Pieces.OrderBy(p => p.BucketOffset))
        {
            if (piece.BucketOffset > at)
                gaps.Add((at, piece.BucketOffset - at));
            at = Math.Max(at, piece.BucketOffset + piece.Bytes);
        }
        if (b.Bytes > at)
            gaps.Add((at, b.Bytes - at));
        return gaps;
    }

    /// <summary>The copies that take bucket <paramref name="bucket"/> of <paramref name="transfer"/> apart at a destination laid out as <paramref name="destination"/> (<see cref="DestinationLayout"/>): From is in the bucket.</summary>
    public static List<CopyRun> UnpackRuns(Transfer transfer, int bucket, RegionLayout destination) =>
        PartPieces(transfer, bucket).Select(x => new CopyRun(x.Piece.BucketOffset, destination[x.Part.Tensor].Offset + x.Piece.TensorOffset, x.Piece.Bytes)).ToList();

    private static IEnumerable<(BucketPiece Piece, TensorPart Part)> PartPieces(Transfer transfer, int bucket) =>
        transfer.Buckets.Buckets[bucket].Pieces.Select(piece => (piece, transfer.ByKey[piece.Tensor]));

    /// <summary>Bytes each destination receives (parts plus bucket padding), by rank.</summary>
    public long[] ReceivedBytes() => PerDestination(t => t.ReceivedBytes);

    /// <summary>Bytes each destination needs (its parts, no padding), by rank.</summary>
    public long[] NeededBytes() => PerDestination(t => t.Bytes);

    private long[] PerDestination(Func<Transfer, long> bytesOf)
    {
        var bytes = new long[Destinations];
        foreach (Transfer t in Transfers)
            foreach (int rank in t.Destinations)
                bytes[rank] += bytesOf(t);
        return bytes;
    }

    /// <summary>Bytes each source sends once (a broadcast counted once), by rank.</summary>
    public long[] SentBytes()
    {
        var bytes = new long[Sources];
        foreach (Transfer t in Transfers)
            bytes[t.Source] += t.ReceivedBytes;
        return bytes;
    }

    /// <summary>
    /// The plan as JSON: the model, sources, destinations (each with <c>bytes</c> received and <c>needed</c>),
    /// <c>broadcast_bytes</c> (a broadcast of everything to every destination), and every transfer with its source,
    /// destinations, kind, bytes and buckets; with <paramref name="parts"/>, each transfer's parts too.
    /// </summary>
    public string ToJson(bool parts = false)
    {
        var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true }))
        {
            writer.WriteStartObject();
            writer.WriteString("format", Format);
            writer.WriteString("model", Layout.Model);
            writer.WriteNumber("tensors", Layout.Tensors.Count);
            writer.WriteNumber("model_bytes", Layout.TotalBytes);
            writer.WriteNumber("bucket_bytes", BucketBytes);
            writer.WriteNumber("broadcast_bytes", BroadcastBytes);
            writer.WriteNumber("broadcast_bytes_per_destination", Layout.TotalBytes);
            long[] received = ReceivedBytes(), needed = NeededBytes(), sent = SentBytes();
            writer.WriteStartArray("destinations");
            for (int r = 0; r < Destinations; r++)
            {
                writer.WriteStartObject();
                writer.WriteNumber("rank", r);
                writer.WriteNumber("bytes", received[r]);
                writer.WriteNumber("needed", needed[r]);
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
            writer.WriteStartArray("sources");
            for (int s = 0; s < Sources; s++)
            {
                writer.WriteStartObject();
                writer.WriteNumber("rank", s);
                writer.WriteNumber("bytes", sent[s]);
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
            writer.WriteStartArray("transfers");
            foreach (Transfer t in Transfers)
            {
                writer.WriteStartObject();
                writer.WriteNumber("source", t.Source);
                writer.WriteStartArray("destinations");
                foreach (int d in t.Destinations)
                    writer.WriteNumberValue(d);
                writer.WriteEndArray();
                writer.WriteString("kind", t.IsBroadcast ? "broadcast" : "send");
                writer.WriteNumber("bytes", t.Bytes);
                writer.WriteNumber("buckets", t.Buckets.Buckets.Count);
                writer.WriteNumber("bucket_bytes", t.ReceivedBytes);
                if (parts)
                {
                    writer.WriteStartArray("parts");
                    foreach (TensorPart p in t.Parts)
                    {
                        writer.WriteStartObject();
                        writer.WriteString("tensor", p.Tensor);
                        writer.WriteNumber("part", p.Part);
                        writer.WriteNumber("parts", p.Parts);
                        if (p.SplitDimension is int d)
                            writer.WriteNumber("split", d);
                        writer.WriteNumber("offset", p.Offset);
                        writer.WriteNumber("run_bytes", p.RunBytes);
                        writer.WriteNumber("runs", p.Runs);
                        writer.WriteNumber("stride", p.Stride);
                        writer.WriteEndObject();
                    }
                    writer.WriteEndArray();
                }
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
            writer.WriteEndObject();
        }
        return System.Text.Encoding.UTF8.GetString(stream.ToArray());
    }
}

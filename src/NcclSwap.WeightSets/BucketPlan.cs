using System.Text.Json;
using NcclSwap.DataPlane;

namespace NcclSwap.WeightSets;

/// <summary>A run of one tensor's bytes inside a bucket.</summary>
public sealed record BucketPiece(string Tensor, long TensorOffset, long BucketOffset, long Bytes);

/// <summary>One bucket: its used length, its pieces in offset order, and (once computed) the digest of its packed bytes.</summary>
public sealed record Bucket(int Index, long Bytes, IReadOnlyList<BucketPiece> Pieces, Digest? Digest = null);

/// <summary>
/// Tensors packed into buckets of at most <see cref="BucketBytes"/> bytes, each tensor starting at a
/// multiple of <see cref="Alignment"/>; a tensor that does not fit in what is left of a bucket starts the
/// next one, and a tensor larger than a bucket is split across as many as it needs. The plan depends only on
/// the tensors (names and sizes, in the order given) and the two sizes, so every process computes the same
/// plan; it serialises to JSON. With digests (<see cref="WithDigests"/>) one bad bucket can be re-sent alone
/// and buckets equal to the previous version's can be skipped (<see cref="ChangedBuckets"/>).
/// </summary>
public sealed class BucketPlan
{
    public const string Format = "nccl-swap-bucket-plan/1";

    private BucketPlan(long bucketBytes, int alignment, IReadOnlyList<(string Name, long Bytes)> tensors, IReadOnlyList<Bucket> buckets)
    {
        BucketBytes = bucketBytes;
        Alignment = alignment;
        Tensors = tensors;
        Buckets = buckets;
    }

    public long BucketBytes { get; }

    public int Alignment { get; }

    public IReadOnlyList<(string Name, long Bytes)> Tensors { get; }

    public IReadOnlyList<Bucket> Buckets { get; }

    public static BucketPlan Create(IEnumerable<(string Name, long Bytes)> tensors, long bucketBytes, int alignment = 256)
    {
        if (alignment <= 0 || (alignment & (alignment - 1)) != 0)
            throw new ArgumentException($"alignment {alignment} must be a power of two", nameof(alignment));
        if (bucketBytes <= 0 || bucketBytes % alignment != 0)
            throw new ArgumentException($"bucket size {bucketBytes} must be a positive multiple of the alignment {alignment}", nameof(bucketBytes));
        var list = tensors.ToList();
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var (name, bytes) in list)
        {
            if (!names.Add(name))
                throw new ArgumentException($"tensor '{name}' appears twice");
            if (bytes < 0)
                throw new ArgumentException($"tensor '{name}' has a negative size {bytes}");
        }

        var buckets = new List<List<BucketPiece>> { new() };
        long offset = 0;
        foreach (var (name, bytes) in list)
        {
            offset = Align(offset, alignment);
            if (offset > 0 && (offset >= bucketBytes || (offset + bytes > bucketBytes && bytes <= bucketBytes)))
            {
                buckets.Add([]);
                offset = 0;
            }
            long placed = 0;
            do
            {
                if (offset >= bucketBytes)
                {
                    buckets.Add([]);
                    offset = 0;
                }
                long take = Math.Min(bytes - placed, bucketBytes - offset);
                buckets[^1].Add(new BucketPiece(name, placed, offset, take));
                offset += take;
                placed += take;
            }
            while (placed < bytes);
        }
        return new BucketPlan(bucketBytes, alignment, list,
            buckets.Select((pieces, i) => new Bucket(i, pieces.Count == 0 ? 0 : pieces.Max(p => p.BucketOffset + p.Bytes), pieces)).ToList());
    }

    /// <summary>Writes bucket <paramref name="index"/>'s bytes into <paramref name="destination"/>: each piece from <paramref name="source"/> (the tensor's first byte), zeros between.</summary>
    public unsafe void Pack(int index, Func<string, nint> source, Span<byte> destination)
    {
        Bucket bucket = Buckets[index];
        if (destination.Length < bucket.Bytes)
            throw new ArgumentException($"bucket {index} needs {bucket.Bytes} bytes, the destination has {destination.Length}");
        destination[..(int)bucket.Bytes].Clear();
        foreach (BucketPiece piece in bucket.Pieces)
            new ReadOnlySpan<byte>((byte*)source(piece.Tensor) + piece.TensorOffset, (int)piece.Bytes)
                .CopyTo(destination.Slice((int)piece.BucketOffset, (int)piece.Bytes));
    }

    /// <summary>The same plan with every bucket's digest, from the tensors' bytes at <paramref name="source"/>.</summary>
    public BucketPlan WithDigests(Func<string, nint> source)
    {
        var buckets = new Bucket[Buckets.Count];
        Parallel.For(0, buckets.Length, () => new byte[checked((int)BucketBytes)], (i, _, scratch) =>
        {
            Pack(i, source, scratch);
            buckets[i] = Buckets[i] with { Digest = BlockDigest.Compute(scratch.AsSpan(0, (int)Buckets[i].Bytes)) };
            return scratch;
        }, _ => { });
        return new BucketPlan(BucketBytes, Alignment, Tensors, buckets);
    }

    /// <summary>Buckets whose digest differs from the same bucket of <paramref name="previous"/> (all of them if the layouts differ).</summary>
    public IEnumerable<int> ChangedBuckets(BucketPlan previous)
    {
        if (previous.BucketBytes != BucketBytes || previous.Alignment != Alignment || !previous.Tensors.SequenceEqual(Tensors))
            return Buckets.Select(b => b.Index);
        return Buckets.Where(b => b.Digest is null || previous.Buckets[b.Index].Digest != b.Digest).Select(b => b.Index);
    }

    public string ToJson()
    {
        var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true }))
        {
            writer.WriteStartObject();
            writer.WriteString("format", Format);
            writer.WriteNumber("bucket_bytes", BucketBytes);
            writer.WriteNumber("alignment", Alignment);
            writer.WriteStartArray("tensors");
            foreach (var (name, bytes) in Tensors)
            {
                writer.WriteStartObject();
                writer.WriteString("name", name);
                writer.WriteNumber("bytes", bytes);
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
            writer.WriteStartArray("buckets");
            foreach (Bucket bucket in Buckets)
            {
                writer.WriteStartObject();
                writer.WriteNumber("index", bucket.Index);
                writer.WriteNumber("bytes", bucket.Bytes);
                if (bucket.Digest is { } digest)
                    writer.WriteString("digest", digest.ToString());
                writer.WriteStartArray("pieces");
                foreach (BucketPiece piece in bucket.Pieces)
                {
                    writer.WriteStartObject();
                    writer.WriteString("tensor", piece.Tensor);
                    writer.WriteNumber("tensor_offset", piece.TensorOffset);
                    writer.WriteNumber("bucket_offset", piece.BucketOffset);
                    writer.WriteNumber("bytes", piece.Bytes);
                    writer.WriteEndObject();
                }
                writer.WriteEndArray();
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
            writer.WriteEndObject();
        }
        return System.Text.Encoding.UTF8.GetString(stream.ToArray());
    }

    /// <summary>Reads a plan back; the layout must be exactly the one <see cref="Create"/> computes for its tensors and sizes.</summary>
    public static BucketPlan FromJson(string json)
    {
        try
        {
            using JsonDocument document = JsonDocument.Parse(json);
            JsonElement root = document.RootElement;
            if (root.GetProperty("format").GetString() != Format)
                throw new FormatException($"not a bucket plan ({Format})");
            var tensors = root.GetProperty("tensors").EnumerateArray()
                .Select(t => (t.GetProperty("name").GetString()!, t.GetProperty("bytes").GetInt64())).ToList();
            BucketPlan plan = Create(tensors, root.GetProperty("bucket_bytes").GetInt64(), root.GetProperty("alignment").GetInt32());
            var buckets = root.GetProperty("buckets").EnumerateArray().ToList();
            if (buckets.Count != plan.Buckets.Count)
                throw new FormatException($"the plan lists {buckets.Count} buckets, but its tensors and sizes make {plan.Buckets.Count}");
            var withDigests = new List<Bucket>();
            foreach (var (element, expected) in buckets.Zip(plan.Buckets))
            {
                var pieces = element.GetProperty("pieces").EnumerateArray().Select(p => new BucketPiece(
                    p.GetProperty("tensor").GetString()!, p.GetProperty("tensor_offset").GetInt64(),
                    p.GetProperty("bucket_offset").GetInt64(), p.GetProperty("bytes").GetInt64())).ToList();
                if (element.GetProperty("index").GetInt32() != expected.Index || element.GetProperty("bytes").GetInt64() != expected.Bytes
                    || !pieces.SequenceEqual(expected.Pieces))
                    throw new FormatException($"bucket {expected.Index} differs from the layout its tensors and sizes make");
                Digest? digest = element.TryGetProperty("digest", out JsonElement d) ? Digest.Parse(d.GetString()!) : null;
                withDigests.Add(expected with { Digest = digest });
            }
            return new BucketPlan(plan.BucketBytes, plan.Alignment, plan.Tensors, withDigests);
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or ArgumentException)
        {
            throw new FormatException($"not a valid bucket plan: {e.Message}", e);
        }
    }

    private static long Align(long value, int alignment) => (value + alignment - 1) & ~(long)(alignment - 1);
}

using System.Runtime.CompilerServices;
using System.Buffers.Binary;
using System.IO.Hashing;
using System.Runtime.InteropServices;
using System.Text;
using NcclSwap.DataPlane;

namespace NcclSwap.WeightSets;

/// <summary>
/// What one rank did in a run of a <see cref="TransferPlan"/>. <see cref="Buckets"/> and <see cref="Bytes"/> count
/// deliveries: a bucket a source broadcasts to three destinations counts three; a destination counts what it received.
/// <see cref="Resent"/> counts buckets sent (or received) again after a bad digest, once each however many received them.
/// <see cref="Digests"/> holds the digest of every bucket of the rank's transfers as a source packed it (a source
/// keeps it, with <see cref="Tensors"/>, to skip what did not change next time).
/// </summary>
public sealed record TransferReport(int Rank, int Buckets, int Skipped, int Resent, long Bytes,
    IReadOnlyDictionary<(int Transfer, int Bucket), Digest> Digests, IReadOnlyDictionary<string, Digest>? Tensors = null)
{
    /// <summary>The version the sources sent (what source 0 passed to <see cref="PlanExecutor.Run(IDeviceBuffer?, IDeviceBuffer?, TransferReport?, ulong)"/>).</summary>
    public ulong Version { get; init; }

    /// <summary>Buckets this rank sent from its source region or received into its destination region in place, with no staging copy.</summary>
    public int InPlace { get; init; }

    /// <summary>
    /// Milliseconds by phase: meet (the first exchange, which waits until every rank has started this run: time spent
    /// waiting for slower peers, not moving), exchange (what destinations hold), decide (what moves), transfer, verify.
    /// </summary>
    public IReadOnlyDictionary<string, double> Phases { get; init; } = new Dictionary<string, double>();
}

/// <summary>Which rank of the collective plays each source and each destination of a plan; a rank may be one source and one destination at once.</summary>
public sealed record PlanRanks(IReadOnlyList<int> Sources, IReadOnlyList<int> Destinations)
{
    /// <summary>Sources on ranks 0..N-1, destinations on N..N+M-1.</summary>
    public static PlanRanks Separate(TransferPlan plan) =>
        new(Enumerable.Range(0, plan.Sources).ToArray(), Enumerable.Range(plan.Sources, plan.Destinations).ToArray());

    public int Size => Sources.Concat(Destinations).Max() + 1;

    internal void Check(TransferPlan plan, int size)
    {
        if (Sources.Count != plan.Sources || Destinations.Count != plan.Destinations)
            throw new ArgumentException($"the ranks name {Sources.Count} sources and {Destinations.Count} destinations; the plan has {plan.Sources} and {plan.Destinations}");
        foreach (int rank in Sources.Concat(Destinations))
            if ((uint)rank >= (uint)size)
                throw new ArgumentException($"rank {rank} is not a rank of the collective of {size}");
        if (Sources.Distinct().Count() != Sources.Count || Destinations.Distinct().Count() != Destinations.Count)
            throw new ArgumentException("a rank plays at most one source and one destination");
    }
}

/// <summary>
/// Runs a <see cref="TransferPlan"/> over a collective, every rank calling <see cref="Run(IDeviceBuffer?, IDeviceBuffer?, TransferReport?, ulong)"/>
/// with the same plan and <see cref="PlanRanks"/>.
/// <para>
/// First the ranks exchange, in all-gathers, a fingerprint of the plan (a rank with another plan is named and
/// refused) and what each destination holds now: the digest of every bucket's pieces as they lie in its region. A
/// source skips a bucket when every tensor in it has the digest the source sent last time and every destination of it
/// holds what was sent then (frozen layers cost nothing); a second all-gather tells every rank which buckets come.
/// </para>
/// <para>
/// Then the transfers run in plan order (so no cycle of waits can form), each bucket by bucket through two staging
/// buffers per rank: a source packs and digests bucket i+1 while bucket i is on the wire, a destination unpacks bucket
/// i into its region, with the copy that digests what it reads (<see cref="IBackend.CopyAndDigest"/>), while bucket
/// i+1 arrives. A bucket several destinations need is one broadcast on a collective of those ranks
/// (<see cref="ICollective.Subset"/>, made once and kept), one destination's a send and receive (to itself, in a
/// group, when source and destination share a rank). Every wait has the collective's deadline. Layouts, copies and
/// staging are made on the first run and kept: the plan is computed once per layout and reused every version.
/// </para>
/// <para>
/// After all the transfers a third all-gather compares the digest of each bucket as packed with the digest of what
/// each destination read from it; a bucket that differs anywhere is sent again alone, at most <see cref="Resends"/>
/// times, then the run fails naming the bucket and the destination on every rank. A destination writes into its
/// region as buckets arrive, so a failed run leaves it partly written: give it a staging copy, not what an engine
/// serves. Failures of the collective (a dead or stalled peer) end the run with its <see cref="CollectiveException"/>.
/// </para>
/// </summary>
public sealed class PlanExecutor : IDisposable
{
    private readonly IBackend _backend;
    private readonly ICollective _collective;
    private readonly int[] _bucketBase;
    private readonly int _bucketCount;
    private readonly ulong _fingerprint;
    private ICollective?[]? _links;
    private readonly List<ICollective> _owned = [];
    private RegionLayout? _sourceLayout, _destinationLayout;
    private BucketWork[][]? _work;
    private Pipeline? _pipe;
    private int _inPlace;
    private readonly Dictionary<string, long> _spent = [];

    /// <summary>Adds the time since <paramref name="since"/> to the transfer's part <paramref name="part"/>; returns now.</summary>
    private long Spend(string part, long since)
    {
        long now = System.Diagnostics.Stopwatch.GetTimestamp();
        _spent[part] = _spent.GetValueOrDefault(part) + (now - since);
        return now;
    }

    public PlanExecutor(TransferPlan plan, IBackend backend, ICollective collective, PlanRanks? ranks = null)
    {
        Plan = plan;
        _backend = backend;
        _collective = collective;
        Ranks = ranks ?? PlanRanks.Separate(plan);
        Ranks.Check(plan, collective.Size);
        _bucketBase = new int[plan.Transfers.Count];
        for (int t = 0; t < plan.Transfers.Count; t++)
        {
            _bucketBase[t] = _bucketCount;
            _bucketCount += plan.Transfers[t].Buckets.Buckets.Count;
        }
        _fingerprint = XxHash64.HashToUInt64(Encoding.UTF8.GetBytes(plan.ToJson() + string.Join(',', Ranks.Sources) + ";" + string.Join(',', Ranks.Destinations)));
    }

    public int Resends { get; init; } = 2;

    /// <summary>
    /// Whether to look for buckets that need not move (on by default). It costs a read of every tensor a source sends
    /// parts of and of every destination's region per run; where every tensor changes every version (full
    /// fine-tuning) it finds nothing, and turning it off saves those reads.
    /// </summary>
    public bool SkipUnchanged { get; init; } = true;

    /// <summary>
    /// Whether a bucket whose pieces lie in a region exactly as in the bucket (a run of whole tensors packed alike) is
    /// sent from the source's region, or received into the destination's, with no staging copy (on by default). Turn
    /// it off for regions in host memory, which should reach the wire through device staging.
    /// </summary>
    public bool InPlace { get; init; } = true;

    public TransferPlan Plan { get; }

    public PlanRanks Ranks { get; }

    /// <summary>Told after each transfer this rank takes part in: its index, the buckets moved, and the bytes.</summary>
    public Action<int, int, long>? TransferDone { get; init; }

    private int Me => _collective.Rank;

    private int SourceOf(int rank) => IndexOf(Ranks.Sources, rank);

    private int DestinationOf(int rank) => IndexOf(Ranks.Destinations, rank);

    private static int IndexOf(IReadOnlyList<int> ranks, int rank)
    {
        for (int i = 0; i < ranks.Count; i++)
            if (ranks[i] == rank)
                return i;
        return -1;
    }

    /// <summary>For a rank that is a source or a destination (not both): <paramref name="region"/> is what it sends from or receives into.</summary>
    public TransferReport Run(IDeviceBuffer region, TransferReport? previous = null, ulong version = 0)
    {
        bool source = SourceOf(Me) >= 0, destination = DestinationOf(Me) >= 0;
        if (source && destination)
            throw new ArgumentException($"rank {Me} is a source and a destination: pass both regions");
        return Run(source ? region : null, destination ? region : null, previous, version);
    }

    /// <summary>
    /// One run. <paramref name="source"/> is this rank's region as a source (laid out as <see cref="TransferPlan.SourceLayout"/>,
    /// unchanged until the run ends), <paramref name="destination"/> its region as a destination (<see cref="TransferPlan.DestinationLayout"/>);
    /// null for a role the rank does not play. <paramref name="previous"/> is this rank's report of its last good run.
    /// Sources pass the <paramref name="version"/> they send (all the same one); every rank's report carries it.
    /// </summary>
    public TransferReport Run(IDeviceBuffer? source, IDeviceBuffer? destination, TransferReport? previous = null, ulong version = 0)
    {
        int mySource = SourceOf(Me), myDestination = DestinationOf(Me);
        if (_work is null)
        {
            // Once per plan: the layouts, and every bucket's copies and digest ranges for this rank's roles.
            _sourceLayout = mySource >= 0 ? Plan.SourceLayout() : null;
            _destinationLayout = myDestination >= 0 ? Plan.DestinationLayout(myDestination) : null;
            _work = Plan.Transfers.Select(t => Enumerable.Range(0, t.Buckets.Buckets.Count).Select(b => BucketWork.Make(t, b,
                t.Source == mySource ? _sourceLayout : null,
                myDestination >= 0 && t.Destinations.Contains(myDestination) ? _destinationLayout : null, InPlace)).ToArray()).ToArray();
        }
        RegionLayout? sourceLayout = _sourceLayout, destinationLayout = _destinationLayout;
        CheckRegion(source, sourceLayout, "source");
        CheckRegion(destination, destinationLayout, "destination");
        _links ??= MakeLinks();
        var phases = new Dictionary<string, double>();
        var phase = System.Diagnostics.Stopwatch.StartNew();
        void Lap(string name)
        {
            phases[name] = phases.GetValueOrDefault(name) + phase.Elapsed.TotalMilliseconds;
            phase.Restart();
        }

        // Which plan each rank runs (a fixed size, so that ranks with other plans meet here), then what each destination holds now.
        ulong[][] plans = AllGather([_fingerprint, mySource >= 0 ? version : 0]);
        for (int rank = 0; rank < plans.Length; rank++)
            if (plans[rank][0] != _fingerprint)
                throw new InvalidOperationException($"rank {rank} runs another transfer plan or rank assignment than rank {Me} (fingerprint {plans[rank][0]:x16}, here {_fingerprint:x16})");
        ulong sentVersion = plans[Ranks.Sources[0]][1];
        foreach (int rank in Ranks.Sources)
            if (plans[rank][1] != sentVersion)
                throw new InvalidOperationException($"the sources send different versions: rank {Ranks.Sources[0]} version {sentVersion}, rank {rank} version {plans[rank][1]}");
        Lap("meet");
        var mine = new ulong[1 + _bucketCount];
        if (destination is not null && SkipUnchanged)
            foreach (var (t, b, digest) in RegionDigests(destination, destinationLayout!, MyBuckets(myDestination, asSource: false)))
                mine[1 + _bucketBase[t] + b] = digest.Value;
        ulong[][] held = AllGather(mine);
        Lap("exchange");

        // Which buckets move: a source decides for its transfers, everyone learns it.
        Dictionary<string, Digest>? tensors = source is null || !SkipUnchanged ? null : TensorDigests(source, sourceLayout!, mySource);
        var decide = new ulong[_bucketCount];
        var digests = new Dictionary<(int, int), Digest>();
        int skipped = 0;
        if (source is not null)
            foreach ((int t, int b) in MyBuckets(mySource, asSource: true))
            {
                bool skip = tensors is not null && Unchanged(t, b, previous, tensors, held);
                decide[_bucketBase[t] + b] = skip ? 0ul : 1ul;
                if (skip)
                {
                    digests[(t, b)] = previous!.Digests[(t, b)];
                    skipped += Plan.Transfers[t].Destinations.Count;
                }
            }
        ulong[][] decided = AllGather(decide);
        var work = new List<(int Transfer, int Bucket)>();
        for (int t = 0; t < Plan.Transfers.Count; t++)
            for (int b = 0; b < Plan.Transfers[t].Buckets.Buckets.Count; b++)
                if (decided[Ranks.Sources[Plan.Transfers[t].Source]][_bucketBase[t] + b] != 0)
                    work.Add((t, b));
        if (destination is not null && source is null)
            skipped = MyBuckets(myDestination, asSource: false).Count() - work.Count(w => Plan.Transfers[w.Transfer].Destinations.Contains(myDestination));
        Lap("decide");

        long largest = Plan.Transfers.SelectMany(t => t.Buckets.Buckets).Select(b => b.Bytes).DefaultIfEmpty(1).Max();
        Pipeline pipe = _pipe ??= new Pipeline(_backend, Math.Max(largest, 1), mySource >= 0, myDestination >= 0);
        int buckets = 0, resent = 0;
        long bytes = 0;
        _inPlace = 0;
        _spent.Clear();
        for (int pass = 0; ; pass++)
        {
            var packed = new ulong[_bucketCount];
            var arrived = new ulong[_bucketCount];
            var packedAt = new List<(int Index, int First, int Count)>();
            var arrivedAt = new List<(int Index, int First, int Count)>();
            for (int t = 0; t < Plan.Transfers.Count; t++)
            {
                Transfer transfer = Plan.Transfers[t];
                bool sends = transfer.Source == mySource, receives = myDestination >= 0 && transfer.Destinations.Contains(myDestination);
                List<int> these = work.Where(w => w.Transfer == t).Select(w => w.Bucket).ToList();
                if ((!sends && !receives) || these.Count == 0)
                    continue;
                long moved = RunTransfer(t, these, pipe, sends ? source : null, receives ? destination : null, packedAt, arrivedAt);
                int count = sends ? these.Count * transfer.Destinations.Count : these.Count;
                buckets += count;
                bytes += sends ? moved * transfer.Destinations.Count : moved;
                if (pass > 0)
                    resent += these.Count;
                TransferDone?.Invoke(t, count, moved);
            }

            // Every bucket's digests, as packed and as unpacked, from the queues at once.
            long collecting = System.Diagnostics.Stopwatch.GetTimestamp();
            Digest[] asPacked = pipe.PackDigests?.Collect() ?? [], asUnpacked = pipe.UnpackDigests?.Collect() ?? [];
            foreach (var (index, first, count) in packedAt)
                packed[index] = Fold(asPacked.AsSpan(first, count)).Value;
            foreach (var (index, first, count) in arrivedAt)
                arrived[index] = Fold(asUnpacked.AsSpan(first, count)).Value;
            Spend("collect digests", collecting);
            Lap("transfer");

            // Compare what was packed with what each destination read as it unpacked.
            var check = new ulong[2 * _bucketCount];
            packed.CopyTo(check, 0);
            arrived.CopyTo(check, _bucketCount);
            ulong[][] checks = AllGather(check);
            Lap("verify");
            var bad = new List<(int Transfer, int Bucket, int Destination)>();
            foreach ((int t, int b) in work)
            {
                Transfer transfer = Plan.Transfers[t];
                ulong sent = checks[Ranks.Sources[transfer.Source]][_bucketBase[t] + b];
                if (transfer.Source == mySource)
                    digests[(t, b)] = new Digest(sent);
                foreach (int d in transfer.Destinations)
                    if (checks[Ranks.Destinations[d]][_bucketCount + _bucketBase[t] + b] != sent)
                        bad.Add((t, b, d));
            }
            if (bad.Count == 0)
                break;
            if (pass == Resends)
            {
                var (t, b, d) = bad[0];
                throw new InvalidDataException(
                    $"bucket {b} of transfer {t} still arrives wrong at destination {d} (rank {Ranks.Destinations[d]}) after {Resends} re-send(s)" +
                    (bad.Count > 1 ? $"; {bad.Count - 1} more bucket deliveries are wrong too" : ""));
            }
            work = bad.Select(x => (x.Transfer, x.Bucket)).Distinct().ToList();
        }
        // Within "transfer": where the host's time went (waits for the wire included in "wait").
        foreach (var (part, ticks) in _spent)
            phases[$"transfer: {part}"] = ticks * 1000.0 / System.Diagnostics.Stopwatch.Frequency;
        return new TransferReport(Me, buckets, skipped, resent, bytes, digests, tensors) { Phases = phases, Version = sentVersion, InPlace = _inPlace };
    }

    /// <summary>
    /// The buckets of transfer <paramref name="t"/> in <paramref name="buckets"/>, through the pipeline; returns the
    /// bytes moved (once). Nothing here waits for a digest: a source enqueues each bucket's digest as packed on its pack
    /// stream (after the copy the wire waits for), a destination the copy out of staging that digests what it reads on
    /// its unpack stream (after the bucket has arrived); <paramref name="packed"/> and <paramref name="arrived"/> get
    /// where each bucket's digests are in the queues, collected once the pass is done. The host waits only before it
    /// reuses a slot: for the wire to have sent the bucket two before.
    /// </summary>
    private long RunTransfer(int t, List<int> buckets, Pipeline pipe, IDeviceBuffer? source, IDeviceBuffer? destination,
        List<(int Index, int First, int Count)> packed, List<(int Index, int First, int Count)> arrived)
    {
        Transfer transfer = Plan.Transfers[t];
        BucketWork[] work = _work![t];
        ICollective link = _links![t] ?? throw new InvalidOperationException($"rank {Me} has no link for transfer {t}");
        bool broadcast = transfer.IsBroadcast, sends = source is not null, receives = destination is not null;
        int sourceRank = Ranks.Sources[transfer.Source];
        // In a broadcast's collective the source is rank 0; otherwise the link is the whole collective.
        int? waitOn = broadcast ? (sends ? null : 0) : sends ? Ranks.Destinations[transfer.Destinations[0]] : sourceRank;
        long moved = 0;

        for (int i = 0; i < buckets.Count; i++)
        {
            int slot = i % 2, b = buckets[i], index = _bucketBase[t] + b;
            BucketWork w = work[b];
            long at = System.Diagnostics.Stopwatch.GetTimestamp();
            if (i >= 2)
                link.Wait(pipe.Moved[slot], waitOn, $"bucket {buckets[i - 2]} of transfer {t}");
            at = Spend("wait", at);
            // Where this bucket's bytes leave from and arrive at: a region in place, or a staging bucket.
            (IDeviceBuffer Buffer, long At) outgoing = default, incoming = default;
            if (sends)
            {
                if (w.SourceAt is long from)
                {
                    _inPlace++;
                    outgoing = (source!, from);
                    packed.Add((index, pipe.PackDigests!.Digest(source!, w.Pieces.Select(p => (from + p.Offset - w.SpanStart, p.Length)).ToList()), w.Pieces.Count));
                }
                else
                {
                    IDeviceBuffer bucket = pipe.Out[slot]!;
                    pipe.Pack.Wait(pipe.Unpacked[slot]); // a broadcast's root that receives too copies out of this slot
                    foreach ((long offset, long gap) in w.Gaps)
                        pipe.Pack.FillAsync(bucket, offset, gap, 0);
                    pipe.Pack.CopyAsync(bucket, source!, w.Pack);
                    pipe.Pack.Record(pipe.Packed[slot]);
                    pipe.Wire.Wait(pipe.Packed[slot]);
                    packed.Add((index, pipe.PackDigests!.Digest(bucket, w.Pieces), w.Pieces.Count));
                    outgoing = (bucket, w.SpanStart);
                }
            }
            at = Spend("pack and digest", at);
            if (receives && !(broadcast && sends))
            {
                incoming = w.DestinationAt is long to ? (destination!, to) : (pipe.In[slot]!, w.SpanStart);
                if (w.DestinationAt is null)
                    pipe.Wire.Wait(pipe.Unpacked[slot]); // the bucket two before has been copied out of this slot
                else
                    _inPlace++;
            }
            using (link.Group())
            {
                if (broadcast)
                {
                    (IDeviceBuffer buffer, long offset) = sends ? outgoing : incoming;
                    link.Broadcast(buffer, offset, w.SpanLength, 0, pipe.Wire);
                }
                else
                {
                    if (sends)
                        link.Send(outgoing.Buffer!, outgoing.At, w.SpanLength, Ranks.Destinations[transfer.Destinations[0]], pipe.Wire);
                    if (receives)
                        link.Receive(incoming.Buffer!, incoming.At, w.SpanLength, sourceRank, pipe.Wire);
                }
            }
            pipe.Wire.Record(pipe.Moved[slot]);
            at = Spend("issue", at);
            moved += w.SpanLength;
            if (!receives)
                continue;
            // Once it has arrived: the copy out of staging that digests what it reads, or the digest where it landed.
            pipe.Unpack.Wait(pipe.Moved[slot]);
            IDigestQueue queue = pipe.UnpackDigests!;
            if (broadcast && sends) // the root of a broadcast it also receives: its copy comes from what it sent
                arrived.Add((index, w.SourceAt is long from
                    ? queue.CopyAndDigest(destination!, source!, w.Unpack.Select(r => r with { From = from + r.From - w.SpanStart }).ToList())
                    : queue.CopyAndDigest(destination!, pipe.Out[slot]!, w.Unpack), w.Unpack.Count));
            else if (w.DestinationAt is long to)
                arrived.Add((index, queue.Digest(destination!, w.Pieces.Select(p => (to + p.Offset - w.SpanStart, p.Length)).ToList()), w.Pieces.Count));
            else
                arrived.Add((index, queue.CopyAndDigest(destination!, pipe.In[slot]!, w.Unpack), w.Unpack.Count));
            pipe.Unpack.Record(pipe.Unpacked[slot]);
            Spend("unpack and digest", at);
        }
        for (int i = Math.Max(0, buckets.Count - 2); i < buckets.Count; i++)
            link.Wait(pipe.Moved[i % 2], waitOn, $"bucket {buckets[i]} of transfer {t}");
        return moved;
    }

    /// <summary>True when a source may skip bucket b of transfer t: its tensors are as last sent and every destination holds what was sent.</summary>
    private bool Unchanged(int t, int b, TransferReport? previous, Dictionary<string, Digest> tensors, ulong[][] held)
    {
        if (previous?.Tensors is null || !previous.Digests.TryGetValue((t, b), out Digest last))
            return false;
        Transfer transfer = Plan.Transfers[t];
        foreach (BucketPiece piece in transfer.Buckets.Buckets[b].Pieces)
        {
            string tensor = transfer.ByKey[piece.Tensor].Tensor;
            if (!previous.Tensors.TryGetValue(tensor, out Digest before) || before != tensors[tensor])
                return false;
        }
        return transfer.Destinations.All(d => held[Ranks.Destinations[d]][1 + _bucketBase[t] + b] == last.Value);
    }

    /// <summary>The (transfer, bucket) pairs a source sends or a destination receives.</summary>
    private IEnumerable<(int Transfer, int Bucket)> MyBuckets(int role, bool asSource)
    {
        for (int t = 0; t < Plan.Transfers.Count; t++)
        {
            Transfer transfer = Plan.Transfers[t];
            if (asSource ? transfer.Source == role : transfer.Destinations.Contains(role))
                for (int b = 0; b < transfer.Buckets.Buckets.Count; b++)
                    yield return (t, b);
        }
    }

    /// <summary>The digest of each bucket's pieces as they lie in a destination's region, in one batch.</summary>
    private List<(int Transfer, int Bucket, Digest Digest)> RegionDigests(IDeviceBuffer region, RegionLayout layout, IEnumerable<(int Transfer, int Bucket)> buckets)
    {
        var which = buckets.ToList();
        var ranges = new List<(long Offset, long Length)>();
        var counts = new List<int>(which.Count);
        foreach ((int t, int b) in which)
        {
            List<CopyRun> runs = _work![t][b].Unpack;
            ranges.AddRange(runs.Select(r => (r.To, r.Bytes)));
            counts.Add(runs.Count);
        }
        Digest[] all = ranges.Count == 0 ? [] : _backend.Digests(region, ranges);
        var result = new List<(int, int, Digest)>(which.Count);
        int at = 0;
        for (int i = 0; i < which.Count; i++)
        {
            result.Add((which[i].Transfer, which[i].Bucket, Fold(all.AsSpan(at, counts[i]))));
            at += counts[i];
        }
        return result;
    }

    /// <summary>The digest of every whole tensor a source sends, in one batch.</summary>
    private Dictionary<string, Digest> TensorDigests(IDeviceBuffer region, RegionLayout layout, int source)
    {
        var names = Plan.Transfers.Where(t => t.Source == source).SelectMany(t => t.Parts).Select(p => p.Tensor).Distinct().ToList();
        Digest[] digests = names.Count == 0 ? [] : _backend.Digests(region, names.Select(n => (layout[n].Offset, layout[n].Bytes)).ToList());
        return names.Select((n, i) => (n, digests[i])).ToDictionary(x => x.n, x => x.Item2, StringComparer.Ordinal);
    }

    /// <summary>One digest for a bucket: XXH64 of its pieces' digests in order.</summary>
    private static Digest Fold(ReadOnlySpan<Digest> pieces) => new(XxHash64.HashToUInt64(MemoryMarshal.AsBytes(pieces)));

    /// <summary>Every rank's <paramref name="mine"/>, by rank, through the collective's all-gather (buffers kept for the next run).</summary>
    private ulong[][] AllGather(ulong[] mine)
    {
        int size = _collective.Size;
        long bytes = (long)mine.Length * sizeof(ulong);
        Exchange exchange = _exchange is { } kept && kept.Bytes >= bytes ? kept : Replace(new Exchange(_backend, Math.Max(bytes, 2L * (1 + _bucketCount) * sizeof(ulong)), size));
        _backend.Upload(MemoryMarshal.AsBytes(mine.AsSpan()), exchange.Send);
        using (_collective.Group())
            _collective.AllGather(exchange.Send, 0, exchange.All, 0, bytes, exchange.Stream);
        exchange.Stream.Record(exchange.Done);
        _collective.Wait(exchange.Done, null, "the exchange of bucket digests");
        byte[] gathered = new byte[bytes * size];
        _backend.Download(exchange.All, 0, gathered);
        return Enumerable.Range(0, size).Select(r => MemoryMarshal.Cast<byte, ulong>(gathered.AsSpan((int)(r * bytes), (int)bytes)).ToArray()).ToArray();

        Exchange Replace(Exchange made)
        {
            _exchange?.Dispose();
            return _exchange = made;
        }
    }

    private Exchange? _exchange;

    /// <summary>Buffers, stream and event of the all-gathers: each rank's record, and every rank's.</summary>
    private sealed class Exchange(IBackend backend, long bytes, int size) : IDisposable
    {
        public long Bytes { get; } = bytes;

        public IDeviceBuffer Send { get; } = backend.Allocate(bytes);

        public IDeviceBuffer All { get; } = backend.Allocate(bytes * size);

        public ICopyStream Stream { get; } = backend.CreateStream();

        public IDeviceEvent Done { get; } = backend.CreateEvent();

        public void Dispose()
        {
            Send.Dispose();
            All.Dispose();
            Stream.Dispose();
            Done.Dispose();
        }
    }

    /// <summary>
    /// The collective each transfer runs on: the whole one for a send, a subset of the source and its destinations for
    /// a broadcast (one per distinct set, made by every rank in plan order); null where this rank takes no part.
    /// </summary>
    private ICollective?[] MakeLinks()
    {
        var links = new ICollective?[Plan.Transfers.Count];
        var made = new Dictionary<string, ICollective?>(StringComparer.Ordinal);
        for (int t = 0; t < Plan.Transfers.Count; t++)
        {
            Transfer transfer = Plan.Transfers[t];
            if (!transfer.IsBroadcast)
            {
                links[t] = _collective;
                continue;
            }
            int root = Ranks.Sources[transfer.Source];
            int[] members = [root, .. transfer.Destinations.Select(d => Ranks.Destinations[d]).Where(r => r != root)];
            string key = string.Join(',', members);
            if (!made.TryGetValue(key, out ICollective? link))
            {
                made[key] = link = _collective.Subset(members);
                if (link is not null)
                    _owned.Add(link);
            }
            links[t] = link;
        }
        return links;
    }

    private void CheckRegion(IDeviceBuffer? region, RegionLayout? layout, string role)
    {
        if (layout is null && region is not null)
            throw new ArgumentException($"rank {Me} is not a {role} of the plan, but was given a {role} region");
        if (layout is not null && region is null)
            throw new ArgumentException($"rank {Me} is a {role} of the plan and needs a {role} region of {layout.Length} bytes");
        if (layout is not null && region!.Length < layout.Length)
            throw new ArgumentException($"the {role} region holds {region.Length} bytes; rank {Me} needs {layout.Length}");
    }

    public void Dispose()
    {
        _pipe?.Dispose();
        _pipe = null;
        _exchange?.Dispose();
        _exchange = null;
        foreach (ICollective link in _owned)
            link.Dispose();
        _owned.Clear();
    }

    /// <summary>What this rank does with one bucket, worked out once per plan: its bytes, its pieces (what its digest covers), and the copies that fill and empty it.</summary>
    /// <summary>
    /// What this rank does with one bucket, worked out once per plan: its pieces (what its digest covers) and the span
    /// of the bucket they fill (what travels), the copies that fill and empty it, and, where its pieces lie in this
    /// rank's source or destination region exactly as in the bucket, the region offset of the span (then no copy).
    /// </summary>
    private sealed record BucketWork(List<(long Offset, long Length)> Pieces, long SpanStart, long SpanLength, List<(long Offset, long Length)> Gaps,
        List<StridedCopy> Pack, List<CopyRun> Unpack, long? SourceAt, long? DestinationAt)
    {
        public static BucketWork Make(Transfer transfer, int bucket, RegionLayout? source, RegionLayout? destination, bool inPlace)
        {
            List<(long Offset, long Length)> pieces = TransferPlan.Pieces(transfer, bucket);
            long start = pieces.Min(p => p.Offset), end = pieces.Max(p => p.Offset + p.Length);
            List<StridedCopy> pack = source is null ? [] : TransferPlan.PackCopies(transfer, bucket, source);
            List<CopyRun> unpack = destination is null ? [] : TransferPlan.UnpackRuns(transfer, bucket, destination);
            long? sourceAt = null, destinationAt = null;
            if (inPlace && source is not null && pack.Count == pieces.Count && pack.All(c => c.Rows == 1)
                && Enumerable.Range(0, pieces.Count).All(i => pack[i].To == pieces[i].Offset && pack[i].Bytes == pieces[i].Length && pack[i].From - pack[0].From == pack[i].To - pack[0].To))
                sourceAt = pack[0].From - (pack[0].To - start); // bytes between pieces are only read, so whatever lies there may go along
            if (inPlace && destination is not null
                && Enumerable.Range(0, unpack.Count).All(i => unpack[i].To - unpack[0].To == unpack[i].From - unpack[0].From)
                && !ForeignBytesBetween(unpack, destination))
                destinationAt = unpack[0].To - (unpack[0].From - start);
            return new BucketWork(pieces, start, end - start, TransferPlan.Gaps(transfer, bucket), pack, unpack, sourceAt, destinationAt);
        }

        /// <summary>
        /// Whether a tensor the bucket does not carry lies between its pieces in the region (receiving in place would
        /// overwrite it). While regions and buckets share one alignment such a tensor also shifts the offsets, so the
        /// check above refuses first; this one holds for any alignment.
        /// </summary>
        private static bool ForeignBytesBetween(List<CopyRun> unpack, RegionLayout layout)
        {
            // The region's tensors do not overlap, so sorted by offset their ends are sorted too: one search per gap.
            long[] ends = s_ends.GetValue(layout, l => new StrongBox<long[]>(l.Tensors.Select(t => t.Offset + t.Bytes).Order().ToArray())).Value!;
            long[] starts = s_starts.GetValue(layout, l => new StrongBox<long[]>(l.Tensors.Select(t => t.Offset).Order().ToArray())).Value!;
            var runs = unpack.OrderBy(r => r.To).ToList();
            for (int i = 0; i + 1 < runs.Count; i++)
            {
                long gapStart = runs[i].To + runs[i].Bytes, gapEnd = runs[i + 1].To;
                if (gapEnd <= gapStart)
                    continue;
                int first = Array.BinarySearch(ends, gapStart + 1); // the first tensor that ends after the gap starts
                if (first < 0)
                    first = ~first;
                if (first < starts.Length && starts[first] < gapEnd)
                    return true;
            }
            return false;
        }

        private static readonly ConditionalWeakTable<RegionLayout, StrongBox<long[]>> s_ends = new(), s_starts = new();
    }

    /// <summary>Two staging buckets each way, the streams that pack and move them, and the events that say a bucket has moved.</summary>
    private sealed class Pipeline : IDisposable
    {
        private readonly List<IDisposable> _owned = [];

        public Pipeline(IBackend backend, long bucketBytes, bool sends, bool receives)
        {
            T Own<T>(T item) where T : IDisposable
            {
                _owned.Add(item);
                return item;
            }
            for (int slot = 0; slot < 2; slot++)
            {
                Out[slot] = sends ? Own(backend.Allocate(bucketBytes)) : null;
                In[slot] = receives ? Own(backend.Allocate(bucketBytes)) : null;
                Moved[slot] = Own(backend.CreateEvent());
                Packed[slot] = Own(backend.CreateEvent());
                Unpacked[slot] = Own(backend.CreateEvent());
            }
            Pack = Own(backend.CreateStream());
            Wire = Own(backend.CreateStream());
            Unpack = Own(backend.CreateStream());
            PackDigests = sends ? Own(backend.CreateDigestQueue(Pack)) : null;
            UnpackDigests = receives ? Own(backend.CreateDigestQueue(Unpack)) : null;
        }

        /// <summary>A slot's bucket is packed (the wire waits for it before sending).</summary>
        public IDeviceEvent[] Packed { get; } = new IDeviceEvent[2];

        /// <summary>A slot's bucket has been copied out of staging (the slot may take the next).</summary>
        public IDeviceEvent[] Unpacked { get; } = new IDeviceEvent[2];

        /// <summary>Copies out of staging and the digests of what arrived.</summary>
        public ICopyStream Unpack { get; }

        public IDigestQueue? PackDigests { get; }

        public IDigestQueue? UnpackDigests { get; }

        public IDeviceBuffer?[] Out { get; } = new IDeviceBuffer?[2];

        public IDeviceBuffer?[] In { get; } = new IDeviceBuffer?[2];

        public IDeviceEvent[] Moved { get; } = new IDeviceEvent[2];

        public ICopyStream Pack { get; }

        public ICopyStream Wire { get; }

        public void Dispose()
        {
            // Queues first (they use the streams), then streams, events and buffers.
            foreach (IDisposable item in Enumerable.Reverse(_owned))
                item.Dispose();
        }
    }
}

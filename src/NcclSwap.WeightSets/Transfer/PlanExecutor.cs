using System.Buffers.Binary;
using NcclSwap.DataPlane;

namespace NcclSwap.WeightSets;

/// <summary>What one rank did in a run of a <see cref="TransferPlan"/>: buckets sent or received, skipped as unchanged, sent again after a bad digest.</summary>
public sealed record TransferReport(int Rank, int Buckets, int Skipped, int Resent, long Bytes, IReadOnlyDictionary<(int Transfer, int Bucket), Digest> Digests);

/// <summary>
/// Runs a <see cref="TransferPlan"/> over a collective whose ranks 0..N-1 are its sources and N..N+M-1 its
/// destinations, every rank calling <see cref="Run"/> with the same plan. Transfers go in plan order and, within
/// one, bucket by bucket and destination by destination, so two ranks always wait for each other in the same order
/// and no cycle of waits can form. For each bucket the source packs it (<see cref="TransferPlan.PackRuns"/>) and
/// sends its digest first; a destination whose bucket from the last run has that digest answers "skip" (frozen
/// layers cost nothing), otherwise "send", checks the digest of what arrives, and asks for it again when it differs
/// (at most <see cref="Resends"/> times, then the run fails naming the bucket). A broadcast to several destinations
/// is, for now, a send to each; NCCL's own broadcast needs a communicator per destination set. A destination writes
/// into the region it is given (laid out as <see cref="TransferPlan.DestinationLayout"/>) as buckets arrive, so a run
/// that fails leaves it partly written: give it a staging copy, not what an engine serves. Failures of the
/// collective (a dead or stalled peer) end the run with its <see cref="CollectiveException"/>, naming the peer.
/// </summary>
public sealed class PlanExecutor(TransferPlan plan, IBackend backend, ICollective collective)
{
    private const byte Skip = 0, Send = 1, Good = 2, Bad = 3;

    public int Resends { get; init; } = 2;

    public TransferPlan Plan { get; } = plan;

    /// <summary>
    /// One run: a source sends from <paramref name="region"/> (laid out as <see cref="TransferPlan.SourceLayout"/>), a
    /// destination receives into it; <paramref name="previous"/> is that destination's report of the last run
    /// (buckets whose digest it matches are skipped).
    /// </summary>
    public TransferReport Run(IDeviceBuffer region, TransferReport? previous = null)
    {
        if (collective.Size != Plan.Sources + Plan.Destinations)
            throw new ArgumentException($"the collective has {collective.Size} ranks; the plan needs {Plan.Sources} sources and {Plan.Destinations} destinations");
        int rank = collective.Rank;
        bool source = rank < Plan.Sources;
        int me = source ? rank : rank - Plan.Sources;
        RegionLayout layout = source ? Plan.SourceLayout() : Plan.DestinationLayout(me);
        if (region.Length < layout.Length)
            throw new ArgumentException($"the region holds {region.Length} bytes; rank {rank} needs {layout.Length}");

        long largest = Plan.Transfers.SelectMany(t => t.Buckets.Buckets).Select(b => b.Bytes).DefaultIfEmpty(0).Max();
        using IDeviceBuffer bucket = backend.Allocate(Math.Max(largest, 1));
        using IDeviceBuffer word = backend.Allocate(8);
        using ICopyStream stream = backend.CreateStream();
        var digests = new Dictionary<(int, int), Digest>();
        int buckets = 0, skipped = 0, resent = 0;
        long bytes = 0;
        for (int t = 0; t < Plan.Transfers.Count; t++)
        {
            Transfer transfer = Plan.Transfers[t];
            bool mine = source ? transfer.Source == me : transfer.Destinations.Contains(me);
            if (!mine)
                continue;
            for (int b = 0; b < transfer.Buckets.Buckets.Count; b++)
            {
                long length = transfer.Buckets.Buckets[b].Bytes;
                if (source)
                {
                    foreach ((long offset, long gap) in TransferPlan.Gaps(transfer, b))
                        stream.FillAsync(bucket, offset, gap, 0);
                    stream.CopyAsync(bucket, region, TransferPlan.PackRuns(transfer, b, layout));
                    stream.Synchronize();
                    Digest digest = DigestOf(bucket, length);
                    foreach (int destination in transfer.Destinations)
                    {
                        int peer = Plan.Sources + destination;
                        Exchange(word, digest.Value, peer, send: true, stream);
                        if (Exchange(word, 0, peer, send: false, stream) == Skip)
                        {
                            skipped++;
                            continue;
                        }
                        for (int attempt = 0; ; attempt++)
                        {
                            collective.Send(bucket, 0, length, peer, stream);
                            buckets++;
                            bytes += length;
                            if (Exchange(word, 0, peer, send: false, stream) == Good)
                                break;
                            if (attempt == Resends)
                                throw new InvalidDataException($"bucket {b} of transfer {t} still arrives wrong at destination {destination} (rank {peer}) after {attempt} re-send(s)");
                            resent++;
                        }
                    }
                    digests[(t, b)] = digest;
                }
                else
                {
                    int peer = transfer.Source;
                    var digest = new Digest(Exchange(word, 0, peer, send: false, stream));
                    digests[(t, b)] = digest;
                    if (previous is not null && previous.Digests.TryGetValue((t, b), out Digest had) && had == digest)
                    {
                        Exchange(word, Skip, peer, send: true, stream);
                        skipped++;
                        continue;
                    }
                    Exchange(word, Send, peer, send: true, stream);
                    for (int attempt = 0; ; attempt++)
                    {
                        collective.Receive(bucket, 0, length, peer, stream);
                        buckets++;
                        bytes += length;
                        bool good = DigestOf(bucket, length) == digest;
                        Exchange(word, good ? Good : Bad, peer, send: true, stream);
                        if (good)
                            break;
                        if (attempt == Resends)
                            throw new InvalidDataException($"bucket {b} of transfer {t} from source {peer} still arrives wrong after {attempt} re-send(s)");
                        resent++;
                    }
                    stream.CopyAsync(region, bucket, TransferPlan.UnpackRuns(transfer, b, layout));
                    stream.Synchronize();
                }
            }
        }
        return new TransferReport(rank, buckets, skipped, resent, bytes, digests);
    }

    private Digest DigestOf(IDeviceBuffer buffer, long length) => backend.Digests(buffer, [(0, length)])[0];

    /// <summary>Sends <paramref name="value"/> to <paramref name="peer"/>, or receives a value from it: 8 bytes either way.</summary>
    private ulong Exchange(IDeviceBuffer word, ulong value, int peer, bool send, ICopyStream stream)
    {
        Span<byte> bytes = stackalloc byte[8];
        if (send)
        {
            BinaryPrimitives.WriteUInt64LittleEndian(bytes, value);
            backend.Upload(bytes, word);
            collective.Send(word, 0, 8, peer, stream);
            return value;
        }
        collective.Receive(word, 0, 8, peer, stream);
        backend.Download(word, 0, bytes);
        return BinaryPrimitives.ReadUInt64LittleEndian(bytes);
    }
}

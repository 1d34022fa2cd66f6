using NcclSwap.Cuda;

namespace NcclSwap.DataPlane;

/// <summary>
/// Where weights live and how they move: device memory, pinned staging, copy streams, events and
/// collectives. <see cref="CudaBackend"/> does this on a GPU with NCCL; <see cref="HostBackend"/> in CPU
/// memory with a loopback TCP collective, so that every layer above runs on machines without a GPU.
/// </summary>
public interface IBackend : IDisposable
{
    /// <summary>"cuda" or "host".</summary>
    string Kind { get; }

    /// <summary>One line for logs and <c>doctor</c>, e.g. "cuda: GPU 0, NVIDIA H100 80GB HBM3".</summary>
    string Description { get; }

    IDeviceBuffer Allocate(long length);

    /// <summary>Pinned host buffers for staging, reused across updates.</summary>
    PinnedBufferPool PinnedPool { get; }

    ICopyStream CreateStream();

    IDeviceEvent CreateEvent();

    /// <summary>
    /// Host memory owned elsewhere (a client's shared memory, a staging file) as a buffer that this backend's
    /// streams copy to and from and <see cref="Digests"/> reads: on CUDA it is page-locked and mapped into the
    /// device's address space. <paramref name="readOnly"/> for memory mapped without write access;
    /// <paramref name="name"/> shows in messages. The memory must stay mapped until the buffer is disposed.
    /// </summary>
    IDeviceBuffer MapHost(nint pointer, long length, bool readOnly, string name);

    /// <summary>
    /// <paramref name="length"/> bytes at <paramref name="offset"/> of another process's device allocation, opened
    /// from its CUDA IPC handle (which names the allocation from its base). Throws <see cref="NotSupportedException"/>
    /// on a backend without a GPU, and <see cref="ArgumentException"/> when the range does not fit the allocation.
    /// The allocation stays usable until the buffer is disposed, even if its owner frees it meanwhile.
    /// </summary>
    IDeviceBuffer OpenIpc(CuIpcMemHandle handle, long offset, long length, string name);

    /// <summary>
    /// The CUDA IPC handle of the allocation that holds <paramref name="buffer"/> (from <see cref="Allocate"/>) and the
    /// buffer's offset in it, for another process to open with <see cref="OpenIpc"/>. Throws
    /// <see cref="NotSupportedException"/> on a backend without a GPU and <see cref="ArgumentException"/> for host memory.
    /// </summary>
    (CuIpcMemHandle Handle, long Offset) ExportIpc(IDeviceBuffer buffer);

    /// <summary>Free and total device memory now, for placement decisions; null where "device" memory is host memory.</summary>
    (long Free, long Total)? DeviceMemory { get; }

    /// <summary>The <see cref="BlockDigest"/> of each range of <paramref name="buffer"/> (a <see cref="SegmentedBuffer"/> too: each range in one segment), in order, computed where the backend computes (the GPU for CUDA, in one batch); waits for them.</summary>
    Digest[] Digests(IDeviceBuffer buffer, IReadOnlyList<(long Offset, long Length)> ranges);

    /// <summary>
    /// Copies each run from <paramref name="source"/> to <paramref name="destination"/> (either may be a <see cref="SegmentedBuffer"/>:
    /// each run within one segment) and returns the <see cref="BlockDigest"/> of each run's bytes as they were read
    /// from the source, in order; waits for both. A copy checked later against these digests is checked against
    /// the source itself. The CUDA backend hashes while it copies, so the digests cost little more than the copy.
    /// </summary>
    Digest[] CopyAndDigest(IDeviceBuffer destination, IDeviceBuffer source, IReadOnlyList<CopyRun> runs)
    {
        using (ICopyStream stream = CreateStream())
        {
            stream.CopyAsync(destination, source, runs);
            stream.Synchronize();
        }
        return Digests(source, runs.Select(r => (r.From, r.Bytes)).ToList());
    }

    /// <summary>
    /// Digests (and digesting copies) enqueued on <paramref name="stream"/> and collected later in one wait; the GPU
    /// backend computes them on the GPU in stream order, others as they are enqueued.
    /// </summary>
    IDigestQueue CreateDigestQueue(ICopyStream stream) => new ImmediateDigestQueue(this, stream);

    /// <summary>Copies host bytes into a device buffer and waits for the copy.</summary>
    void Upload(ReadOnlySpan<byte> source, IDeviceBuffer destination, long offset = 0);

    /// <summary>Copies device bytes to the host and waits for the copy.</summary>
    void Download(IDeviceBuffer source, long offset, Span<byte> destination);

    /// <summary>Made by the root of a new collective and handed to every rank out of band.</summary>
    string CreateCollectiveId();

    /// <summary>Joins the collective <paramref name="id"/> as <paramref name="rank"/> of <paramref name="size"/>; every wait inside has <paramref name="timeout"/>.</summary>
    ICollective JoinCollective(string id, int rank, int size, TimeSpan timeout);
}

/// <summary>A contiguous run of bytes to copy between two buffers (or regions laid out differently): from offset <paramref name="From"/> of the source to <paramref name="To"/> of the destination.</summary>
public readonly record struct CopyRun(long From, long To, long Bytes);

/// <summary>
/// <paramref name="Rows"/> runs of <paramref name="Bytes"/> bytes: row i from <c>From + i * FromPitch</c> of the source
/// to <c>To + i * ToPitch</c> of the destination. A tensor cut along a later dimension is such a copy (its part of
/// every row), which one call moves instead of a run per row.
/// </summary>
public readonly record struct StridedCopy(long From, long FromPitch, long To, long ToPitch, long Bytes, long Rows)
{
    public long TotalBytes => Bytes * Rows;

    /// <summary>The copy as one run per row.</summary>
    public IEnumerable<CopyRun> Runs()
    {
        for (long row = 0; row < Rows; row++)
            yield return new CopyRun(From + row * FromPitch, To + row * ToPitch, Bytes);
    }
}

/// <summary>A range of device memory (or its host stand-in).</summary>
public interface IDeviceBuffer : IDisposable
{
    long Length { get; }
}

/// <summary>An ordered queue of copies and event operations.</summary>
public interface ICopyStream : IDisposable
{
    /// <summary>Host (pinned) to device.</summary>
    void CopyAsync(IDeviceBuffer destination, long destinationOffset, PinnedBuffer source, long sourceOffset, long length);

    /// <summary>Device to host (pinned).</summary>
    void CopyAsync(PinnedBuffer destination, long destinationOffset, IDeviceBuffer source, long sourceOffset, long length);

    /// <summary>Device to device.</summary>
    void CopyAsync(IDeviceBuffer destination, long destinationOffset, IDeviceBuffer source, long sourceOffset, long length);

    /// <summary>
    /// Many runs from <paramref name="source"/> to <paramref name="destination"/> (either may be a <see cref="SegmentedBuffer"/>:
    /// each run within one segment), in as few operations as the backend can: on CUDA one kernel launch for all
    /// the runs between device memory, however many tensors they are.
    /// </summary>
    void CopyAsync(IDeviceBuffer destination, IDeviceBuffer source, IReadOnlyList<CopyRun> runs)
    {
        foreach (CopyRun run in runs)
            SegmentedBuffer.CopyAsync(this, destination, run.To, source, run.From, run.Bytes);
    }

    /// <summary>
    /// Strided copies from <paramref name="source"/> to <paramref name="destination"/> (each copy's rows within one
    /// segment of a <see cref="SegmentedBuffer"/>): on CUDA one 2-D copy per entry, however many rows it has.
    /// </summary>
    void CopyAsync(IDeviceBuffer destination, IDeviceBuffer source, IReadOnlyList<StridedCopy> copies) =>
        CopyAsync(destination, source, copies.SelectMany(c => c.Runs()).ToList());

    void FillAsync(IDeviceBuffer destination, long offset, long length, byte value);

    void Record(IDeviceEvent @event);

    /// <summary>Later work on this stream waits for <paramref name="event"/>; the host does not block.</summary>
    void Wait(IDeviceEvent @event);

    /// <summary>
    /// Later work on this stream waits until the 32-bit word at <paramref name="offset"/> of <paramref name="word"/>
    /// reaches <paramref name="value"/> (cyclic: <c>(int)(word - value) &gt;= 0</c>), written by anyone: another
    /// process's stream or CPU. The host does not block on a GPU; a host stream blocks the issuing thread.
    /// </summary>
    void WaitValue(IDeviceBuffer word, long offset, uint value);

    /// <summary>Writes <paramref name="value"/> to the 32-bit word at <paramref name="offset"/> once the stream's earlier work is done (with a fence: its writes are visible first).</summary>
    void WriteValue(IDeviceBuffer word, long offset, uint value);

    void Synchronize();
}

public interface IDeviceEvent : IDisposable
{
    bool IsComplete { get; }

    void Synchronize();
}

/// <summary>
/// One rank of a group of processes that exchange device buffers. Operations between the same two ranks
/// match in the order they are issued, as in NCCL; operations issued inside <see cref="Group"/> run together.
/// Failures and missed deadlines throw <see cref="CollectiveException"/> naming the peer at fault.
/// </summary>
public interface ICollective : IDisposable
{
    int Rank { get; }

    int Size { get; }

    /// <summary>In place: the root's bytes at [offset, offset+length) of <paramref name="buffer"/> reach every rank's same range.</summary>
    void Broadcast(IDeviceBuffer buffer, long offset, long length, int root, ICopyStream stream);

    /// <summary>Rank r's <paramref name="bytesPerRank"/> bytes land at receiveOffset + r * bytesPerRank on every rank.</summary>
    void AllGather(IDeviceBuffer send, long sendOffset, IDeviceBuffer receive, long receiveOffset, long bytesPerRank, ICopyStream stream);

    void Send(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream);

    void Receive(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream);

    /// <summary>
    /// Operations issued until the scope ends run together, so paired sends and receives cannot deadlock; inside a
    /// group a rank may also send to itself, paired in order with its receives from itself.
    /// </summary>
    IDisposable Group();

    /// <summary>Ends every operation in flight, here and (by closing the links) at the peers; idempotent with Dispose.</summary>
    void Abort();

    /// <summary>
    /// Waits until <paramref name="done"/> (recorded after this collective's operations on a stream) completes, within
    /// the collective's deadline; a failure or a missed deadline aborts the collective and throws a
    /// <see cref="CollectiveException"/> that says <paramref name="what"/> was waited for and names
    /// <paramref name="peer"/>, the rank it waited on, when there is one. Host collectives finish their operations
    /// as they are issued, so for them this returns at once.
    /// </summary>
    void Wait(IDeviceEvent done, int? peer, string what) => done.Synchronize();

    /// <summary>
    /// A collective of <paramref name="ranks"/> (ranks of this one; rank i of the new one is ranks[i]), or null on a
    /// rank not among them. Every rank of this collective calls it with the same list, and calls to it are ordered
    /// like other operations. Its failures name ranks of this collective. NCCL splits the communicator (so a broadcast
    /// runs as NCCL's own); elsewhere the subset runs its operations as sends and receives of this one.
    /// </summary>
    ICollective? Subset(IReadOnlyList<int> ranks) => RankSubset.Of(this, ranks);

    /// <summary>
    /// From now on this collective's waits (and those of subsets made from it later) poll <paramref name="lost"/> and,
    /// once it names a rank known to be gone (a swap group's watch over its members), end with a
    /// <see cref="CollectiveException"/> naming that rank instead of waiting out their deadline. Collectives that
    /// finish their operations as they are issued have nothing to end.
    /// </summary>
    void WatchPeers(Func<PeerLoss?> lost)
    {
    }
}

/// <summary>Rank <paramref name="Rank"/> is gone; <paramref name="Why"/> says who it was and what was seen.</summary>
public sealed record PeerLoss(int Rank, string Why);

/// <summary>A collective failed or missed its deadline; <see cref="Peer"/> names the rank at fault when known.</summary>
public sealed class CollectiveException(string message, int? peer, Exception? inner = null) : Exception(message, inner)
{
    public int? Peer { get; } = peer;
}

internal static class CollectiveArguments
{
    /// <summary>Refuses a root or peer that is not a rank of the collective, before anything is issued.</summary>
    internal static void CheckRank(int rank, int size, string what)
    {
        if ((uint)rank >= (uint)size)
            throw new ArgumentOutOfRangeException(what, $"{what} {rank} is not a rank of this collective of {size}.");
    }

    internal static void CheckPeer(int peer, int self, int size, bool inGroup)
    {
        CheckRank(peer, size, "peer");
        if (peer == self && !inGroup)
            throw new ArgumentException($"rank {self} cannot send to or receive from itself outside a group.", nameof(peer));
    }

    /// <summary>Refuses a subset list with ranks out of range or twice.</summary>
    internal static void CheckSubset(IReadOnlyList<int> ranks, int size)
    {
        if (ranks.Count == 0)
            throw new ArgumentException("a subset needs at least one rank", nameof(ranks));
        foreach (int rank in ranks)
            CheckRank(rank, size, "subset rank");
        if (ranks.Distinct().Count() != ranks.Count)
            throw new ArgumentException($"the subset [{string.Join(", ", ranks)}] names a rank twice", nameof(ranks));
    }
}

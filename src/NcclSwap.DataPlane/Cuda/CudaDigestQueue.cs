using System.Runtime.InteropServices;
using NcclSwap.Cuda;

namespace NcclSwap.DataPlane;

/// <summary>
/// Digests on the GPU in stream order (<see cref="IDigestQueue"/>): each enqueue launches the digest kernels on the
/// queue's stream, the roots landing in a device array of the queue's own; <see cref="Collect"/> waits for the stream,
/// downloads the roots once and finishes each digest with its length. The kernels' scratch memory is the queue's and
/// is reused in stream order; when an enqueue needs more of it or of the roots array, the queue waits for its stream
/// first (so that nothing in flight uses the memory it replaces). The leaf kernel runs with
/// <see cref="BlocksPerSm"/> blocks per multiprocessor at most, so that it takes a share of the memory's bandwidth and
/// leaves the rest to the work beside it (a transfer's wire), rather than all of it in bursts.
/// </summary>
internal sealed class CudaDigestQueue(CudaBackend backend, CudaCopyStream stream) : IDigestQueue
{
    /// <summary>
    /// Leaf-kernel blocks per multiprocessor: <c>NCCL_SWAP_DIGEST_BLOCKS_PER_SM</c>, 1 by default (the best of 0, 1, 2
    /// and 4 for a transfer between two H100s; perf/README.md); 0 for a block per tile (all the bandwidth).
    /// </summary>
    public static readonly int BlocksPerSm =
        int.TryParse(Environment.GetEnvironmentVariable("NCCL_SWAP_DIGEST_BLOCKS_PER_SM"), out int n) && n >= 0 ? n : 1;

    private readonly int _maxBlocks = BlocksPerSm * backend.Context.Device.MultiprocessorCount;
    private readonly List<long> _lengths = [];
    private readonly List<ulong> _early = []; // roots downloaded before the array grew
    private DeviceBuffer? _roots, _scratch;
    private int _inArray;

    public int Digest(IDeviceBuffer buffer, IReadOnlyList<(long Offset, long Length)> ranges) =>
        Enqueue(ranges.Select(r =>
        {
            (IDeviceBuffer part, long offset) = SegmentedBuffer.Resolve(buffer, r.Offset, r.Length);
            return (0ul, CudaBackend.AsCuda(part).At(offset, r.Length), r.Length);
        }).ToList());

    /// <summary>Runs between aligned device memory are copied by the digest kernel; the others with <c>cuMemcpy</c> on the stream, and their source digested.</summary>
    public int CopyAndDigest(IDeviceBuffer destination, IDeviceBuffer source, IReadOnlyList<CopyRun> runs) =>
        Enqueue(CudaBackend.KernelRanges(destination, source, runs, stream.Stream, digests: true));

    private int Enqueue(List<(ulong Destination, ulong Source, long Length)> ranges)
    {
        int first = _lengths.Count;
        if (ranges.Count == 0)
            return first;
        long work = GpuDigest.WorkWords(ranges.Select(r => r.Length));
        if (_scratch is null || _scratch.Length < work * 8)
        {
            stream.Synchronize();
            _scratch?.Dispose();
            _scratch = null;
            _scratch = DeviceBuffer.Allocate(backend.Context, Math.Max(work * 8, 1 << 20));
        }
        if (_roots is null || _roots.Length < (long)(_inArray + ranges.Count) * 8)
        {
            stream.Synchronize();
            DrainArray();
            _roots?.Dispose();
            _roots = null;
            _roots = DeviceBuffer.Allocate(backend.Context, Math.Max(ranges.Count, 4096) * 8L);
        }
        backend.Kernels.EnqueueRoots(ranges, stream.Stream, _scratch.Address, _roots.Address + (ulong)_inArray * 8, _maxBlocks);
        _inArray += ranges.Count;
        _lengths.AddRange(ranges.Select(r => r.Length));
        return first;
    }

    /// <summary>Moves the roots in the array to the host (the stream has finished).</summary>
    private void DrainArray()
    {
        if (_inArray == 0)
            return;
        var roots = new ulong[_inArray];
        _roots!.CopyTo(MemoryMarshal.AsBytes(roots.AsSpan()));
        _early.AddRange(roots);
        _inArray = 0;
    }

    public Digest[] Collect()
    {
        stream.Synchronize();
        DrainArray();
        var digests = new Digest[_lengths.Count];
        for (int i = 0; i < digests.Length; i++)
            digests[i] = BlockDigest.FromRoot(_early[i], _lengths[i]);
        _early.Clear();
        _lengths.Clear();
        return digests;
    }

    public void Dispose()
    {
        _roots?.Dispose();
        _scratch?.Dispose();
    }
}

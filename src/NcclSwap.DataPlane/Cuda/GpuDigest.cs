using NcclSwap.Cuda;

namespace NcclSwap.DataPlane;

/// <summary>
/// <see cref="BlockDigest"/> on the GPU: the leaf and level kernels of native/kernels/digest.cu, loaded from
/// the embedded PTX. The result is bit-for-bit the CPU's digest of the same bytes.
/// </summary>
public sealed class GpuDigest : IDisposable
{
    private const uint LeafThreads = 128; // TILE_LEAVES in digest.cu
    private const uint LevelThreads = 128;

    private readonly CudaModule _module;
    private readonly CudaKernel _leaves;
    private readonly CudaKernel _level;
    private DeviceBuffer? _scratch;

    public GpuDigest(CudaContext context)
    {
        Context = context;
        _module = CudaModule.LoadPtx(context, LoadPtx());
        _leaves = _module.GetKernel("digest_leaves");
        _level = _module.GetKernel("digest_level");
    }

    public CudaContext Context { get; }

    /// <summary>The digest of <paramref name="length"/> bytes at <paramref name="offset"/> of <paramref name="buffer"/>, computed on <paramref name="stream"/>; waits for it.</summary>
    public Digest Compute(DeviceBuffer buffer, long offset, long length, CudaStream stream)
    {
        Pending pending = Enqueue(buffer, offset, length, stream);
        stream.Synchronize();
        return pending.Result();
    }

    /// <summary>
    /// Enqueues the digest kernels on <paramref name="stream"/> and returns at once; read the result with
    /// <see cref="Pending.Result"/> after the stream has passed this point, and before the next Enqueue
    /// (the scratch memory is reused). Not thread-safe.
    /// </summary>
    public Pending Enqueue(DeviceBuffer buffer, long offset, long length, CudaStream stream)
    {
        ulong data = buffer.At(offset, length);
        EnsureScratch(ScratchWords(length));
        long root = EnqueueAt(data, length, _scratch!.Address, stream);
        return new Pending(_scratch, root * 8, length);
    }

    /// <summary>
    /// The digests of many ranges (of one buffer or several): every range's kernels enqueued on <paramref name="stream"/>
    /// into scratch of its own, then one wait and one download of all the roots (a digest per range would pay a
    /// wait and a download each, which for a model's hundreds of tensors costs more than the hashing).
    /// </summary>
    public Digest[] Compute(IReadOnlyList<(DeviceBuffer Buffer, long Offset, long Length)> ranges, CudaStream stream)
    {
        var at = new long[ranges.Count];
        var data = new ulong[ranges.Count];
        long words = ranges.Count; // the roots, gathered at the start
        for (int i = 0; i < ranges.Count; i++)
        {
            data[i] = ranges[i].Buffer.At(ranges[i].Offset, ranges[i].Length); // checks the range
            at[i] = words;
            words += ScratchWords(ranges[i].Length);
        }
        EnsureScratch(words);
        ulong scratch = _scratch!.Address;
        for (int i = 0; i < ranges.Count; i++)
        {
            long root = EnqueueAt(data[i], ranges[i].Length, scratch + (ulong)at[i] * 8, stream);
            stream.CopyAsync(_scratch, i * 8L, _scratch, root * 8, 8);
        }
        var roots = new ulong[ranges.Count];
        stream.Synchronize();
        _scratch.CopyTo(System.Runtime.InteropServices.MemoryMarshal.AsBytes(roots.AsSpan()));
        var digests = new Digest[ranges.Count];
        for (int i = 0; i < ranges.Count; i++)
            digests[i] = BlockDigest.FromRoot(roots[i], ranges[i].Length);
        return digests;
    }

    private static long ScratchWords(long length)
    {
        long leaves = BlockDigest.LeafCount(length);
        return leaves + (leaves + BlockDigest.Fanout - 1) / BlockDigest.Fanout * 2 + 2;
    }

    private void EnsureScratch(long words)
    {
        if (_scratch is null || _scratch.Length < words * 8)
        {
            _scratch?.Dispose();
            _scratch = DeviceBuffer.Allocate(Context, words * 8);
        }
    }

    /// <summary>Enqueues the kernels over <paramref name="length"/> bytes at <paramref name="data"/>, hashes from <paramref name="scratch"/> on; returns the root's word index in the scratch buffer.</summary>
    private long EnqueueAt(ulong data, long length, ulong scratch, CudaStream stream)
    {
        long leaves = BlockDigest.LeafCount(length);
        ulong input = scratch;
        _leaves.Launch(checked((uint)((leaves + LeafThreads - 1) / LeafThreads)), LeafThreads, stream,
            new KernelArguments().Add(data).Add((ulong)length).Add(input));
        ulong output = input + (ulong)leaves * 8;
        for (long count = leaves; count > 1;)
        {
            long groups = (count + BlockDigest.Fanout - 1) / BlockDigest.Fanout;
            _level.Launch(checked((uint)((groups + LevelThreads - 1) / LevelThreads)), LevelThreads, stream,
                new KernelArguments().Add(input).Add((ulong)count).Add(output));
            (input, output, count) = (output, output + (ulong)groups * 8, groups);
        }
        return (long)(input - _scratch!.Address) / 8;
    }

    /// <summary>A digest whose kernels are enqueued; the root hash lands at <c>rootOffset</c> of the scratch buffer.</summary>
    public readonly struct Pending(DeviceBuffer scratch, long rootOffset, long length)
    {
        public Digest Result()
        {
            Span<byte> root = stackalloc byte[8];
            scratch.CopyTo(root, rootOffset);
            return BlockDigest.FromRoot(BitConverter.ToUInt64(root), length);
        }
    }

    public void Dispose()
    {
        _scratch?.Dispose();
        _module.Dispose();
    }

    private static string LoadPtx()
    {
        using Stream stream = typeof(GpuDigest).Assembly.GetManifestResourceStream("digest.ptx")
            ?? throw new InvalidOperationException("digest.ptx is not embedded in NcclSwap.DataPlane");
        return new StreamReader(stream).ReadToEnd();
    }
}

using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using NcclSwap.Cuda;

namespace NcclSwap.DataPlane;

/// <summary>
/// Many strided copies (a tensor part cut along a later dimension: thousands of rows of a few hundred bytes at a
/// pitch) in one launch of <c>copy_strided</c> (native/kernels/pack.cu, loaded from the embedded PTX). The copy
/// engines move such rows one by one far below the memory's bandwidth; a warp per row piece keeps up with it.
/// Device memory only; launches are thread-safe.
/// </summary>
internal sealed class StridedCopyKernel : IDisposable
{
    /// <summary>Entries per launch: MAX_STRIDED in pack.cu.</summary>
    public const int MaxEntries = 480;

    private const long Chunk = 16384; // CHUNK in pack.cu
    private const uint Warps = 8;     // WARPS in pack.cu

    private readonly CudaModule _module;
    private readonly CudaKernel _copy;

    public StridedCopyKernel(CudaContext context)
    {
        using Stream ptx = typeof(StridedCopyKernel).Assembly.GetManifestResourceStream("pack.ptx")
            ?? throw new InvalidOperationException("pack.ptx is not embedded in NcclSwap.DataPlane");
        _module = CudaModule.LoadPtx(context, new StreamReader(ptx).ReadToEnd());
        _copy = _module.GetKernel("copy_strided");
    }

    /// <summary>Enqueues the copies (device addresses of row 0 on both sides, pitches, row length, rows) on <paramref name="stream"/>.</summary>
    public void Enqueue(IReadOnlyList<(ulong To, long ToPitch, ulong From, long FromPitch, long Bytes, long Rows)> copies, CudaStream stream)
    {
        for (int start = 0; start < copies.Count; start += MaxEntries)
        {
            var batch = new Batch();
            uint count = 0;
            ulong blocks = 0;
            for (int i = start; i < Math.Min(copies.Count, start + MaxEntries); i++)
            {
                var c = copies[i];
                if (c.Bytes <= 0 || c.Rows <= 0)
                    continue;
                ulong chunks = (ulong)((c.Bytes + Chunk - 1) / Chunk);
                batch.Entries[(int)count++] = new Entry
                {
                    Source = c.From, Destination = c.To, SourcePitch = (ulong)c.FromPitch, DestinationPitch = (ulong)c.ToPitch,
                    RowBytes = (ulong)c.Bytes, Rows = (ulong)c.Rows, Chunks = chunks, FirstBlock = blocks,
                };
                blocks += ((ulong)c.Rows * chunks + Warps - 1) / Warps;
            }
            if (count == 0)
                continue;
            batch.Count = count;
            _copy.Launch(checked((uint)blocks), Warps * 32, stream, new KernelArguments().Add(in batch, 8));
        }
    }

    public void Dispose() => _module.Dispose();

    // The kernel's parameter structs (strided_desc, strided_batch in pack.cu).

    [StructLayout(LayoutKind.Sequential)]
    private struct Entry
    {
        public ulong Source;
        public ulong Destination;
        public ulong SourcePitch;
        public ulong DestinationPitch;
        public ulong RowBytes;
        public ulong Rows;
        public ulong Chunks;
        public ulong FirstBlock;
    }

    [InlineArray(MaxEntries)]
    private struct Entries
    {
        private Entry _first;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct Batch
    {
        public uint Count;
        public uint Reserved;
        public Entries Entries;
    }
}

using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using NcclSwap.Cuda;

namespace NcclSwap.DataPlane;

/// <summary>
/// <see cref="BlockDigest"/> on the GPU, and copies that come with it: the kernels of native/kernels/digest.cu,
/// loaded from the embedded PTX. A batch of ranges (a model's tensors) costs one launch of the leaf kernel and one
/// per tree level, however many ranges it holds; the leaf kernel copies each range on the way when asked, so that a
/// copy yields the digests of the bytes it read. Results are bit-for-bit the CPU's digests of the same bytes.
/// </summary>
public sealed class GpuDigest : IDisposable
{
    /// <summary>Ranges per launch: MAX_RANGES in digest.cu (their descriptors travel as a kernel parameter).</summary>
    public const int MaxRanges = 640;

    private const uint TileThreads = 256; // 2 * TILE_LEAVES in digest.cu
    private const long TileLeaves = 128;
    private const uint LevelThreads = 128;

    private readonly CudaModule _module;
    private readonly CudaKernel _leaves;
    private readonly CudaKernel _level;
    private DeviceBuffer? _scratch;

    public GpuDigest(CudaContext context)
    {
        Context = context;
        _module = CudaModule.LoadPtx(context, LoadPtx());
        _leaves = _module.GetKernel("copy_digest_ranges");
        _level = _module.GetKernel("digest_level_ranges");
    }

    public CudaContext Context { get; }

    /// <summary>
    /// Whether <see cref="CopyAndDigest"/> and <see cref="EnqueueCopy"/> copy between these addresses themselves
    /// (both 16-byte aligned); the caller copies the others with <c>cuMemcpy</c> and digests their source.
    /// </summary>
    public static bool CanCopy(ulong destination, ulong source) => ((destination | source) & 15) == 0;

    /// <summary>The digest of <paramref name="length"/> bytes at <paramref name="offset"/> of <paramref name="buffer"/>, computed on <paramref name="stream"/>; waits for it.</summary>
    public Digest Compute(DeviceBuffer buffer, long offset, long length, CudaStream stream) =>
        Compute([(buffer, offset, length)], stream)[0];

    /// <summary>
    /// The digests of many ranges (of one buffer or several), in one batch: one wait and one download of all the
    /// roots. Not thread-safe (the scratch memory serves one batch at a time).
    /// </summary>
    public Digest[] Compute(IReadOnlyList<(DeviceBuffer Buffer, long Offset, long Length)> ranges, CudaStream stream) =>
        Run(ranges.Select(r => new Range(r.Buffer.At(r.Offset, r.Length), 0, r.Length)).ToList(), stream);

    /// <summary>
    /// Copies each range from Source to Destination (device addresses, <see cref="CanCopy"/>) and returns the digests
    /// of the bytes read; a range whose Destination is 0 is only digested. Waits for both. Not thread-safe.
    /// </summary>
    public Digest[] CopyAndDigest(IReadOnlyList<(ulong Destination, ulong Source, long Length)> ranges, CudaStream stream)
    {
        foreach ((ulong destination, ulong source, _) in ranges)
            if (destination != 0 && !CanCopy(destination, source))
                throw new ArgumentException($"0x{source:x} -> 0x{destination:x}: the copy kernel needs both addresses 16-byte aligned");
        return Run(ranges.Select(r => new Range(r.Source, r.Destination, r.Length)).ToList(), stream);
    }

    /// <summary>
    /// Enqueues copies of many ranges (device addresses, <see cref="CanCopy"/>) on <paramref name="stream"/> as one
    /// launch per <see cref="MaxRanges"/> and returns at once. Thread-safe: it uses no scratch memory.
    /// </summary>
    public void EnqueueCopy(IReadOnlyList<(ulong Destination, ulong Source, long Length)> ranges, CudaStream stream)
    {
        var entries = new List<RangeEntry>(ranges.Count);
        foreach ((ulong destination, ulong source, long length) in ranges)
        {
            if (!CanCopy(destination, source))
                throw new ArgumentException($"0x{source:x} -> 0x{destination:x}: the copy kernel needs both addresses 16-byte aligned");
            if (length > 0)
                entries.Add(new RangeEntry { Source = source, Destination = destination, Length = (ulong)length });
        }
        LaunchLeaves(CollectionsMarshal.AsSpan(entries), stream);
    }

    private readonly record struct Range(ulong Source, ulong Destination, long Length);

    /// <summary>Leaves of every range (copying those with a destination), then their levels; waits and returns the digests.</summary>
    private Digest[] Run(List<Range> ranges, CudaStream stream)
    {
        int n = ranges.Count;
        if (n == 0)
            return [];
        long work = WorkWords(ranges.Select(r => r.Length));
        EnsureScratch(n + work);
        Enqueue(ranges, stream, _scratch!.Address + (ulong)n * 8, _scratch.Address); // the roots come first
        var roots = new ulong[n];
        stream.Synchronize();
        _scratch.CopyTo(MemoryMarshal.AsBytes(roots.AsSpan()));
        var digests = new Digest[n];
        for (int i = 0; i < n; i++)
            digests[i] = BlockDigest.FromRoot(roots[i], ranges[i].Length);
        return digests;
    }

    /// <summary>
    /// Enqueues the leaves and levels of every range (copying those with a destination) on <paramref name="stream"/>
    /// and returns at once: range i's root (<see cref="BlockDigest.FromRoot"/> makes its digest) lands in the 8 bytes
    /// at device address <paramref name="roots"/> + 8 i; <paramref name="work"/> is scratch of
    /// <see cref="WorkWords"/> words, which the kernels use in stream order (so one scratch serves one stream).
    /// Thread-safe: the caller's memory only. <paramref name="maxBlocks"/> (when positive) caps the leaf kernel's
    /// blocks, leaving the memory's bandwidth to other work beside it.
    /// </summary>
    public void EnqueueRoots(IReadOnlyList<(ulong Destination, ulong Source, long Length)> ranges, CudaStream stream, ulong work, ulong roots, int maxBlocks = 0)
    {
        foreach ((ulong destination, ulong source, _) in ranges)
            if (destination != 0 && !CanCopy(destination, source))
                throw new ArgumentException($"0x{source:x} -> 0x{destination:x}: the copy kernel needs both addresses 16-byte aligned");
        if (ranges.Count > 0)
            Enqueue(ranges.Select(r => new Range(r.Source, r.Destination, r.Length)).ToList(), stream, work, roots, maxBlocks);
    }

    /// <summary>Words of scratch that <see cref="EnqueueRoots"/> needs for ranges of these lengths.</summary>
    public static long WorkWords(IEnumerable<long> lengths) => lengths.Sum(ScratchWords);

    private void Enqueue(List<Range> ranges, CudaStream stream, ulong scratch, ulong roots, int maxBlocks = 0)
    {
        int n = ranges.Count;
        var next = new long[n]; // each range's next free word of scratch
        long words = 0;
        for (int i = 0; i < n; i++)
        {
            next[i] = words;
            words = checked(words + ScratchWords(ranges[i].Length));
        }
        ulong Root(int i) => roots + (ulong)i * 8;

        var entries = new RangeEntry[n];
        var input = new ulong[n];
        var count = new long[n];
        for (int i = 0; i < n; i++)
        {
            count[i] = BlockDigest.LeafCount(ranges[i].Length);
            input[i] = count[i] == 1 ? Root(i) : scratch + (ulong)next[i] * 8;
            next[i] += count[i];
            entries[i] = new RangeEntry { Source = ranges[i].Source, Destination = ranges[i].Destination, Length = (ulong)ranges[i].Length, Leaves = input[i] };
        }
        LaunchLeaves(entries, stream, maxBlocks);

        var level = new List<LevelEntry>(n);
        while (true)
        {
            level.Clear();
            for (int i = 0; i < n; i++)
            {
                if (count[i] == 1)
                    continue;
                long groups = (count[i] + BlockDigest.Fanout - 1) / BlockDigest.Fanout;
                ulong output = groups == 1 ? Root(i) : scratch + (ulong)next[i] * 8;
                level.Add(new LevelEntry { Input = input[i], Count = (ulong)count[i], Output = output });
                (input[i], count[i]) = (output, groups);
                next[i] += groups;
            }
            if (level.Count == 0)
                break;
            LaunchLevels(CollectionsMarshal.AsSpan(level), stream);
        }
    }

    /// <summary>One launch per <see cref="MaxRanges"/> ranges: a block per tile, or at most <paramref name="maxBlocks"/> (when positive) that stride over the tiles.</summary>
    private void LaunchLeaves(Span<RangeEntry> entries, CudaStream stream, int maxBlocks = 0)
    {
        for (int start = 0; start < entries.Length; start += MaxRanges)
        {
            var batch = new RangeBatch();
            int count = Math.Min(MaxRanges, entries.Length - start);
            ulong tiles = 0;
            for (int i = 0; i < count; i++)
            {
                RangeEntry entry = entries[start + i];
                entry.FirstTile = tiles;
                batch.Entries[i] = entry;
                tiles += (ulong)((BlockDigest.LeafCount((long)entry.Length) + TileLeaves - 1) / TileLeaves);
            }
            batch.Count = (uint)count;
            batch.Tiles = checked((uint)tiles);
            uint blocks = maxBlocks > 0 ? (uint)Math.Min(tiles, (ulong)maxBlocks) : batch.Tiles;
            _leaves.Launch(blocks, TileThreads, stream, new KernelArguments().Add(in batch, 8));
        }
    }

    private void LaunchLevels(Span<LevelEntry> entries, CudaStream stream)
    {
        for (int start = 0; start < entries.Length; start += MaxRanges)
        {
            var batch = new LevelBatch();
            int count = Math.Min(MaxRanges, entries.Length - start);
            ulong blocks = 0;
            for (int i = 0; i < count; i++)
            {
                LevelEntry entry = entries[start + i];
                entry.FirstBlock = blocks;
                batch.Entries[i] = entry;
                ulong groups = (entry.Count + BlockDigest.Fanout - 1) / BlockDigest.Fanout;
                blocks += (groups + LevelThreads - 1) / LevelThreads;
            }
            batch.Count = (uint)count;
            _level.Launch(checked((uint)blocks), LevelThreads, stream, new KernelArguments().Add(in batch, 8));
        }
    }

    /// <summary>Words of scratch for one range's leaves and all its levels above them.</summary>
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
            _scratch = null;
            _scratch = DeviceBuffer.Allocate(Context, words * 8);
        }
    }

    // The kernels' parameter structs (range_desc, range_batch, level_desc, level_batch in digest.cu).

    [StructLayout(LayoutKind.Sequential)]
    private struct RangeEntry
    {
        public ulong Source;
        public ulong Destination; // 0: digest only
        public ulong Length;
        public ulong Leaves;      // 0: copy only
        public ulong FirstTile;
    }

    [InlineArray(MaxRanges)]
    private struct RangeEntries
    {
        private RangeEntry _first;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct RangeBatch
    {
        public uint Count;
        public uint Tiles; // all the ranges' tiles; a launch of fewer blocks strides over them
        public RangeEntries Entries;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct LevelEntry
    {
        public ulong Input;
        public ulong Count;
        public ulong Output;
        public ulong FirstBlock;
    }

    [InlineArray(MaxRanges)]
    private struct LevelEntries
    {
        private LevelEntry _first;
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct LevelBatch
    {
        public uint Count;
        public uint Reserved;
        public LevelEntries Entries;
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

using NcclSwap.Cuda;
using NcclSwap.Testing;

namespace NcclSwap.DataPlane.Tests;

/// <summary>
/// What every <see cref="IBackend"/> must do, written once: the CPU tests run it on the host backend, the
/// GPU suite on the CUDA backend.
/// </summary>
internal static class BackendConformance
{
    /// <summary>Pinned → device → device → pinned across two streams ordered by an event; fills around the copy stay.</summary>
    public static void CopiesThroughStagingInStreamOrder(IBackend backend, int size, int seed)
    {
        byte[] data = TestData.Random(size, seed);
        PinnedBuffer staging = backend.PinnedPool.Rent(size);
        PinnedBuffer result = backend.PinnedPool.Rent(size);
        try
        {
            data.CopyTo(staging.GetSpan(0, size));
            result.GetSpan(0, size).Fill(0xEE);
            using IDeviceBuffer a = backend.Allocate(size);
            using IDeviceBuffer b = backend.Allocate(size + 100);
            using ICopyStream first = backend.CreateStream();
            using ICopyStream second = backend.CreateStream();
            using IDeviceEvent copied = backend.CreateEvent();
            first.FillAsync(b, 0, size + 100, 0x77);
            first.CopyAsync(a, 0, staging, 0, size);
            first.CopyAsync(b, 50, a, 0, size);
            first.Record(copied);
            second.Wait(copied);
            second.CopyAsync(result, 0, b, 50, size);
            second.Synchronize();

            Assert.True(copied.IsComplete);
            Assert.True(data.AsSpan().SequenceEqual(result.GetSpan(0, size)), $"seed {seed}");
            byte[] edges = new byte[50];
            backend.Download(b, 0, edges);
            Assert.All(edges, x => Assert.Equal(0x77, x));
            backend.Download(b, size + 50, edges);
            Assert.All(edges, x => Assert.Equal(0x77, x));
        }
        finally
        {
            backend.PinnedPool.Return(staging);
            backend.PinnedPool.Return(result);
        }
    }

    /// <summary>
    /// Host memory mapped into the backend (as a client's shared memory is): copies between it and device memory
    /// in both directions and host to host, every byte checked; the backend's digests of mapped and device ranges
    /// equal the CPU's; a <see cref="FlakyBackend"/> over it flips exactly one bit of the copy it is told to spoil.
    /// </summary>
    public static unsafe void MapsHostMemoryCopiesAndDigestsIt(IBackend backend, int size, int seed)
    {
        byte[] data = TestData.Random(size, seed);
        nint source = (nint)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)size, 4096);
        nint target = (nint)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)size, 4096);
        try
        {
            data.CopyTo(new Span<byte>((void*)source, size));
            new Span<byte>((void*)target, size).Fill(0x5A);
            using IDeviceBuffer from = backend.MapHost(source, size, readOnly: true, "client tensors");
            using IDeviceBuffer to = backend.MapHost(target, size, readOnly: false, "client slot1");
            using IDeviceBuffer device = backend.Allocate(size);
            Assert.Contains("client slot1", to.ToString());
            using (ICopyStream stream = backend.CreateStream())
            {
                stream.CopyAsync(device, 0, from, 0, size);
                stream.CopyAsync(to, 0, device, 0, size / 2);                // device → mapped host
                stream.CopyAsync(to, size / 2, from, size / 2, size - size / 2); // mapped host → mapped host
                stream.Synchronize();
            }
            Assert.True(data.AsSpan().SequenceEqual(new ReadOnlySpan<byte>((void*)target, size)), $"seed {seed}");

            (long, long)[] ranges = [(0, size), (1, size - 1), (4096, Math.Min(size - 4096, 70_001)), (size - 3, 3), (17, 0)];
            Digest[] expected = ranges.Select(r => BlockDigest.Compute(data.AsSpan((int)r.Item1, (int)r.Item2))).ToArray();
            Assert.Equal(expected, backend.Digests(from, ranges));
            Assert.Equal(expected, backend.Digests(device, ranges));
            Assert.Equal(expected, backend.Digests(to, ranges));

            var flaky = new FlakyBackend(backend);
            flaky.CorruptCopiesInto("slot1");
            using (ICopyStream stream = flaky.CreateStream())
            {
                stream.CopyAsync(device, 0, from, 0, size); // not the target: untouched
                stream.CopyAsync(to, 0, device, 0, size);   // spoiled: one bit in the middle
                stream.Synchronize();
            }
            byte[] spoiled = new ReadOnlySpan<byte>((void*)target, size).ToArray();
            int[] differing = Enumerable.Range(0, size).Where(i => spoiled[i] != data[i]).ToArray();
            Assert.Equal([size / 2], differing);
            Assert.Equal(0x10, spoiled[size / 2] ^ data[size / 2]);
            Assert.Equal(1, flaky.Corrupted);
            Assert.NotEqual(expected[0], flaky.Digests(to, [(0, size)])[0]);
            using (ICopyStream stream = flaky.CreateStream()) // the rule is used up: the next copy is clean
            {
                stream.CopyAsync(to, 0, from, 0, size);
                stream.Synchronize();
            }
            Assert.True(data.AsSpan().SequenceEqual(new ReadOnlySpan<byte>((void*)target, size)));
        }
        finally
        {
            System.Runtime.InteropServices.NativeMemory.AlignedFree((void*)source);
            System.Runtime.InteropServices.NativeMemory.AlignedFree((void*)target);
        }
    }

    /// <summary>Bad ranges are refused and leave the buffer's bytes as they were.</summary>
    public static void RefusesOutOfRangeCopiesAndChangesNothing(IBackend backend)
    {
        using IDeviceBuffer buffer = backend.Allocate(100);
        byte[] original = TestData.Random(100, seed: 5);
        backend.Upload(original, buffer);
        Assert.Throws<ArgumentOutOfRangeException>(() => backend.Upload(new byte[10], buffer, offset: 95));
        using ICopyStream stream = backend.CreateStream();
        using IDeviceBuffer other = backend.Allocate(50);
        Assert.Throws<ArgumentOutOfRangeException>(() => stream.CopyAsync(other, 0, buffer, 60, 50));
        Assert.Throws<ArgumentOutOfRangeException>(() => stream.FillAsync(buffer, 90, 11, 0));
        stream.Synchronize();
        byte[] after = new byte[100];
        backend.Download(buffer, 0, after);
        Assert.Equal(original, after);
    }
    /// <summary>
    /// Buffers seen as one <see cref="SegmentedBuffer"/>: copies and digests of ranges in any segment equal those
    /// of the segment itself and the CPU's; a range that spans a gap or two segments is refused.
    /// </summary>
    public static void SegmentsCopyAndDigestLikeTheirParts(IBackend backend, int seed)
    {
        var random = new Random(seed);
        int[] sizes = [1_048_573, 4099, 65_537];
        long[] at = [0, 1_048_573 + 300, 1_048_573 + 300 + 4099 + 256];
        var parts = new List<(long At, IDeviceBuffer Buffer)>();
        var data = new List<byte[]>();
        try
        {
            for (int i = 0; i < sizes.Length; i++)
            {
                byte[] bytes = TestData.Random(sizes[i], random.Next());
                IDeviceBuffer part = backend.Allocate(sizes[i]);
                backend.Upload(bytes, part);
                parts.Add((at[i], part));
                data.Add(bytes);
            }
            using var segmented = new SegmentedBuffer(parts, "test region");
            parts = [];
            var ranges = new List<(long Offset, long Length)> { (at[0] + 17, 100_000), (at[1], 4099), (at[2] + 65_000, 537), (at[1] + 1, 0), (at[0], 1_048_573) };
            Digest[] digests = backend.Digests(segmented, ranges);
            for (int i = 0; i < ranges.Count; i++)
            {
                int part = Array.FindLastIndex(at, a => a <= ranges[i].Offset);
                byte[] bytes = data[part].AsSpan((int)(ranges[i].Offset - at[part]), (int)ranges[i].Length).ToArray();
                Assert.True(BlockDigest.Compute(bytes) == digests[i], $"range {i}, seed {seed}");
            }

            using IDeviceBuffer flat = backend.Allocate(8192);
            using (ICopyStream stream = backend.CreateStream())
            {
                SegmentedBuffer.CopyAsync(stream, flat, 0, segmented, at[1], 4099);
                SegmentedBuffer.CopyAsync(stream, flat, 4099, segmented, at[2] + 10, 4000);
                SegmentedBuffer.CopyAsync(stream, segmented, at[0] + 5, flat, 0, 1000); // into a segment, too
                stream.Synchronize();
            }
            byte[] copied = new byte[8099];
            backend.Download(flat, 0, copied);
            Assert.True(copied.AsSpan(0, 4099).SequenceEqual(data[1]), $"seed {seed}");
            Assert.True(copied.AsSpan(4099, 4000).SequenceEqual(data[2].AsSpan(10, 4000)), $"seed {seed}");
            Assert.True(backend.Digests(segmented, [(at[0] + 5, 1000)])[0] == BlockDigest.Compute(data[1].AsSpan(0, 1000)), $"seed {seed}");

            Assert.False(SegmentedBuffer.Holds(segmented, at[1] - 10, 20)); // the gap before segment 1
            Assert.False(SegmentedBuffer.Holds(segmented, at[1] + 4000, 400)); // past segment 1's end
            Assert.True(SegmentedBuffer.Holds(segmented, at[2], 65_537));
            var e = Assert.Throws<ArgumentOutOfRangeException>(() => segmented.Resolve(at[0] + 1_048_500, 200));
            Assert.Contains("does not lie within one of its segments", e.Message);
        }
        finally
        {
            foreach (var (_, part) in parts)
                part.Dispose();
        }
    }

    /// <summary>
    /// A digest queue on a stream: digests of ranges (an empty one, odd offsets and lengths) and digesting copies,
    /// enqueued behind a copy on the same stream and collected at once, equal the CPU's digests of the same bytes, in
    /// enqueue order; the copies land; after a collect the indices start again. <paramref name="size"/> large enough
    /// makes the GPU's leaf kernel, whose blocks are capped, stride over several tiles per block.
    /// </summary>
    public static void DigestQueueMatchesTheCpu(IBackend backend, int size, int seed)
    {
        byte[] data = TestData.Random(size, seed);
        using IDeviceBuffer staged = backend.Allocate(size);
        using IDeviceBuffer from = backend.Allocate(size);
        using IDeviceBuffer to = backend.Allocate(size);
        backend.Upload(data, staged);
        byte[] background = TestData.Random(size, seed + 1);
        backend.Upload(background, to);
        using ICopyStream stream = backend.CreateStream();
        using IDigestQueue queue = backend.CreateDigestQueue(stream);
        stream.CopyAsync(from, 0, staged, 0, size); // the digests read what this copy writes: stream order
        (long Offset, long Length)[] ranges = [(0, size / 2), (size / 2 + 1, size / 3), (size - 4097, 4097), (7, 0), (5, 100)];
        CopyRun[] runs = [new(0, 16, size / 4), new(size / 2 + 3, size / 4 + 1000, 12_345)];
        Assert.Equal(0, queue.Digest(from, ranges[..3]));
        Assert.Equal(3, queue.CopyAndDigest(to, from, runs));
        Assert.Equal(5, queue.Digest(from, ranges[3..]));
        Digest[] got = queue.Collect();
        Digest Cpu(long offset, long length) => BlockDigest.Compute(data.AsSpan((int)offset, (int)length));
        Digest[] expected = [.. ranges[..3].Select(r => Cpu(r.Offset, r.Length)), .. runs.Select(r => Cpu(r.From, r.Bytes)), .. ranges[3..].Select(r => Cpu(r.Offset, r.Length))];
        Assert.Equal(expected, got);
        byte[] landed = new byte[size];
        backend.Download(to, 0, landed);
        foreach (CopyRun run in runs)
            data.AsSpan((int)run.From, (int)run.Bytes).CopyTo(background.AsSpan((int)run.To));
        Assert.True(background.AsSpan().SequenceEqual(landed), $"{backend.Kind}: the queue's copies did not land as the runs say (seed {seed})");
        Assert.Equal(0, queue.Digest(from, [(1, 2)]));
        Assert.Equal([Cpu(1, 2)], queue.Collect());
    }

    /// <summary>
    /// Many runs in one call (more than one kernel launch holds on CUDA), from a segmented source into device memory
    /// and into mapped host memory: lengths from 0 to several tiles, odd and 16-byte-aligned offsets (copy engines
    /// and kernel on CUDA). Every run lands, nothing between runs changes, and <see cref="IBackend.CopyAndDigest"/>
    /// returns the CPU's digest of each run's source bytes.
    /// </summary>
    public static unsafe void CopiesManyRunsAtOnceAndDigestsWhatItRead(IBackend backend, int seed)
    {
        var random = new Random(seed);
        int[] sizes = [3 * 1_048_576 + 5, 700_000];
        long[] at = [0, 4L << 20];
        var data = new List<byte[]>();
        var parts = new List<(long At, IDeviceBuffer Buffer)>();
        for (int i = 0; i < sizes.Length; i++)
        {
            data.Add(TestData.Random(sizes[i], random.Next()));
            parts.Add((at[i], backend.Allocate(sizes[i])));
            backend.Upload(data[i], parts[i].Buffer);
        }
        using var source = new SegmentedBuffer(parts, "test source");
        const int Target = 8 << 20;
        nint host = (nint)System.Runtime.InteropServices.NativeMemory.AlignedAlloc(Target, 4096);
        try
        {
            using IDeviceBuffer device = backend.Allocate(Target);
            using IDeviceBuffer mapped = backend.MapHost(host, Target, readOnly: false, "mapped target");
            foreach ((IDeviceBuffer target, int count, bool digest) in new[] { (device, 700, false), (device, 300, true), (mapped, 40, true) })
            {
                byte[] background = TestData.Random(Target, random.Next());
                backend.Upload(background, target);
                byte[] expected = (byte[])background.Clone();
                var runs = new List<CopyRun>();
                var from = new List<byte[]>();
                long next = 0;
                for (int r = 0; r < count; r++)
                {
                    int part = r == 1 ? 0 : random.Next(sizes.Length);
                    long length = r switch
                    {
                        0 => 0,
                        1 => 1_048_576 + 4096 * 3 + 17, // several tiles, a short last leaf
                        2 => 4096 * 130,
                        _ => random.Next(4) == 0 ? 4096 * random.Next(1, 4) : random.Next(1, 9000),
                    };
                    bool aligned = random.Next(3) > 0;
                    long offset = random.NextInt64(sizes[part] - length + 1);
                    long to = next + (aligned ? 0 : random.Next(1, 16));
                    if (aligned)
                        offset &= ~15L;
                    if (to + length > Target)
                        break;
                    runs.Add(new CopyRun(at[part] + offset, to, length));
                    from.Add(data[part].AsSpan((int)offset, (int)length).ToArray());
                    from[^1].CopyTo(expected, to);
                    next = (to + length + 16 + random.Next(64)) & ~15L;
                }
                if (digest)
                {
                    Digest[] digests = backend.CopyAndDigest(target, source, runs);
                    Assert.Equal(runs.Count, digests.Length);
                    for (int r = 0; r < runs.Count; r++)
                        Assert.True(BlockDigest.Compute(from[r]) == digests[r], $"run {r} of {runs.Count} ({runs[r]}), seed {seed}");
                }
                else
                    using (ICopyStream stream = backend.CreateStream())
                    {
                        stream.CopyAsync(target, source, runs);
                        stream.Synchronize();
                    }
                byte[] after = new byte[Target];
                backend.Download(target, 0, after);
                int wrong = after.AsSpan().CommonPrefixLength(expected);
                Assert.True(wrong == Target, $"{target}: byte {wrong} differs after {runs.Count} runs (digest: {digest}), seed {seed}");
            }
        }
        finally
        {
            System.Runtime.InteropServices.NativeMemory.AlignedFree((void*)host);
        }
    }

    /// <summary>
    /// A stream waits for a 32-bit word of mapped host memory that the CPU writes later, and writes one after its
    /// copies, which the CPU then reads with the copy's bytes in place (the gate of a GPU consumer).
    /// </summary>
    public static unsafe void StreamsWaitForAndWriteWords(IBackend backend, int seed)
    {
        nint page = (nint)System.Runtime.InteropServices.NativeMemory.AlignedAlloc(4096, 4096);
        try
        {
            new Span<byte>((void*)page, 4096).Clear();
            byte[] data = TestData.Random(1 << 20, seed);
            using IDeviceBuffer words = backend.MapHost(page, 4096, readOnly: false, "gate");
            using IDeviceBuffer source = backend.Allocate(data.Length);
            using IDeviceBuffer target = backend.Allocate(data.Length);
            backend.Upload(data, source);
            using ICopyStream stream = backend.CreateStream();
            using IDeviceEvent copied = backend.CreateEvent();
            long written = 0;
            var writer = Task.Run(() =>
            {
                Thread.Sleep(200);
                written = System.Diagnostics.Stopwatch.GetTimestamp();
                Volatile.Write(ref *(uint*)page, 7u); // past 5: a cyclic greater-or-equal lets it through
            });
            stream.WaitValue(words, 0, 5);
            stream.CopyAsync(target, 0, source, 0, data.Length);
            stream.WriteValue(words, 64, 3);
            stream.Record(copied);
            copied.Synchronize();
            long finished = System.Diagnostics.Stopwatch.GetTimestamp();
            writer.Wait();
            Assert.True(written != 0 && written <= finished, "the copy ran before the word it waited for was written");
            Assert.Equal(3u, Volatile.Read(ref *(uint*)(page + 64)));
            byte[] result = new byte[data.Length];
            backend.Download(target, 0, result);
            Assert.True(result.AsSpan().SequenceEqual(data), $"seed {seed}");
        }
        finally
        {
            System.Runtime.InteropServices.NativeMemory.AlignedFree((void*)page);
        }
    }

    /// <summary>
    /// Strided copies (a tensor's part of every row, as a transfer plan packs it): several rows with source pitch
    /// wider than the row and a packed destination, rows at odd offsets and widths, single rows, and a copy into a
    /// destination that is strided too; checked against rows copied one by one on the CPU. Bytes outside the rows stay.
    /// </summary>
    public static void StridedCopiesLandRowByRow(IBackend backend, int seed)
    {
        const int Size = 3 * 1_048_576 + 77;
        byte[] source = TestData.Random(Size, seed), destination = TestData.Random(Size, seed + 1);
        StridedCopy[] copies =
        [
            new(From: 0, FromPitch: 8192, To: 0, ToPitch: 2048, Bytes: 2048, Rows: 256),        // column part of a [256, 4096] bf16
            new(From: 1_048_576 + 3, FromPitch: 1000, To: 600_001, ToPitch: 384, Bytes: 384, Rows: 700),
            new(From: 2_000_000, FromPitch: 0, To: 900_000, ToPitch: 0, Bytes: 123_457, Rows: 1), // a plain run
            new(From: 2_500_001, FromPitch: 96, To: 1_500_000, ToPitch: 200, Bytes: 24, Rows: 4000), // strided on both sides
            new(From: 2_600_000, FromPitch: 50_000, To: 2_700_000, ToPitch: 40_016, Bytes: 40_000, Rows: 3), // rows longer than a kernel's chunk
        ];
        byte[] expected = (byte[])destination.Clone();
        foreach (StridedCopy copy in copies)
            foreach (CopyRun run in copy.Runs())
                source.AsSpan((int)run.From, (int)run.Bytes).CopyTo(expected.AsSpan((int)run.To));

        using IDeviceBuffer from = backend.Allocate(Size);
        using IDeviceBuffer to = backend.Allocate(Size);
        backend.Upload(source, from);
        backend.Upload(destination, to);
        using (ICopyStream stream = backend.CreateStream())
        {
            stream.CopyAsync(to, from, copies);
            stream.Synchronize();
        }
        byte[] got = new byte[Size];
        backend.Download(to, 0, got);
        Assert.True(expected.AsSpan().SequenceEqual(got), $"{backend.Kind}: strided copies differ from the rows copied one by one (seed {seed})");
    }
}

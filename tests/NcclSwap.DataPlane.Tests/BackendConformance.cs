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
}

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

using NcclSwap.Cuda;
using NcclSwap.DataPlane;
using NcclSwap.Testing;

namespace NcclSwap.Gpu.Tests;

public class CudaBackendTests
{
    [Fact]
    public void The_backend_seam_copies_through_pinned_staging_and_orders_streams_by_events()
    {
        Gpu.RequireContext().Dispose();
        using var backend = new CudaBackend(0);
        Assert.Equal("cuda", backend.Kind);
        const int size = 6_000_001;
        byte[] data = TestData.Random(size, seed: 81);
        PinnedBuffer staging = backend.PinnedPool.Rent(size);
        PinnedBuffer result = backend.PinnedPool.Rent(size);
        try
        {
            data.CopyTo(staging.GetSpan(0, size));
            result.GetSpan(0, size).Fill(0xEE);
            using IDeviceBuffer a = backend.Allocate(size);
            using IDeviceBuffer b = backend.Allocate(size + 64);
            using ICopyStream first = backend.CreateStream();
            using ICopyStream second = backend.CreateStream();
            using IDeviceEvent copied = backend.CreateEvent();
            first.FillAsync(b, 0, 64, 0x33);
            first.CopyAsync(a, 0, staging, 0, size);
            first.CopyAsync(b, 64, a, 0, size);
            first.Record(copied);
            second.Wait(copied);
            second.CopyAsync(result, 0, b, 64, size);
            second.Synchronize();
            Assert.True(copied.IsComplete);
            Assert.True(data.AsSpan().SequenceEqual(result.GetSpan(0, size)));
            byte[] head = new byte[64];
            backend.Download(b, 0, head);
            Assert.All(head, x => Assert.Equal(0x33, x));
        }
        finally
        {
            backend.PinnedPool.Return(staging);
            backend.PinnedPool.Return(result);
        }
    }
}

using NcclSwap.Cuda;
using NcclSwap.Testing;

namespace NcclSwap.DataPlane.Tests;

public class HostBackendTests
{
    [Fact]
    public void Upload_and_download_round_trip_random_bytes_of_odd_sizes()
    {
        using var backend = new HostBackend();
        foreach (int size in TestData.OddSizes)
        {
            byte[] data = TestData.Random(size, seed: size);
            using IDeviceBuffer buffer = backend.Allocate(size + 7);
            backend.Upload(data, buffer, offset: 7);
            byte[] back = new byte[size];
            backend.Download(buffer, 7, back);
            Assert.Equal(data, back);
        }
    }

    [Fact]
    public void Stream_copies_pinned_to_device_to_device_to_pinned_in_order()
    {
        using var backend = new HostBackend();
        const int size = 1_000_003;
        byte[] data = TestData.Random(size, seed: 11);
        PinnedBuffer staging = backend.PinnedPool.Rent(size);
        PinnedBuffer result = backend.PinnedPool.Rent(size);
        try
        {
            data.CopyTo(staging.Span);
            result.Span.Fill(0xEE);
            using IDeviceBuffer a = backend.Allocate(size);
            using IDeviceBuffer b = backend.Allocate(size + 100);
            using ICopyStream stream = backend.CreateStream();
            using IDeviceEvent done = backend.CreateEvent();
            stream.FillAsync(b, 0, size + 100, 0x77);
            stream.CopyAsync(a, 0, staging, 0, size);
            stream.CopyAsync(b, 50, a, 0, size);
            stream.CopyAsync(result, 0, b, 50, size);
            stream.Record(done);
            stream.Wait(done);
            stream.Synchronize();
            Assert.True(done.IsComplete);
            Assert.Equal(data, result.GetSpan(0, size).ToArray());
            byte[] edges = new byte[50];
            backend.Download(b, 0, edges);
            Assert.All(edges, x => Assert.Equal(0x77, x));
        }
        finally
        {
            backend.PinnedPool.Return(staging);
            backend.PinnedPool.Return(result);
        }
    }

    [Fact]
    public void Out_of_range_copies_are_refused_and_change_nothing()
    {
        using var backend = new HostBackend();
        using IDeviceBuffer buffer = backend.Allocate(100);
        byte[] original = TestData.Random(100, seed: 5);
        backend.Upload(original, buffer);
        Assert.Throws<ArgumentOutOfRangeException>(() => backend.Upload(new byte[10], buffer, offset: 95));
        using ICopyStream stream = backend.CreateStream();
        using IDeviceBuffer other = backend.Allocate(50);
        Assert.Throws<ArgumentOutOfRangeException>(() => stream.CopyAsync(other, 0, buffer, 60, 50));
        byte[] after = new byte[100];
        backend.Download(buffer, 0, after);
        Assert.Equal(original, after);
    }

    [Fact]
    public void A_buffer_of_another_backend_is_refused_by_name()
    {
        using var backend = new HostBackend();
        using ICopyStream stream = backend.CreateStream();
        var e = Assert.Throws<ArgumentException>(() => stream.FillAsync(new ForeignBuffer(), 0, 1, 0));
        Assert.Contains("does not belong to the host backend", e.Message);
    }

    [Fact]
    public void Backends_are_chosen_by_name()
    {
        using (IBackend host = Backend.Create("host"))
            Assert.Equal("host", host.Kind);
        using (IBackend auto = Backend.Create("auto"))
            Assert.Equal(CudaDriver.IsSupported ? "cuda" : "host", auto.Kind);
        var e = Assert.Throws<ArgumentException>(() => Backend.Create("tpu"));
        Assert.Contains("unknown backend 'tpu'", e.Message);
        if (!CudaDriver.IsSupported)
            Assert.Throws<GpuUnavailableException>(() => Backend.Create("cuda"));
    }

    private sealed class ForeignBuffer : IDeviceBuffer
    {
        public long Length => 1;

        public void Dispose()
        {
        }

        public override string ToString() => "foreign buffer";
    }
}

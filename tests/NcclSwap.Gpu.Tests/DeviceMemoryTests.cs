using System.Runtime.InteropServices;
using NcclSwap.Cuda;
using NcclSwap.Testing;

namespace NcclSwap.Gpu.Tests;

public class DeviceMemoryTests
{
    [Fact]
    public void Synchronous_round_trips_are_bit_exact_at_odd_sizes_and_offsets()
    {
        using CudaContext context = Gpu.RequireContext();
        foreach (int size in TestData.OddSizes)
        {
            byte[] data = TestData.Random(size, seed: size);
            using var a = DeviceBuffer.Allocate(context, size + 13);
            using var b = DeviceBuffer.Allocate(context, size + 5);
            a.Fill(0xCC);
            b.Fill(0xDD);
            a.CopyFrom(data, offset: 13);
            b.CopyFrom(a, sourceOffset: 13, offset: 5, length: size);
            byte[] back = new byte[size];
            b.CopyTo(back, offset: 5);
            Assert.Equal(data, back);
            byte[] head = new byte[5];
            b.CopyTo(head);
            Assert.All(head, x => Assert.Equal(0xDD, x));
        }
    }

    [Fact]
    public void Async_copies_on_streams_are_bit_exact()
    {
        using CudaContext context = Gpu.RequireContext();
        const int size = 8 * 1_048_576 + 3;
        byte[] data = TestData.Random(size, seed: 21);
        using var staging = PinnedBuffer.Allocate(context, size);
        using var result = PinnedBuffer.Allocate(context, size);
        using var a = DeviceBuffer.Allocate(context, size);
        using var b = DeviceBuffer.Allocate(context, size + 1000);
        using var upload = CudaStream.Create(context);
        using var download = CudaStream.Create(context);
        using var uploaded = CudaEvent.Create(context);
        data.CopyTo(staging.Span);
        result.Span.Fill(0xEE);

        upload.FillAsync(b, 0, size + 1000, 0x11);
        upload.CopyAsync(a, 0, staging, 0, size);
        upload.CopyAsync(b, 1000, a, 0, size);
        upload.Record(uploaded);
        download.Wait(uploaded);             // cross-stream order through an event
        download.CopyAsync(result, 0, b, 1000, size);
        download.Synchronize();

        Assert.True(upload.IsIdle && download.IsIdle && uploaded.IsComplete);
        Assert.True(data.AsSpan().SequenceEqual(result.Span));
        byte[] filled = new byte[1000];
        b.CopyTo(filled);
        Assert.All(filled, x => Assert.Equal(0x11, x));
    }

    [Fact]
    public unsafe void Registered_host_memory_copies_asynchronously()
    {
        using CudaContext context = Gpu.RequireContext();
        const int size = 3 * 1_048_576 + 1;
        void* memory = NativeMemory.AlignedAlloc(size, 4096);
        try
        {
            var span = new Span<byte>(memory, size);
            byte[] data = TestData.Random(size, seed: 31);
            data.CopyTo(span);
            using (var registered = PinnedBuffer.Register(context, (nint)memory, size))
            {
                Assert.Equal(PinnedKind.Registered, registered.Kind);
                using var device = DeviceBuffer.Allocate(context, size);
                using var stream = CudaStream.Create(context);
                stream.CopyAsync(device, 0, registered, 0, size);
                stream.FillAsync(device, 0, 7, 0x42);
                stream.Synchronize(); // the host memory is read asynchronously: only now may it change
                span.Fill(0);
                stream.CopyAsync(registered, 0, device, 0, size);
                stream.Synchronize();
                Assert.All(span[..7].ToArray(), x => Assert.Equal(0x42, x));
                Assert.True(data.AsSpan(7).SequenceEqual(span[7..]));
            }
            // Unregistered, the memory is still the caller's and still holds the bytes.
            Assert.Equal(0x42, span[0]);
        }
        finally
        {
            NativeMemory.AlignedFree(memory);
        }
    }

    [Fact]
    public void Address_range_and_owning_device_are_queried()
    {
        using CudaContext context = Gpu.RequireContext();
        using var buffer = DeviceBuffer.Allocate(context, 10_000_019);
        (ulong @base, long size) = context.GetAddressRange(buffer.Address + 12_345);
        Assert.Equal(buffer.Address, @base);
        Assert.True(size >= 10_000_019);
        Assert.Equal(0, context.GetPointerDevice(buffer.Address));
        (long free, long total) = context.MemoryInfo;
        Assert.InRange(free, 1, total);
    }

    [Fact]
    public void Pooled_pinned_buffers_are_page_locked_and_reused()
    {
        using CudaContext context = Gpu.RequireContext();
        using var pool = new PinnedBufferPool(length => PinnedBuffer.Allocate(context, length), 64 << 20);
        PinnedBuffer first = pool.Rent(5_000_000);
        Assert.Equal(PinnedKind.DriverAllocated, first.Kind);
        pool.Return(first);
        PinnedBuffer second = pool.Rent(4_500_000);
        Assert.Same(first, second);
        pool.Return(second);
        Assert.Equal(1, pool.Allocations);
    }

    [Fact]
    public void Device_properties_are_read()
    {
        using CudaContext context = Gpu.RequireContext();
        CudaDevice device = context.Device;
        Assert.False(string.IsNullOrWhiteSpace(device.Name));
        Assert.Matches("^[0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\\.[0-9]$", device.PciBusId);
        Assert.Matches("^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", device.Uuid.ToString());
        Assert.True(device.TotalMemory > 1L << 30);
        Assert.True(device.ComputeCapability.Major >= 7);
        Assert.True(device.MultiprocessorCount > 0);
        Assert.True(CudaDriver.Version.Major >= 12);
    }
}

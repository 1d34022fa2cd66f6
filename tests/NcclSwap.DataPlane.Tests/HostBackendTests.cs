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
        BackendConformance.CopiesThroughStagingInStreamOrder(backend, 1_000_003, TestData.NewSeed());
    }

    [Fact]
    public void Host_memory_mapped_in_is_copied_and_digested_like_device_memory_and_a_flaky_backend_spoils_one_bit()
    {
        using var backend = new HostBackend();
        BackendConformance.MapsHostMemoryCopiesAndDigestsIt(backend, 3 * 1_048_576 + 4099, TestData.NewSeed());
    }

    [Fact]
    public void Out_of_range_copies_are_refused_and_change_nothing()
    {
        using var backend = new HostBackend();
        BackendConformance.RefusesOutOfRangeCopiesAndChangesNothing(backend);
    }

    [Fact]
    public void Strided_copies_land_row_by_row()
    {
        using var backend = new HostBackend();
        BackendConformance.StridedCopiesLandRowByRow(backend, TestData.NewSeed());
    }

    [Fact]
    public void Segmented_buffers_copy_and_digest_like_their_parts()
    {
        using var backend = new HostBackend();
        BackendConformance.SegmentsCopyAndDigestLikeTheirParts(backend, TestData.NewSeed());
    }

    [Fact]
    public void A_digest_queue_gives_the_cpu_digests_of_what_its_stream_wrote_in_enqueue_order()
    {
        using var backend = new HostBackend();
        BackendConformance.DigestQueueMatchesTheCpu(backend, 5 * 1_048_576 + 333, TestData.NewSeed());
    }

    [Fact]
    public void Many_runs_copy_in_one_call_and_a_copy_digests_what_it_read()
    {
        using var backend = new HostBackend();
        BackendConformance.CopiesManyRunsAtOnceAndDigestsWhatItRead(backend, TestData.NewSeed());
    }

    [Fact]
    public void A_stream_waits_for_a_word_written_later_and_writes_one_after_its_copies()
    {
        using var backend = new HostBackend();
        BackendConformance.StreamsWaitForAndWriteWords(backend, TestData.NewSeed());
    }

    [Fact]
    public void GPU_memory_by_IPC_handle_is_refused_by_the_host_backend_saying_how_to_fix_it()
    {
        using var backend = new HostBackend();
        var e = Assert.Throws<NotSupportedException>(() => backend.OpenIpc(default, 0, 4096, "region 'slot0' allocation 0"));
        Assert.Contains("region 'slot0' allocation 0 is GPU memory", e.Message);
        Assert.Contains("run the agent with the cuda backend", e.Message);
        Assert.Null(backend.DeviceMemory);
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

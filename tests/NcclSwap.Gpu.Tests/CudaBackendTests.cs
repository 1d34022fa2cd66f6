using NcclSwap.DataPlane;
using NcclSwap.DataPlane.Tests;
using NcclSwap.Testing;

namespace NcclSwap.Gpu.Tests;

[Collection(GpuExclusive.Name)]
public class CudaBackendTests
{
    [Fact]
    public void The_backend_seam_copies_through_pinned_staging_and_orders_streams_by_events()
    {
        Gpu.RequireContext().Dispose();
        using var backend = new CudaBackend(0);
        Assert.Equal("cuda", backend.Kind);
        BackendConformance.CopiesThroughStagingInStreamOrder(backend, 6_000_001, TestData.NewSeed());
    }

    [Fact]
    public void Host_memory_mapped_in_is_copied_and_digested_on_the_gpu_and_a_flaky_backend_spoils_one_bit()
    {
        Gpu.RequireContext().Dispose();
        using var backend = new CudaBackend(0);
        BackendConformance.MapsHostMemoryCopiesAndDigestsIt(backend, 9 * 1_048_576 + 4099, TestData.NewSeed());
    }

    [Fact]
    public void A_digest_queue_gives_the_cpu_digests_while_its_capped_blocks_stride_over_many_tiles()
    {
        Gpu.RequireContext().Dispose();
        using var backend = new CudaBackend(0);
        // 300 MiB: about 600 tiles of 512 KiB against one block per multiprocessor, so each block digests several.
        BackendConformance.DigestQueueMatchesTheCpu(backend, 300 * 1_048_576 + 333, TestData.NewSeed());
    }

    [Fact]
    public void Strided_copies_land_row_by_row_as_2d_copies()
    {
        Gpu.RequireContext().Dispose();
        using var backend = new CudaBackend(0);
        BackendConformance.StridedCopiesLandRowByRow(backend, TestData.NewSeed());
    }

    [Fact]
    public void Out_of_range_copies_are_refused_and_change_nothing()
    {
        Gpu.RequireContext().Dispose();
        using var backend = new CudaBackend(0);
        BackendConformance.RefusesOutOfRangeCopiesAndChangesNothing(backend);
    }

    [Fact]
    public void Segmented_buffers_copy_and_digest_like_their_parts()
    {
        Gpu.RequireContext().Dispose();
        using var backend = new CudaBackend(0);
        BackendConformance.SegmentsCopyAndDigestLikeTheirParts(backend, TestData.NewSeed());
    }

    [Fact]
    public void Many_runs_copy_in_one_launch_and_a_copy_digests_what_it_read_like_the_cpu()
    {
        Gpu.RequireContext().Dispose();
        using var backend = new CudaBackend(0);
        BackendConformance.CopiesManyRunsAtOnceAndDigestsWhatItRead(backend, TestData.NewSeed());
    }

    [Fact]
    public void A_stream_waits_on_the_gpu_for_a_word_the_cpu_writes_later_and_writes_one_after_its_copies()
    {
        Gpu.RequireContext().Dispose();
        using var backend = new CudaBackend(0);
        BackendConformance.StreamsWaitForAndWriteWords(backend, TestData.NewSeed());
    }
}

namespace NcclSwap.Cuda.Tests;

public class PinnedBufferPoolTests
{
    [Theory]
    [InlineData(1, 64 * 1024)]
    [InlineData(64 * 1024, 64 * 1024)]
    [InlineData(64 * 1024 + 1, 128 * 1024)]
    [InlineData(3_000_000, 4_194_304)]
    public void Sizes_round_up_to_power_of_two_classes(long asked, long expected) =>
        Assert.Equal(expected, PinnedBufferPool.SizeClass(asked));

    [Fact]
    public void Returned_buffers_are_reused_and_keep_their_bytes_addressable()
    {
        using var pool = new PinnedBufferPool(PinnedBuffer.AllocatePageable, maxRetainedBytes: 1 << 20);
        PinnedBuffer first = pool.Rent(100_000);
        Assert.Equal(131_072, first.Length);
        byte[] data = Testing.TestData.Random(100_000, seed: 3);
        data.CopyTo(first.Span);
        pool.Return(first);
        Assert.Equal(131_072, pool.RetainedBytes);

        PinnedBuffer again = pool.Rent(70_000);
        Assert.Same(first, again);
        Assert.Equal(data, again.GetSpan(0, 100_000).ToArray());
        Assert.Equal(1, pool.Allocations);
        Assert.Equal(0, pool.RetainedBytes);
        pool.Return(again);
    }

    [Fact]
    public void Buffers_beyond_the_retention_cap_are_freed()
    {
        using var pool = new PinnedBufferPool(PinnedBuffer.AllocatePageable, maxRetainedBytes: 100_000);
        PinnedBuffer a = pool.Rent(65_536);
        PinnedBuffer b = pool.Rent(65_536);
        pool.Return(a);
        pool.Return(b);
        Assert.False(a.IsDisposed);
        Assert.True(b.IsDisposed);
        Assert.Equal(65_536, pool.RetainedBytes);
    }

    [Fact]
    public void Foreign_or_twice_returned_buffers_are_refused()
    {
        using var pool = new PinnedBufferPool(PinnedBuffer.AllocatePageable, maxRetainedBytes: 1 << 20);
        using var foreign = PinnedBuffer.AllocatePageable(4096);
        Assert.Throws<ArgumentException>(() => pool.Return(foreign));
        PinnedBuffer rented = pool.Rent(10);
        pool.Return(rented);
        var twice = Assert.Throws<ArgumentException>(() => pool.Return(rented));
        Assert.Contains("already returned", twice.Message);
    }

    [Fact]
    public void Dispose_frees_held_buffers_and_is_idempotent()
    {
        var pool = new PinnedBufferPool(PinnedBuffer.AllocatePageable, maxRetainedBytes: 1 << 20);
        PinnedBuffer held = pool.Rent(10);
        PinnedBuffer out_ = pool.Rent(10);
        pool.Return(held);
        pool.Dispose();
        pool.Dispose();
        Assert.True(held.IsDisposed);
        pool.Return(out_); // a buffer coming back after Dispose is freed, not kept
        Assert.True(out_.IsDisposed);
        Assert.Throws<ObjectDisposedException>(() => pool.Rent(10));
    }
}

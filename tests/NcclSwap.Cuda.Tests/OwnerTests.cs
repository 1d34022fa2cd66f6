using System.Runtime.CompilerServices;

namespace NcclSwap.Cuda.Tests;

public class OwnerTests
{
    [Fact]
    public void Dispose_is_idempotent_and_later_use_throws()
    {
        var buffer = PinnedBuffer.AllocatePageable(4096);
        buffer.Span.Fill(0xAB);
        buffer.Dispose();
        buffer.Dispose();
        Assert.True(buffer.IsDisposed);
        Assert.Throws<ObjectDisposedException>(() => buffer.GetSpan(0, 1));
    }

    [Fact]
    public void Ranges_outside_a_buffer_are_refused_naming_it()
    {
        using var buffer = PinnedBuffer.AllocatePageable(4096);
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => buffer.GetSpan(4000, 100));
        Assert.Contains("[4000, 4000+100) does not fit in 4096 bytes", e.Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => buffer.GetSpan(-1, 1));
        Assert.Throws<ArgumentOutOfRangeException>(() => ThrowHelper.CheckRange(long.MaxValue, 2, 4096, "x"));
    }

    [Fact]
    public void A_leaked_owner_is_reported_by_its_finalizer_only()
    {
        var reports = new List<string>();
        void OnLeak(string text)
        {
            lock (reports)
                reports.Add(text);
        }
        LeakReport.Leaked += OnLeak;
        try
        {
            LeakOne();
            GC.Collect();
            GC.WaitForPendingFinalizers();
            lock (reports)
                Assert.Contains(reports, r => r.Contains("leaked Pageable host buffer of 12345 bytes"));
        }
        finally
        {
            LeakReport.Leaked -= OnLeak;
        }
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void LeakOne() => PinnedBuffer.AllocatePageable(12345);

    [Fact]
    public void Kernel_arguments_are_packed_at_natural_alignment()
    {
        var arguments = new KernelArguments().Add((ulong)0x1122334455667788).Add(7u).Add((ulong)99).Add((byte)1).Add(2u);
        Assert.Equal(5, arguments.Count);
        Assert.Equal([0, 8, 16, 24, 28], Enumerable.Range(0, 5).Select(arguments.Offset));
        Assert.Equal(0x1122334455667788ul, BitConverter.ToUInt64(arguments.Bytes));
        Assert.Equal(7u, BitConverter.ToUInt32(arguments.Bytes[8..]));
        Assert.Equal(2u, BitConverter.ToUInt32(arguments.Bytes[28..]));
    }

    [Fact]
    public void Native_errors_carry_name_text_and_call()
    {
        var cuda = new CudaException(CuResult.InvalidValue, "CUDA_ERROR_INVALID_VALUE", "invalid argument", "Interop.Cuda.MemcpyDtoH(d, s, n)");
        Assert.Equal("CUDA_ERROR_INVALID_VALUE (1): invalid argument; in Interop.Cuda.MemcpyDtoH(d, s, n)", cuda.Message);
        var nccl = new NcclException(NcclResult.InvalidArgument, "invalid argument", "Broadcast : invalid root 5", "Interop.Nccl.Broadcast(...)");
        Assert.Equal("ncclInvalidArgument (4): invalid argument; last error: Broadcast : invalid root 5; in Interop.Nccl.Broadcast(...)", nccl.Message);
    }
}

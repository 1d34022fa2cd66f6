using NcclSwap.Cuda;
using NcclSwap.Testing;

namespace NcclSwap.Gpu.Tests;

public class FailureTests
{
    [Fact]
    public void An_invalid_device_pointer_raises_a_typed_exception_with_the_native_name()
    {
        using CudaContext context = Gpu.RequireContext();
        using DeviceBuffer bogus = DeviceBuffer.Borrow(context, 0x10, 4096);
        var e = Assert.Throws<CudaException>(() => bogus.CopyTo(new byte[4096]));
        Assert.NotEqual(CuResult.Success, e.Result);
        Assert.StartsWith("CUDA_ERROR_", e.ErrorName);
        Assert.StartsWith(e.ErrorName, e.Message);
        Assert.Contains("Interop.Cuda.MemcpyDtoH", e.Call);

        // The error was not sticky: the context still works.
        using var good = DeviceBuffer.Allocate(context, 1000);
        byte[] data = TestData.Random(1000, seed: 71);
        good.CopyFrom(data);
        byte[] back = new byte[1000];
        good.CopyTo(back);
        Assert.Equal(data, back);
    }

    [Fact]
    public void Invalid_ptx_is_refused_by_name()
    {
        using CudaContext context = Gpu.RequireContext();
        var e = Assert.Throws<CudaException>(() => CudaModule.LoadPtx(context, ".version 7.0\n.target sm_70\nthis is not ptx"));
        Assert.Equal("CUDA_ERROR_INVALID_PTX", e.ErrorName);
        Assert.Contains("ModuleLoadData", e.Call);
    }

    [Fact]
    public void A_bad_nccl_argument_raises_a_typed_exception_with_the_native_name_and_last_error()
    {
        using CudaContext context = Gpu.RequireNccl();
        using var comm = NcclCommunicator.InitRank(context, 1, NcclLibrary.CreateUniqueId(), 0);
        using var buffer = DeviceBuffer.Allocate(context, 1024);
        using var stream = CudaStream.Create(context);
        var e = Assert.Throws<NcclException>(() => comm.Broadcast(buffer.Address, buffer.Address, 1024, root: 5, stream));
        Assert.Equal(NcclResult.InvalidArgument, e.Result);
        Assert.StartsWith("ncclInvalidArgument (4)", e.Message);
        Assert.Contains("Interop.Nccl.Broadcast", e.Call);
        Assert.False(string.IsNullOrWhiteSpace(e.LastError));
    }
}

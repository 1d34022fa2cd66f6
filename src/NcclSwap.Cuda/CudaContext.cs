namespace NcclSwap.Cuda;

/// <summary>
/// A retained primary context of one device: the context the CUDA runtime, PyTorch and NCCL share.
/// Every owner object made from it binds it to the calling thread before each native call, so any
/// thread may use them.
/// </summary>
public sealed class CudaContext : GpuOwner
{
    private CudaContext(CudaDevice device, nint handle) : base(ownsHandle: true)
    {
        Device = device;
        Handle = handle;
    }

    public CudaDevice Device { get; }

    internal nint Handle { get; }

    /// <summary>Retains device <paramref name="ordinal"/>'s primary context; Dispose releases it.</summary>
    public static unsafe CudaContext Retain(int ordinal)
    {
        CudaDevice device = CudaDevice.Get(ordinal);
        nint handle;
        Interop.Cuda.DevicePrimaryCtxRetain(&handle, device.Ordinal).ThrowIfFailed();
        var context = new CudaContext(device, handle);
        context.MakeCurrent();
        return context;
    }

    /// <summary>Binds the context to the calling thread.</summary>
    public void MakeCurrent()
    {
        ThrowIfDisposed();
        Interop.Cuda.CtxSetCurrent(Handle).ThrowIfFailed();
    }

    /// <summary>Waits for all work of the context.</summary>
    public void Synchronize()
    {
        MakeCurrent();
        Interop.Cuda.CtxSynchronize().ThrowIfFailed();
    }

    public unsafe (long Free, long Total) MemoryInfo
    {
        get
        {
            MakeCurrent();
            nuint free, total;
            Interop.Cuda.MemGetInfo(&free, &total).ThrowIfFailed();
            return ((long)free, (long)total);
        }
    }

    /// <summary>The allocation that contains <paramref name="address"/>: its base address and size.</summary>
    public unsafe (ulong Base, long Size) GetAddressRange(ulong address)
    {
        MakeCurrent();
        ulong @base;
        nuint size;
        Interop.Cuda.MemGetAddressRange(&@base, &size, address).ThrowIfFailed();
        return (@base, (long)size);
    }

    /// <summary>The ordinal of the device that owns <paramref name="address"/>.</summary>
    public unsafe int GetPointerDevice(ulong address)
    {
        MakeCurrent();
        int ordinal;
        Interop.Cuda.PointerGetAttribute(&ordinal, Interop.Cuda.PointerAttribute.DeviceOrdinal, address).ThrowIfFailed();
        return ordinal;
    }

    private protected override void Release() => Interop.Cuda.DevicePrimaryCtxRelease(Device.Ordinal).ThrowIfFailed();

    public override string ToString() => $"primary context of {Device}";
}

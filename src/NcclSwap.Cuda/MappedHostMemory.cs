namespace NcclSwap.Cuda;

/// <summary>
/// Host memory owned elsewhere (a shared-memory mapping of another process's region, say), page-locked with
/// <c>cuMemHostRegister</c> and mapped into the device's address space, so that copies on a stream and kernels
/// reach it like device memory through <see cref="Buffer"/>. Dispose unregisters it and frees nothing; the
/// memory must stay mapped until then.
/// </summary>
public sealed unsafe class MappedHostMemory : GpuOwner
{
    private MappedHostMemory(CudaContext context, nint pointer, long length, DeviceBuffer buffer) : base(ownsHandle: true)
    {
        Context = context;
        Pointer = pointer;
        Length = length;
        Buffer = buffer;
    }

    public CudaContext Context { get; }

    public nint Pointer { get; }

    public long Length { get; }

    /// <summary>The device-side view: valid for stream copies and kernel arguments while this object lives.</summary>
    public DeviceBuffer Buffer { get; }

    /// <summary>Registers <paramref name="length"/> bytes at <paramref name="pointer"/>; <paramref name="readOnly"/> for memory mapped without write access.</summary>
    public static MappedHostMemory Register(CudaContext context, nint pointer, long length, bool readOnly)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        context.MakeCurrent();
        uint flags = Interop.Cuda.MemHostRegisterPortable | Interop.Cuda.MemHostRegisterDeviceMap | (readOnly ? Interop.Cuda.MemHostRegisterReadOnly : 0);
        Interop.Cuda.MemHostRegister((void*)pointer, checked((nuint)length), flags).ThrowIfFailed();
        try
        {
            ulong device;
            Interop.Cuda.MemHostGetDevicePointer(&device, (void*)pointer, 0).ThrowIfFailed();
            return new MappedHostMemory(context, pointer, length, DeviceBuffer.Borrow(context, device, length));
        }
        catch
        {
            Interop.Cuda.MemHostUnregister((void*)pointer);
            throw;
        }
    }

    private protected override void Release()
    {
        Context.MakeCurrent();
        Interop.Cuda.MemHostUnregister((void*)Pointer).ThrowIfFailed();
    }

    public override string ToString() => $"mapped host memory of {Length} bytes at 0x{Pointer:x} on {Context.Device}";
}

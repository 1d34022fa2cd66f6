namespace NcclSwap.Cuda;

/// <summary>
/// A range of device memory: either an allocation this object owns (<see cref="Allocate"/>) or a view of
/// memory owned elsewhere (<see cref="Borrow"/>: an engine's tensor, an IPC mapping), which Dispose leaves alone.
/// </summary>
public sealed class DeviceBuffer : GpuOwner
{
    private DeviceBuffer(CudaContext context, ulong address, long length, bool owns) : base(owns)
    {
        Context = context;
        Address = address;
        Length = length;
    }

    public CudaContext Context { get; }

    /// <summary>The device address (a <c>CUdeviceptr</c>).</summary>
    public ulong Address { get; }

    public long Length { get; }

    public static unsafe DeviceBuffer Allocate(CudaContext context, long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        context.MakeCurrent();
        ulong address;
        Interop.Cuda.MemAlloc(&address, checked((nuint)length)).ThrowIfFailed();
        return new DeviceBuffer(context, address, length, owns: true);
    }

    /// <summary>A non-owning view of <paramref name="length"/> bytes at <paramref name="address"/>.</summary>
    public static DeviceBuffer Borrow(CudaContext context, ulong address, long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        return new DeviceBuffer(context, address, length, owns: false);
    }

    /// <summary>The device address of byte <paramref name="offset"/> after checking that <paramref name="length"/> bytes fit there.</summary>
    public ulong At(long offset, long length)
    {
        ThrowIfDisposed();
        ThrowHelper.CheckRange(offset, length, Length, ToString());
        return Address + (ulong)offset;
    }

    /// <summary>Copies host bytes into the buffer at <paramref name="offset"/>; the bytes are on the device when it returns.</summary>
    public unsafe void CopyFrom(ReadOnlySpan<byte> source, long offset = 0)
    {
        ulong destination = At(offset, source.Length);
        Context.MakeCurrent();
        fixed (byte* s = source)
            Interop.Cuda.MemcpyHtoD(destination, s, (nuint)source.Length).ThrowIfFailed();
        WaitForDefaultStream();
    }

    /// <summary>Copies bytes from <paramref name="offset"/> into <paramref name="destination"/> (synchronous).</summary>
    public unsafe void CopyTo(Span<byte> destination, long offset = 0)
    {
        ulong source = At(offset, destination.Length);
        Context.MakeCurrent();
        fixed (byte* d = destination)
            Interop.Cuda.MemcpyDtoH(d, source, (nuint)destination.Length).ThrowIfFailed();
    }

    /// <summary>Copies <paramref name="length"/> bytes device to device; done when it returns.</summary>
    public void CopyFrom(DeviceBuffer source, long sourceOffset, long offset, long length)
    {
        ulong from = source.At(sourceOffset, length);
        ulong to = At(offset, length);
        Context.MakeCurrent();
        Interop.Cuda.MemcpyDtoD(to, from, (nuint)length).ThrowIfFailed();
        WaitForDefaultStream();
    }

    /// <summary>Sets every byte of the buffer to <paramref name="value"/>; done when it returns.</summary>
    public void Fill(byte value)
    {
        ulong address = At(0, Length);
        Context.MakeCurrent();
        Interop.Cuda.MemsetD8(address, value, (nuint)Length).ThrowIfFailed();
        WaitForDefaultStream();
    }

    // The "synchronous" driver calls are not all synchronous: a pageable H2D copy may return before its
    // DMA lands, and device-to-device copies and memsets return at once. They run on the legacy default
    // stream, which the project's non-blocking streams do not wait for; so wait for it here, making these
    // methods complete when they return. (D2H to pageable memory is synchronous already.)
    private static void WaitForDefaultStream() => Interop.Cuda.StreamSynchronize(0).ThrowIfFailed();

    /// <summary>The IPC handle of the allocation that contains this buffer, and this buffer's offset in it.</summary>
    public unsafe (CuIpcMemHandle Handle, long Offset) ExportIpcHandle()
    {
        ThrowIfDisposed();
        (ulong @base, _) = Context.GetAddressRange(Address);
        CuIpcMemHandle handle;
        Interop.Cuda.IpcGetMemHandle(&handle, Address).ThrowIfFailed();
        return (handle, (long)(Address - @base));
    }

    private protected override void Release()
    {
        Context.MakeCurrent();
        Interop.Cuda.MemFree(Address).ThrowIfFailed();
    }

    public override string ToString() => $"device buffer of {Length} bytes at 0x{Address:x} on {Context.Device}";
}

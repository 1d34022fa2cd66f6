namespace NcclSwap.Cuda;

/// <summary>A CUDA stream: copies, memsets, kernels and event operations run on it in order.</summary>
public sealed class CudaStream : GpuOwner
{
    private CudaStream(CudaContext context, nint handle, bool owns) : base(owns)
    {
        Context = context;
        Handle = handle;
    }

    public CudaContext Context { get; }

    /// <summary>The <c>CUstream</c> (the same object as a <c>cudaStream_t</c>).</summary>
    public nint Handle { get; }

    /// <summary>A new stream that does not synchronise with the legacy default stream.</summary>
    public static unsafe CudaStream Create(CudaContext context)
    {
        context.MakeCurrent();
        nint handle;
        Interop.Cuda.StreamCreate(&handle, Interop.Cuda.StreamNonBlocking).ThrowIfFailed();
        return new CudaStream(context, handle, owns: true);
    }

    /// <summary>A non-owning wrapper of a stream made elsewhere (e.g. <c>torch.cuda.Stream.cuda_stream</c>).</summary>
    public static CudaStream Borrow(CudaContext context, nint handle) => new(context, handle, owns: false);

    /// <summary>Host to device from pinned memory.</summary>
    public unsafe void CopyAsync(DeviceBuffer destination, long destinationOffset, PinnedBuffer source, long sourceOffset, long length)
    {
        ulong to = destination.At(destinationOffset, length);
        source.ThrowIfDisposed();
        ThrowHelper.CheckRange(sourceOffset, length, source.Length, source.ToString());
        Bind();
        Interop.Cuda.MemcpyHtoDAsync(to, (byte*)source.Pointer + sourceOffset, (nuint)length, Handle).ThrowIfFailed();
    }

    /// <summary>Device to host into pinned memory.</summary>
    public unsafe void CopyAsync(PinnedBuffer destination, long destinationOffset, DeviceBuffer source, long sourceOffset, long length)
    {
        ulong from = source.At(sourceOffset, length);
        destination.ThrowIfDisposed();
        ThrowHelper.CheckRange(destinationOffset, length, destination.Length, destination.ToString());
        Bind();
        Interop.Cuda.MemcpyDtoHAsync((byte*)destination.Pointer + destinationOffset, from, (nuint)length, Handle).ThrowIfFailed();
    }

    /// <summary>Device to device; either buffer may also be mapped host memory (<see cref="MappedHostMemory"/>).</summary>
    public void CopyAsync(DeviceBuffer destination, long destinationOffset, DeviceBuffer source, long sourceOffset, long length)
    {
        ulong to = destination.At(destinationOffset, length);
        ulong from = source.At(sourceOffset, length);
        Bind();
        Interop.Cuda.MemcpyAsync(to, from, (nuint)length, Handle).ThrowIfFailed();
    }

    /// <summary>
    /// <paramref name="rows"/> runs of <paramref name="width"/> bytes, <paramref name="sourcePitch"/> apart in
    /// <paramref name="source"/> and <paramref name="destinationPitch"/> apart in <paramref name="destination"/>, in one
    /// 2-D copy (the copy engines walk the rows); either buffer may be mapped host memory.
    /// </summary>
    public unsafe void CopyAsync(DeviceBuffer destination, long destinationOffset, long destinationPitch,
        DeviceBuffer source, long sourceOffset, long sourcePitch, long width, long rows)
    {
        if (rows == 0 || width == 0)
            return;
        if (width > sourcePitch || width > destinationPitch)
            throw new ArgumentException($"rows of {width} bytes do not fit pitches of {sourcePitch} and {destinationPitch} bytes");
        ulong to = destination.At(destinationOffset, checked((rows - 1) * destinationPitch + width));
        ulong from = source.At(sourceOffset, checked((rows - 1) * sourcePitch + width));
        Bind();
        var copy = new Interop.Cuda.Memcpy2D
        {
            SourceMemoryType = Interop.Cuda.MemoryTypeUnified,
            SourceDevice = from,
            SourcePitch = (nuint)sourcePitch,
            DestinationMemoryType = Interop.Cuda.MemoryTypeUnified,
            DestinationDevice = to,
            DestinationPitch = (nuint)destinationPitch,
            WidthInBytes = (nuint)width,
            Height = (nuint)rows,
        };
        Interop.Cuda.Memcpy2DAsync(&copy, Handle).ThrowIfFailed();
    }

    public void FillAsync(DeviceBuffer destination, long offset, long length, byte value)
    {
        ulong to = destination.At(offset, length);
        Bind();
        Interop.Cuda.MemsetD8Async(to, value, (nuint)length, Handle).ThrowIfFailed();
    }

    /// <summary>Captures the stream's work so far in <paramref name="event"/>.</summary>
    public void Record(CudaEvent @event)
    {
        Bind();
        Interop.Cuda.EventRecord(@event.Handle, Handle).ThrowIfFailed();
    }

    /// <summary>Makes later work on this stream wait on the device for <paramref name="event"/>; the host does not block.</summary>
    public void Wait(CudaEvent @event)
    {
        Bind();
        Interop.Cuda.StreamWaitEvent(Handle, @event.Handle, 0).ThrowIfFailed();
    }

    /// <summary>
    /// Later work on this stream waits, on the device, until the 32-bit word at <paramref name="offset"/> of
    /// <paramref name="word"/> reaches <paramref name="value"/> (cyclic: <c>(int)(word - value) &gt;= 0</c>). The word
    /// may be written by another process, its stream or its CPU (mapped host memory); the host does not block.
    /// </summary>
    public void WaitValue(DeviceBuffer word, long offset, uint value)
    {
        ulong at = word.At(offset, sizeof(uint));
        Bind();
        Interop.Cuda.StreamWaitValue32(Handle, at, value, 0).ThrowIfFailed();
    }

    /// <summary>Writes <paramref name="value"/> to the 32-bit word at <paramref name="offset"/> once the stream's earlier work is done.</summary>
    public void WriteValue(DeviceBuffer word, long offset, uint value)
    {
        ulong at = word.At(offset, sizeof(uint));
        Bind();
        Interop.Cuda.StreamWriteValue32(Handle, at, value, 0).ThrowIfFailed();
    }

    /// <summary>Blocks the calling thread until the stream's work is done.</summary>
    public void Synchronize()
    {
        Bind();
        Interop.Cuda.StreamSynchronize(Handle).ThrowIfFailed();
    }

    /// <summary>True when all work submitted to the stream has completed.</summary>
    public bool IsIdle
    {
        get
        {
            Bind();
            CuResult result = Interop.Cuda.StreamQuery(Handle);
            if (result == CuResult.NotReady)
                return false;
            result.ThrowIfFailed();
            return true;
        }
    }

    private void Bind()
    {
        ThrowIfDisposed();
        Context.MakeCurrent();
    }

    private protected override void Release()
    {
        Context.MakeCurrent();
        Interop.Cuda.StreamDestroy(Handle).ThrowIfFailed();
    }

    public override string ToString() => $"stream 0x{Handle:x} on {Context.Device}";
}

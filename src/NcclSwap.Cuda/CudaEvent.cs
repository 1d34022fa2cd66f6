namespace NcclSwap.Cuda;

/// <summary>A CUDA event: a point in a stream that other streams, processes and the host can wait for.</summary>
public sealed class CudaEvent : GpuOwner
{
    private CudaEvent(CudaContext context, nint handle, bool timing, bool interprocess) : base(ownsHandle: true)
    {
        Context = context;
        Handle = handle;
        HasTiming = timing;
        IsInterprocess = interprocess;
    }

    public CudaContext Context { get; }

    internal nint Handle { get; }

    public bool HasTiming { get; }

    public bool IsInterprocess { get; }

    /// <summary>A timing event, for <see cref="ElapsedMilliseconds"/>.</summary>
    public static CudaEvent CreateTiming(CudaContext context) => Create(context, 0, timing: true, interprocess: false);

    /// <summary>An event without timing, the cheapest kind for ordering work.</summary>
    public static CudaEvent Create(CudaContext context) => Create(context, Interop.Cuda.EventDisableTiming, timing: false, interprocess: false);

    /// <summary>An event that other processes can open (<see cref="ExportIpcHandle"/>); such events cannot time.</summary>
    public static CudaEvent CreateInterprocess(CudaContext context) =>
        Create(context, Interop.Cuda.EventDisableTiming | Interop.Cuda.EventInterprocess, timing: false, interprocess: true);

    /// <summary>Opens an interprocess event exported by another process.</summary>
    public static unsafe CudaEvent OpenIpc(CudaContext context, CuIpcEventHandle handle)
    {
        context.MakeCurrent();
        nint @event;
        Interop.Cuda.IpcOpenEventHandle(&@event, handle).ThrowIfFailed();
        return new CudaEvent(context, @event, timing: false, interprocess: true);
    }

    private static unsafe CudaEvent Create(CudaContext context, uint flags, bool timing, bool interprocess)
    {
        context.MakeCurrent();
        nint handle;
        Interop.Cuda.EventCreate(&handle, flags).ThrowIfFailed();
        return new CudaEvent(context, handle, timing, interprocess);
    }

    public unsafe CuIpcEventHandle ExportIpcHandle()
    {
        if (!IsInterprocess)
            throw new InvalidOperationException($"{this} was not created interprocess; use CudaEvent.CreateInterprocess.");
        Bind();
        CuIpcEventHandle handle;
        Interop.Cuda.IpcGetEventHandle(&handle, Handle).ThrowIfFailed();
        return handle;
    }

    /// <summary>Blocks the calling thread until the event's work is done.</summary>
    public void Synchronize()
    {
        Bind();
        Interop.Cuda.EventSynchronize(Handle).ThrowIfFailed();
    }

    public bool IsComplete
    {
        get
        {
            Bind();
            CuResult result = Interop.Cuda.EventQuery(Handle);
            if (result == CuResult.NotReady)
                return false;
            result.ThrowIfFailed();
            return true;
        }
    }

    /// <summary>Milliseconds between two completed timing events.</summary>
    public static unsafe float ElapsedMilliseconds(CudaEvent start, CudaEvent end)
    {
        start.Bind();
        end.ThrowIfDisposed();
        float ms;
        Interop.Cuda.EventElapsedTime(&ms, start.Handle, end.Handle).ThrowIfFailed();
        return ms;
    }

    private void Bind()
    {
        ThrowIfDisposed();
        Context.MakeCurrent();
    }

    private protected override void Release()
    {
        Context.MakeCurrent();
        Interop.Cuda.EventDestroy(Handle).ThrowIfFailed();
    }

    public override string ToString() => $"{(IsInterprocess ? "interprocess " : "")}event 0x{Handle:x} on {Context.Device}";
}

namespace NcclSwap.Cuda;

/// <summary>
/// Base of the sealed owner classes of GPU objects. Dispose is explicit and idempotent; an owner that
/// does not own its handle (a borrowed stream, say) releases nothing. The finalizer only reports a leak:
/// CUDA must not be called from the finalizer thread.
/// </summary>
public abstract class GpuOwner : IDisposable
{
    private int _disposed;

    private protected GpuOwner(bool ownsHandle) => OwnsHandle = ownsHandle;

    /// <summary>Whether Dispose releases the native object.</summary>
    public bool OwnsHandle { get; }

    public bool IsDisposed => Volatile.Read(ref _disposed) != 0;

    public void Dispose()
    {
        if (TryMarkReleased() && OwnsHandle)
            Release();
    }

    /// <summary>Marks the object disposed; true for the one caller that did it first.</summary>
    private protected bool TryMarkReleased()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return false;
        GC.SuppressFinalize(this);
        return true;
    }

    /// <summary>Frees the native object. Called at most once, never from the finalizer.</summary>
    private protected abstract void Release();

    internal void ThrowIfDisposed()
    {
        if (IsDisposed)
            ThrowHelper.ObjectDisposed(this);
    }

    ~GpuOwner()
    {
        if (OwnsHandle && Volatile.Read(ref _disposed) == 0)
            LeakReport.Report(this);
    }
}

/// <summary>Where finalizers report GPU objects that were never disposed.</summary>
public static class LeakReport
{
    private static long s_count;

    /// <summary>Raised on the finalizer thread with a description of each leaked object.</summary>
    public static event Action<string>? Leaked;

    /// <summary>How many leaks were reported in this process.</summary>
    public static long Count => Interlocked.Read(ref s_count);

    internal static void Report(object leaked)
    {
        Interlocked.Increment(ref s_count);
        string text = $"nccl-swap: leaked {leaked} (not disposed; its native memory stays allocated until the process exits)";
        try
        {
            Leaked?.Invoke(text);
            Console.Error.WriteLine(text);
        }
        catch
        {
            // A finalizer must never throw.
        }
    }
}

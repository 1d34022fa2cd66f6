namespace NcclSwap.Cuda;

/// <summary>Limits of this process that decide how much memory can be pinned.</summary>
public static class HostLimits
{
    /// <summary>The soft RLIMIT_MEMLOCK in bytes (<c>ulimit -l</c> × 1024); null when unlimited.</summary>
    public static unsafe ulong? LockedMemoryLimit
    {
        get
        {
            Interop.Sys.Rlimit limit;
            if (Interop.Sys.GetRlimit(Interop.Sys.RlimitMemlock, &limit) != 0)
                throw new InvalidOperationException($"getrlimit(RLIMIT_MEMLOCK) failed: errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()}");
            return limit.Current == Interop.Sys.RlimInfinity ? null : limit.Current;
        }
    }
}

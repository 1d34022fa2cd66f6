using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Sys
    {
        // Linux x86-64 and arm64 resource number of RLIMIT_MEMLOCK.
        internal const int RlimitMemlock = 8;

        // RLIM_INFINITY.
        internal const ulong RlimInfinity = ulong.MaxValue;

        [StructLayout(LayoutKind.Sequential)]
        internal struct Rlimit
        {
            internal ulong Current;
            internal ulong Maximum;
        }

        [LibraryImport(Libraries.Libc, EntryPoint = "getrlimit", SetLastError = true)]
        internal static unsafe partial int GetRlimit(int resource, Rlimit* limit);
    }
}

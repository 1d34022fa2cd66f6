using System.Runtime.InteropServices;

namespace NcclSwap.ControlPlane;

internal static partial class Interop
{
    internal static partial class Sys
    {
        internal const string Libc = "libc.so.6";
        private const long SysFutexX64 = 202;

        // Not FUTEX_PRIVATE_FLAG: the words live in memory shared between processes.
        internal const int FutexWait = 0;
        internal const int FutexWake = 1;

        [StructLayout(LayoutKind.Sequential)]
        internal struct Timespec
        {
            internal long Seconds;
            internal long Nanoseconds;
        }

        // glibc's syscall() is variadic; on x86-64 integer arguments go in the same registers either way.
        // Blocks in FUTEX_WAIT: never [SuppressGCTransition].
        [LibraryImport(Libc, EntryPoint = "syscall", SetLastError = true)]
        private static unsafe partial long Syscall(long number, uint* address, int operation, uint value, Timespec* timeout, nint address2, uint value3);

        /// <summary>Sleeps while *address == expected, at most <paramref name="timeout"/>; returns at once otherwise.</summary>
        internal static unsafe void Wait(uint* address, uint expected, TimeSpan timeout)
        {
            var spec = new Timespec { Seconds = (long)timeout.TotalSeconds, Nanoseconds = timeout.Ticks % TimeSpan.TicksPerSecond * 100 };
            Syscall(SysFutexX64, address, FutexWait, expected, &spec, 0, 0); // EAGAIN, EINTR and ETIMEDOUT all mean: look again
        }

        internal static unsafe void WakeAll(uint* address) => Syscall(SysFutexX64, address, FutexWake, int.MaxValue, null, 0, 0);
    }
}

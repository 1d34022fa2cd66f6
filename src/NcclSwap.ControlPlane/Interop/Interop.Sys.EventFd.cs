using System.Runtime.InteropServices;

namespace NcclSwap.ControlPlane;

internal static partial class Interop
{
    internal static partial class Sys
    {
        internal const int EfdCloexec = 0x80000;
        internal const int EfdNonblock = 0x800;
        internal const short PollIn = 0x1;

        [StructLayout(LayoutKind.Sequential)]
        internal struct PollFd
        {
            internal int Fd;
            internal short Events;
            internal short Returned;
        }

        // A counter in the kernel that wakes whoever polls it: the agent's "request bell", shared by every client.
        [LibraryImport(Libc, EntryPoint = "eventfd", SetLastError = true)]
        internal static partial int EventFd(uint initial, int flags);

        // Non-blocking on an eventfd opened with EFD_NONBLOCK: returns at once (EAGAIN when the counter is 0 or full).
        [LibraryImport(Libc, EntryPoint = "write", SetLastError = true)]
        internal static unsafe partial nint Write(int fd, void* buffer, nuint count);

        [LibraryImport(Libc, EntryPoint = "read", SetLastError = true)]
        internal static unsafe partial nint Read(int fd, void* buffer, nuint count);

        // Blocks up to the timeout: never [SuppressGCTransition].
        [LibraryImport(Libc, EntryPoint = "poll", SetLastError = true)]
        internal static unsafe partial int Poll(PollFd* fds, nuint count, int timeoutMilliseconds);
    }
}

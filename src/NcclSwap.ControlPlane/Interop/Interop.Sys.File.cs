using System.Runtime.InteropServices;

namespace NcclSwap.ControlPlane;

internal static partial class Interop
{
    internal static partial class Sys
    {
        internal const int ORdOnly = 0;
        internal const int ODirectory = 0x10000;
        internal const int OCloexec = 0x80000;

        [LibraryImport(Libc, EntryPoint = "open", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static partial int Open(string path, int flags);

        [LibraryImport(Libc, EntryPoint = "fsync", SetLastError = true)]
        internal static partial int Fsync(int fd);

        /// <summary>chown(2); uint.MaxValue ((uid_t)-1) leaves the owner or the group as it is.</summary>
        [LibraryImport(Libc, EntryPoint = "chown", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static partial int Chown(string path, uint owner, uint group);

        [LibraryImport(Libc, EntryPoint = "close", SetLastError = true)]
        internal static partial int Close(int fd);

        /// <summary>Flushes a folder's entries (a rename in it) to disk.</summary>
        internal static void FsyncDirectory(string folder)
        {
            int fd = Open(folder, ORdOnly | ODirectory | OCloexec);
            if (fd < 0)
                throw new IOException($"open({folder}) failed (errno {Marshal.GetLastPInvokeError()})");
            try
            {
                if (Fsync(fd) != 0)
                    throw new IOException($"fsync({folder}) failed (errno {Marshal.GetLastPInvokeError()})");
            }
            finally
            {
                Close(fd);
            }
        }
    }
}

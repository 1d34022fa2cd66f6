using System.Runtime.InteropServices;

namespace NcclSwap.ControlPlane;

internal static partial class Interop
{
    internal static partial class Sys
    {
        internal const uint MfdCloexec = 0x1;
        internal const int SolSocket = 1;
        internal const int ScmRights = 1;

        // An anonymous file in memory; its descriptor is what gets shared (SCM_RIGHTS), not a path.
        [LibraryImport(Libc, EntryPoint = "memfd_create", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static partial int MemfdCreate(string name, uint flags);

        [LibraryImport(Libc, EntryPoint = "ftruncate", SetLastError = true)]
        internal static partial int Ftruncate(int fd, long length);

        [StructLayout(LayoutKind.Sequential)]
        internal struct IoVec
        {
            internal nint Base;
            internal nuint Length;
        }

        // struct msghdr on x86-64 and arm64 Linux (56 bytes).
        [StructLayout(LayoutKind.Sequential)]
        internal struct MsgHdr
        {
            internal nint Name;
            internal uint NameLength;
            internal nint Iov;
            internal nuint IovLength;
            internal nint Control;
            internal nuint ControlLength;
            internal int Flags;
        }

        // struct cmsghdr header; the data (here: int descriptors) follows at offset 16.
        [StructLayout(LayoutKind.Sequential)]
        internal struct CmsgHdr
        {
            internal nuint Length;
            internal int Level;
            internal int Type;
        }

        // Blocking calls on a socket in blocking mode: never [SuppressGCTransition].
        [LibraryImport(Libc, EntryPoint = "sendmsg", SetLastError = true)]
        internal static unsafe partial nint SendMsg(int socket, MsgHdr* message, int flags);

        [LibraryImport(Libc, EntryPoint = "recvmsg", SetLastError = true)]
        internal static unsafe partial nint RecvMsg(int socket, MsgHdr* message, int flags);
    }
}

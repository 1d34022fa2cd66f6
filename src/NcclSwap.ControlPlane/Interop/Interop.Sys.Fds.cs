using System.Runtime.InteropServices;

namespace NcclSwap.ControlPlane;

internal static partial class Interop
{
    internal static partial class Sys
    {
        internal const uint MfdCloexec = 0x1;
        internal const uint MfdAllowSealing = 0x2;
        internal const int FAddSeals = 1033;
        internal const int FGetSeals = 1034;
        internal const int FSealShrink = 0x2;
        internal const int FSealGrow = 0x4;
        internal const int SolSocket = 1;
        internal const int ScmRights = 1;

        // An anonymous file in memory; its descriptor is what gets shared (SCM_RIGHTS), not a path.
        [LibraryImport(Libc, EntryPoint = "memfd_create", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
        internal static partial int MemfdCreate(string name, uint flags);

        [LibraryImport(Libc, EntryPoint = "ftruncate", SetLastError = true)]
        internal static partial int Ftruncate(int fd, long length);

        // fcntl is variadic; on x86-64 and arm64 an int third argument travels as a fixed one would. Used here
        // for memfd seals: a region sealed against shrinking cannot be cut short under the agent's mapping
        // (which would kill the agent with SIGBUS on its next access).
        [LibraryImport(Libc, EntryPoint = "fcntl", SetLastError = true)]
        internal static partial int Fcntl(int fd, int command, int argument);

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

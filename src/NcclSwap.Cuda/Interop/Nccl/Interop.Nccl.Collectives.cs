using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Nccl
    {
        // Buffers are device pointers; stream is a CUstream (the same object as cudaStream_t).
        // All collectives enqueue work on the stream and return; between ncclGroupStart and
        // ncclGroupEnd they are only recorded, and run together at ncclGroupEnd.

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclGroupStart")]
        internal static partial NcclResult GroupStart();

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclGroupEnd")]
        internal static partial NcclResult GroupEnd();

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclBroadcast")]
        internal static partial NcclResult Broadcast(ulong sendBuffer, ulong receiveBuffer, nuint count, NcclDataType type, int root, nint comm, nint stream);

        // receiveBuffer holds ranks * sendCount elements, rank r's at r * sendCount.
        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclAllGather")]
        internal static partial NcclResult AllGather(ulong sendBuffer, ulong receiveBuffer, nuint sendCount, NcclDataType type, nint comm, nint stream);

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclSend")]
        internal static partial NcclResult Send(ulong sendBuffer, nuint count, NcclDataType type, int peer, nint comm, nint stream);

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclRecv")]
        internal static partial NcclResult Recv(ulong receiveBuffer, nuint count, NcclDataType type, int peer, nint comm, nint stream);
    }
}

using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Nccl
    {
        // Major*10000 + minor*100 + patch for 2.9 and on (22803 for 2.28.3).
        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclGetVersion")]
        internal static unsafe partial NcclResult GetVersion(int* version);

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclGetUniqueId")]
        internal static unsafe partial NcclResult GetUniqueId(NcclUniqueId* id);

        // The unique id is passed BY VALUE (128 bytes on the stack). Blocks until all ranks joined;
        // the CUDA device is the one whose context is current on the calling thread.
        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclCommInitRank")]
        internal static unsafe partial NcclResult CommInitRank(nint* comm, int ranks, NcclUniqueId id, int rank);

        // With config.Blocking = 0 it may return InProgress: poll ncclCommGetAsyncError.
        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclCommInitRankConfig")]
        internal static unsafe partial NcclResult CommInitRankConfig(nint* comm, int ranks, NcclUniqueId id, int rank, Config* config);

        // color -1 (NCCL_SPLIT_NOCOLOR) leaves the rank out and returns a null communicator.
        // config null: inherit the parent's.
        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclCommSplit")]
        internal static unsafe partial NcclResult CommSplit(nint comm, int color, int key, nint* newComm, Config* config);

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclCommFinalize")]
        internal static partial NcclResult CommFinalize(nint comm);

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclCommDestroy")]
        internal static partial NcclResult CommDestroy(nint comm);

        // Frees the communicator and aborts what is in flight; safe on a communicator in error.
        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclCommAbort")]
        internal static partial NcclResult CommAbort(nint comm);

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclCommGetAsyncError")]
        internal static unsafe partial NcclResult CommGetAsyncError(nint comm, NcclResult* asyncError);

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclCommCount")]
        internal static unsafe partial NcclResult CommCount(nint comm, int* count);

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclCommCuDevice")]
        internal static unsafe partial NcclResult CommCuDevice(nint comm, int* device);

        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclCommUserRank")]
        internal static unsafe partial NcclResult CommUserRank(nint comm, int* rank);

        // Static strings owned by NCCL; never free them.
        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclGetErrorString")]
        internal static partial nint GetErrorString(NcclResult result);

        // The last error text for comm (may be null: then the last error of the thread).
        [LibraryImport(Libraries.Nccl, EntryPoint = "ncclGetLastError")]
        internal static partial nint GetLastError(nint comm);
    }
}

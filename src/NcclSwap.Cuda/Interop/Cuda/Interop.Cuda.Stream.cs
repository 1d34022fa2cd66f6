using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Cuda
    {
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuStreamCreate")]
        internal static unsafe partial CuResult StreamCreate(nint* stream, uint flags);

        // _v2 since CUDA 4.0; the unsuffixed export is kept for old binaries.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuStreamDestroy_v2")]
        internal static partial CuResult StreamDestroy(nint stream);

        // Blocks the calling thread: never [SuppressGCTransition].
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuStreamSynchronize")]
        internal static partial CuResult StreamSynchronize(nint stream);

        // Success when idle, NotReady while work is pending.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuStreamQuery")]
        internal static partial CuResult StreamQuery(nint stream);

        // Flags must be 0. The wait is on the device: the host returns at once.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuStreamWaitEvent")]
        internal static partial CuResult StreamWaitEvent(nint stream, nint @event, uint flags);

        // Stream memory operations. The _v2 entry points (CUDA 11.7+) work without the NVreg_EnableStreamMemOPs
        // module option that the unsuffixed ones need. `address` is a device pointer: for registered host memory,
        // the one cuMemHostGetDevicePointer gives. Flags 0 (CU_STREAM_WAIT_VALUE_GEQ): later work waits until
        // (int32_t)(*address - value) >= 0, a cyclic comparison, so sequence numbers may wrap.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuStreamWaitValue32_v2")]
        internal static partial CuResult StreamWaitValue32(nint stream, ulong address, uint value, uint flags);

        // Flags 0: the write follows a memory fence, so whoever sees the value sees the stream's earlier writes too.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuStreamWriteValue32_v2")]
        internal static partial CuResult StreamWriteValue32(nint stream, ulong address, uint value, uint flags);
    }
}

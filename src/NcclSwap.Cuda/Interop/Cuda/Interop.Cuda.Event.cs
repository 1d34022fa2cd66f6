using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Cuda
    {
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuEventCreate")]
        internal static unsafe partial CuResult EventCreate(nint* @event, uint flags);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuEventDestroy_v2")]
        internal static partial CuResult EventDestroy(nint @event);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuEventRecord")]
        internal static partial CuResult EventRecord(nint @event, nint stream);

        // Blocks the calling thread.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuEventSynchronize")]
        internal static partial CuResult EventSynchronize(nint @event);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuEventQuery")]
        internal static partial CuResult EventQuery(nint @event);

        // Milliseconds between two recorded events, both created without EventDisableTiming.
        // The unsuffixed export is kept by every driver; CUDA 12.8 headers map the name to _v2 with
        // the same signature.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuEventElapsedTime")]
        internal static unsafe partial CuResult EventElapsedTime(float* milliseconds, nint start, nint end);
    }
}

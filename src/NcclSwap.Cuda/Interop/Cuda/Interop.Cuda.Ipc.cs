using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Cuda
    {
        // The handle names the whole allocation that contains devicePointer, from its base; the
        // importer adds the offset itself.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuIpcGetMemHandle")]
        internal static unsafe partial CuResult IpcGetMemHandle(CuIpcMemHandle* handle, ulong devicePointer);

        // The handle is passed BY VALUE (64 bytes on the stack). _v2: 64-bit device pointer.
        // A process cannot open a handle it exported itself (InvalidContext).
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuIpcOpenMemHandle_v2")]
        internal static unsafe partial CuResult IpcOpenMemHandle(ulong* devicePointer, CuIpcMemHandle handle, uint flags);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuIpcCloseMemHandle")]
        internal static partial CuResult IpcCloseMemHandle(ulong devicePointer);

        // The event must have been created with EventInterprocess | EventDisableTiming.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuIpcGetEventHandle")]
        internal static unsafe partial CuResult IpcGetEventHandle(CuIpcEventHandle* handle, nint @event);

        // The handle is passed BY VALUE. The opened event is destroyed with cuEventDestroy_v2.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuIpcOpenEventHandle")]
        internal static unsafe partial CuResult IpcOpenEventHandle(nint* @event, CuIpcEventHandle handle);
    }
}

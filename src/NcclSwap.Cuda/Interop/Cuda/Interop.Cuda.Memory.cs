using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Cuda
    {
        // CUdeviceptr is a 64-bit integer, not a host pointer. The _v2 entry points take size_t sizes
        // and 64-bit device pointers; the unsuffixed exports are the 32-bit originals.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemAlloc_v2")]
        internal static unsafe partial CuResult MemAlloc(ulong* devicePointer, nuint bytes);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemFree_v2")]
        internal static partial CuResult MemFree(ulong devicePointer);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemGetInfo_v2")]
        internal static unsafe partial CuResult MemGetInfo(nuint* free, nuint* total);

        // Page-locked host memory owned by the driver; freed with cuMemFreeHost.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemHostAlloc")]
        internal static unsafe partial CuResult MemHostAlloc(void** pointer, nuint bytes, uint flags);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemFreeHost")]
        internal static unsafe partial CuResult MemFreeHost(void* pointer);

        // Pins memory the caller already owns; undone with cuMemHostUnregister before the caller frees it.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemHostRegister_v2")]
        internal static unsafe partial CuResult MemHostRegister(void* pointer, nuint bytes, uint flags);

        // The device-side address of registered (DEVICEMAP) host memory; flags must be 0. Equal to the host
        // pointer where every device can use host pointers for registered memory.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemHostGetDevicePointer_v2")]
        internal static unsafe partial CuResult MemHostGetDevicePointer(ulong* devicePointer, void* pointer, uint flags);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemHostUnregister")]
        internal static unsafe partial CuResult MemHostUnregister(void* pointer);

        // The base and size of the allocation that contains a device pointer.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemGetAddressRange_v2")]
        internal static unsafe partial CuResult MemGetAddressRange(ulong* @base, nuint* size, ulong devicePointer);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuPointerGetAttribute")]
        internal static unsafe partial CuResult PointerGetAttribute(void* data, PointerAttribute attribute, ulong devicePointer);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemsetD8_v2")]
        internal static partial CuResult MemsetD8(ulong devicePointer, byte value, nuint count);

        // No _v2: the async memsets were introduced with 64-bit sizes.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemsetD8Async")]
        internal static partial CuResult MemsetD8Async(ulong devicePointer, byte value, nuint count, nint stream);
    }
}

using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Cuda
    {
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDeviceGetCount")]
        internal static unsafe partial CuResult DeviceGetCount(int* count);

        // CUdevice is an int ordinal handle.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDeviceGet")]
        internal static unsafe partial CuResult DeviceGet(int* device, int ordinal);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDeviceGetName")]
        internal static unsafe partial CuResult DeviceGetName(byte* name, int length, int device);

        // _v2: size_t result; the unsuffixed export is the 32-bit-size original.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDeviceTotalMem_v2")]
        internal static unsafe partial CuResult DeviceTotalMem(nuint* bytes, int device);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDeviceGetAttribute")]
        internal static unsafe partial CuResult DeviceGetAttribute(int* value, DeviceAttribute attribute, int device);

        // Writes "dddd:bb:dd.f" with a terminating NUL; 16 bytes are enough.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDeviceGetPCIBusId")]
        internal static unsafe partial CuResult DeviceGetPciBusId(byte* busId, int length, int device);

        // _v2 since CUDA 11.4: the unsuffixed entry point is deprecated and may report a MIG-less UUID.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDeviceGetUuid_v2")]
        internal static unsafe partial CuResult DeviceGetUuid(CuUuid* uuid, int device);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDeviceCanAccessPeer")]
        internal static unsafe partial CuResult DeviceCanAccessPeer(int* canAccess, int device, int peerDevice);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDeviceGetP2PAttribute")]
        internal static unsafe partial CuResult DeviceGetP2PAttribute(int* value, P2PAttribute attribute, int source, int destination);
    }
}

using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Cuda
    {
        // Retains the device's primary context (the one the CUDA runtime, PyTorch and NCCL use).
        // Each retain is paired with one cuDevicePrimaryCtxRelease_v2.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDevicePrimaryCtxRetain")]
        internal static unsafe partial CuResult DevicePrimaryCtxRetain(nint* context, int device);

        // _v2 since CUDA 11: the unsuffixed export is the pre-11 behaviour.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDevicePrimaryCtxRelease_v2")]
        internal static partial CuResult DevicePrimaryCtxRelease(int device);

        // Binds the context to the calling thread; cheap, called before every owner object's native call.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuCtxSetCurrent")]
        internal static partial CuResult CtxSetCurrent(nint context);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuCtxGetCurrent")]
        internal static unsafe partial CuResult CtxGetCurrent(nint* context);

        // Blocks until all work in the current context is done.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuCtxSynchronize")]
        internal static partial CuResult CtxSynchronize();
    }
}

using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Cuda
    {
        // Flags must be 0.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuInit")]
        internal static partial CuResult Init(uint flags);

        // 13000 for CUDA 13.0: 1000 * major + 10 * minor.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuDriverGetVersion")]
        internal static unsafe partial CuResult DriverGetVersion(int* version);

        // The returned string is static, owned by the driver; never free it. Works before cuInit.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuGetErrorName")]
        internal static unsafe partial CuResult GetErrorName(CuResult error, byte** name);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuGetErrorString")]
        internal static unsafe partial CuResult GetErrorString(CuResult error, byte** text);
    }
}

using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Cuda
    {
        // image: a NUL-terminated PTX text (JIT-compiled by the driver) or a cubin.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuModuleLoadData")]
        internal static unsafe partial CuResult ModuleLoadData(nint* module, void* image);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuModuleUnload")]
        internal static partial CuResult ModuleUnload(nint module);

        // The function handle lives as long as its module.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuModuleGetFunction")]
        internal static unsafe partial CuResult ModuleGetFunction(nint* function, nint module, byte* name);

        // kernelParams: an array of pointers, one per kernel parameter, each to that parameter's value.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuLaunchKernel")]
        internal static unsafe partial CuResult LaunchKernel(
            nint function,
            uint gridX, uint gridY, uint gridZ,
            uint blockX, uint blockY, uint blockZ,
            uint sharedMemoryBytes, nint stream, void** kernelParams, void** extra);
    }
}

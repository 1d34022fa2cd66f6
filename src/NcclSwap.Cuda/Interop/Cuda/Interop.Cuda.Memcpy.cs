using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

internal static partial class Interop
{
    internal static partial class Cuda
    {
        // All _v2: 64-bit device pointers and size_t counts. The synchronous copies block the calling
        // thread; the async ones need pinned host memory to be truly asynchronous.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemcpyHtoD_v2")]
        internal static unsafe partial CuResult MemcpyHtoD(ulong destination, void* source, nuint bytes);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemcpyDtoH_v2")]
        internal static unsafe partial CuResult MemcpyDtoH(void* destination, ulong source, nuint bytes);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemcpyDtoD_v2")]
        internal static partial CuResult MemcpyDtoD(ulong destination, ulong source, nuint bytes);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemcpyHtoDAsync_v2")]
        internal static unsafe partial CuResult MemcpyHtoDAsync(ulong destination, void* source, nuint bytes, nint stream);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemcpyDtoHAsync_v2")]
        internal static unsafe partial CuResult MemcpyDtoHAsync(void* destination, ulong source, nuint bytes, nint stream);

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemcpyDtoDAsync_v2")]
        internal static partial CuResult MemcpyDtoDAsync(ulong destination, ulong source, nuint bytes, nint stream);

        // Unified addressing: the driver infers the direction from the two addresses, so either may be
        // device memory or registered (mapped) host memory. No _v2: it was introduced with 64-bit sizes.
        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemcpyAsync")]
        internal static partial CuResult MemcpyAsync(ulong destination, ulong source, nuint bytes, nint stream);

        // CUmemorytype: with unified addressing, UNIFIED lets the driver tell device from mapped host memory.
        internal const int MemoryTypeUnified = 4;

        /// <summary><c>CUDA_MEMCPY2D</c>: Height rows of WidthInBytes bytes, each Pitch bytes after the one before.</summary>
        [StructLayout(LayoutKind.Sequential)]
        internal struct Memcpy2D
        {
            internal nuint SourceXInBytes;
            internal nuint SourceY;
            internal int SourceMemoryType;
            internal nint SourceHost;
            internal ulong SourceDevice;
            internal nint SourceArray;
            internal nuint SourcePitch;
            internal nuint DestinationXInBytes;
            internal nuint DestinationY;
            internal int DestinationMemoryType;
            internal nint DestinationHost;
            internal ulong DestinationDevice;
            internal nint DestinationArray;
            internal nuint DestinationPitch;
            internal nuint WidthInBytes;
            internal nuint Height;
        }

        [LibraryImport(Libraries.Cuda, EntryPoint = "cuMemcpy2DAsync_v2")]
        internal static unsafe partial CuResult Memcpy2DAsync(Memcpy2D* copy, nint stream);
    }
}

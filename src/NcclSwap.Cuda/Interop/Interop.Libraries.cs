namespace NcclSwap.Cuda;

internal static partial class Interop
{
    /// <summary>Every native library name the project binds to, in one place.</summary>
    internal static class Libraries
    {
        /// <summary>The CUDA driver API, installed with the NVIDIA driver.</summary>
        internal const string Cuda = "libcuda.so.1";

        /// <summary>NCCL; found through <see cref="NativeLibraries"/> (environment variable, loader, Python wheels).</summary>
        internal const string Nccl = "libnccl.so.2";

        /// <summary>The C library, for resource limits.</summary>
        internal const string Libc = "libc.so.6";
    }
}

using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

/// <summary>NCCL's <c>ncclResult_t</c>.</summary>
public enum NcclResult
{
    Success = 0,
    UnhandledCudaError = 1,
    SystemError = 2,
    InternalError = 3,
    InvalidArgument = 4,
    InvalidUsage = 5,
    RemoteError = 6,
    InProgress = 7,
    Timeout = 8,
}

/// <summary>NCCL's <c>ncclDataType_t</c>. The project moves bytes, so it mostly uses <see cref="Uint8"/>.</summary>
public enum NcclDataType
{
    Int8 = 0,
    Uint8 = 1,
    Int32 = 2,
    Uint32 = 3,
    Int64 = 4,
    Uint64 = 5,
    Float16 = 6,
    Float32 = 7,
    Float64 = 8,
    Bfloat16 = 9,
}

/// <summary>An <c>ncclUniqueId</c>: 128 opaque bytes made by the root rank and given to every rank.</summary>
[InlineArray(Size)]
public struct NcclUniqueId
{
    public const int Size = 128;
    private byte _element0;

    public readonly string ToHex() => Convert.ToHexString(MemoryMarshal.CreateReadOnlySpan(in _element0, Size));

    public static NcclUniqueId FromHex(string hex) => HandleBytes.FromHex<NcclUniqueId>(hex, Size, nameof(NcclUniqueId));
}

internal static partial class Interop
{
    internal static partial class Nccl
    {
        internal const uint ConfigMagic = 0xcafebeef;
        internal const int ConfigUndefinedInt = int.MinValue;

        // NCCL_VERSION(2,17,0). The config struct is versioned and append-only: NCCL copies `size`
        // bytes and takes its defaults for every later field, so this prefix works with 2.17 and on.
        internal const uint ConfigVersion = 21700;

        /// <summary>The NCCL 2.17 prefix of <c>ncclConfig_t</c>.</summary>
        [StructLayout(LayoutKind.Sequential)]
        internal struct Config
        {
            internal nuint Size;
            internal uint Magic;
            internal uint Version;
            internal int Blocking;
            internal int CgaClusterSize;
            internal int MinCtas;
            internal int MaxCtas;
            internal nint NetName;

            internal static unsafe Config Create(bool blocking) => new()
            {
                Size = (nuint)sizeof(Config),
                Magic = ConfigMagic,
                Version = ConfigVersion,
                Blocking = blocking ? 1 : 0,
                CgaClusterSize = ConfigUndefinedInt,
                MinCtas = ConfigUndefinedInt,
                MaxCtas = ConfigUndefinedInt,
                NetName = 0,
            };
        }
    }
}

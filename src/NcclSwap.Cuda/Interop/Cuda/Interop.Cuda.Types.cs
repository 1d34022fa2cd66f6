using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

/// <summary>The CUDA driver API's <c>CUresult</c>. Values not listed here still flow through unchanged.</summary>
public enum CuResult
{
    Success = 0,
    InvalidValue = 1,
    OutOfMemory = 2,
    NotInitialized = 3,
    Deinitialized = 4,
    NoDevice = 100,
    InvalidDevice = 101,
    DeviceNotLicensed = 102,
    InvalidImage = 200,
    InvalidContext = 201,
    MapFailed = 205,
    UnmapFailed = 206,
    AlreadyMapped = 208,
    NoBinaryForGpu = 209,
    NotMapped = 211,
    PeerAccessUnsupported = 217,
    InvalidPtx = 218,
    UnsupportedPtxVersion = 222,
    InvalidSource = 300,
    FileNotFound = 301,
    InvalidHandle = 400,
    NotFound = 500,
    NotReady = 600,
    IllegalAddress = 700,
    LaunchOutOfResources = 701,
    LaunchTimeout = 702,
    PeerAccessAlreadyEnabled = 704,
    HostMemoryAlreadyRegistered = 712,
    HostMemoryNotRegistered = 713,
    LaunchFailed = 719,
    NotPermitted = 800,
    NotSupported = 801,
    Unknown = 999,
}

/// <summary>A <c>CUipcMemHandle</c>: 64 opaque bytes that name a device allocation across processes.</summary>
[InlineArray(Size)]
public struct CuIpcMemHandle
{
    public const int Size = 64;
    private byte _element0;

    public readonly string ToHex() => Convert.ToHexString(MemoryMarshal.CreateReadOnlySpan(in _element0, Size));

    public static CuIpcMemHandle FromHex(string hex) => HandleBytes.FromHex<CuIpcMemHandle>(hex, Size, nameof(CuIpcMemHandle));
}

/// <summary>A <c>CUipcEventHandle</c>: 64 opaque bytes that name an interprocess event across processes.</summary>
[InlineArray(Size)]
public struct CuIpcEventHandle
{
    public const int Size = 64;
    private byte _element0;

    public readonly string ToHex() => Convert.ToHexString(MemoryMarshal.CreateReadOnlySpan(in _element0, Size));

    public static CuIpcEventHandle FromHex(string hex) => HandleBytes.FromHex<CuIpcEventHandle>(hex, Size, nameof(CuIpcEventHandle));
}

/// <summary>A <c>CUuuid</c>: the 16 bytes of a device's UUID.</summary>
[InlineArray(16)]
public struct CuUuid
{
    private byte _element0;

    /// <summary>Formats as <c>GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx</c>, as nvidia-smi prints it.</summary>
    public override readonly string ToString()
    {
        string h = Convert.ToHexStringLower(MemoryMarshal.CreateReadOnlySpan(in _element0, 16));
        return $"GPU-{h[..8]}-{h[8..12]}-{h[12..16]}-{h[16..20]}-{h[20..]}";
    }
}

internal static class HandleBytes
{
    internal static T FromHex<T>(string hex, int size, string what) where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(hex);
        if (hex.Length != size * 2)
            throw new FormatException($"{what} must be {size * 2} hex digits, got {hex.Length}.");
        T value = default;
        Span<byte> bytes = MemoryMarshal.AsBytes(new Span<T>(ref value));
        if (Convert.FromHexString(hex, bytes, out _, out _) != System.Buffers.OperationStatus.Done)
            throw new FormatException($"{what} is not valid hex: '{hex}'.");
        return value;
    }
}

internal static partial class Interop
{
    internal static partial class Cuda
    {
        // Attribute numbers of CUdevice_attribute used by the project.
        internal enum DeviceAttribute
        {
            MultiprocessorCount = 16,
            PciBusId = 33,
            PciDeviceId = 34,
            UnifiedAddressing = 41,
            PciDomainId = 50,
            ComputeCapabilityMajor = 75,
            ComputeCapabilityMinor = 76,
        }

        internal enum P2PAttribute
        {
            PerformanceRank = 1,
            AccessSupported = 2,
            NativeAtomicSupported = 3,
        }

        internal enum PointerAttribute
        {
            Context = 1,
            MemoryType = 2,
            DevicePointer = 3,
            DeviceOrdinal = 9,
        }

        internal const uint MemHostAllocPortable = 0x01;
        internal const uint MemHostAllocDeviceMap = 0x02;
        internal const uint MemHostRegisterPortable = 0x01;
        internal const uint MemHostRegisterDeviceMap = 0x02;
        internal const uint MemHostRegisterReadOnly = 0x08;
        internal const uint StreamNonBlocking = 0x1;
        internal const uint EventDisableTiming = 0x2;
        internal const uint EventInterprocess = 0x4;
        internal const uint IpcMemLazyEnablePeerAccess = 0x1;
    }
}

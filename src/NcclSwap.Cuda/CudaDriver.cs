using System.Text;

namespace NcclSwap.Cuda;

/// <summary>The CUDA driver: probed and initialised once per process.</summary>
public static class CudaDriver
{
    private static readonly Lazy<string?> s_failure = new(Initialize);

    /// <summary>True when libcuda.so.1 loaded, cuInit succeeded and at least one device is visible.</summary>
    public static bool IsSupported => s_failure.Value is null;

    /// <summary>Why <see cref="IsSupported"/> is false, with what was searched; null when supported.</summary>
    public static string? UnsupportedReason => s_failure.Value;

    /// <summary>Throws <see cref="GpuUnavailableException"/> with the reason unless the driver is usable.</summary>
    public static void EnsureSupported()
    {
        if (s_failure.Value is { } reason)
            throw new GpuUnavailableException(reason);
    }

    /// <summary>The CUDA version the driver supports, as (major, minor).</summary>
    public static unsafe (int Major, int Minor) Version
    {
        get
        {
            EnsureSupported();
            int version;
            Interop.Cuda.DriverGetVersion(&version).ThrowIfFailed();
            return (version / 1000, version % 1000 / 10);
        }
    }

    public static unsafe int DeviceCount
    {
        get
        {
            EnsureSupported();
            int count;
            Interop.Cuda.DeviceGetCount(&count).ThrowIfFailed();
            return count;
        }
    }

    /// <summary>The driver version from /proc (e.g. 580.95.05), or null where the file is absent.</summary>
    public static string? KernelModuleVersion
    {
        get
        {
            const string file = "/proc/driver/nvidia/version";
            if (!File.Exists(file))
                return null;
            string first = File.ReadLines(file).FirstOrDefault() ?? "";
            // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Thu ..."
            return first.Split(' ', StringSplitOptions.RemoveEmptyEntries)
                .FirstOrDefault(word => word.Count(c => c == '.') >= 1 && char.IsDigit(word[0]));
        }
    }

    private static unsafe string? Initialize()
    {
        LibraryProbe probe = NativeLibraries.Cuda;
        if (!probe.IsLoaded)
            return "no NVIDIA driver (libcuda.so.1 not found)" + Environment.NewLine + probe.Failure;
        CuResult init = Interop.Cuda.Init(0);
        if (init != CuResult.Success)
            return $"the CUDA driver loaded ({probe.Path}) but cuInit failed: {NativeResult.CudaErrorName(init)}: {NativeResult.CudaErrorText(init)}";
        int count;
        CuResult counted = Interop.Cuda.DeviceGetCount(&count);
        if (counted != CuResult.Success)
            return $"cuDeviceGetCount failed: {NativeResult.CudaErrorName(counted)}";
        return count == 0 ? "the CUDA driver loaded but sees no GPU (check CUDA_VISIBLE_DEVICES and /dev/nvidia*)" : null;
    }
}

/// <summary>One CUDA device and its fixed properties.</summary>
public sealed class CudaDevice
{
    private CudaDevice(int ordinal) => Ordinal = ordinal;

    public int Ordinal { get; }

    public static unsafe CudaDevice Get(int ordinal)
    {
        CudaDriver.EnsureSupported();
        int handle;
        Interop.Cuda.DeviceGet(&handle, ordinal).ThrowIfFailed();
        return new CudaDevice(handle);
    }

    public static IReadOnlyList<CudaDevice> All =>
        Enumerable.Range(0, CudaDriver.DeviceCount).Select(Get).ToArray();

    public unsafe string Name
    {
        get
        {
            byte* name = stackalloc byte[256];
            Interop.Cuda.DeviceGetName(name, 256, Ordinal).ThrowIfFailed();
            return Encoding.UTF8.GetString(new ReadOnlySpan<byte>(name, 256).TrimNulTerminated());
        }
    }

    public unsafe long TotalMemory
    {
        get
        {
            nuint bytes;
            Interop.Cuda.DeviceTotalMem(&bytes, Ordinal).ThrowIfFailed();
            return (long)bytes;
        }
    }

    /// <summary>PCI address as <c>dddd:bb:dd.f</c>.</summary>
    public unsafe string PciBusId
    {
        get
        {
            byte* id = stackalloc byte[32];
            Interop.Cuda.DeviceGetPciBusId(id, 32, Ordinal).ThrowIfFailed();
            return Encoding.ASCII.GetString(new ReadOnlySpan<byte>(id, 32).TrimNulTerminated());
        }
    }

    public unsafe CuUuid Uuid
    {
        get
        {
            CuUuid uuid;
            Interop.Cuda.DeviceGetUuid(&uuid, Ordinal).ThrowIfFailed();
            return uuid;
        }
    }

    public (int Major, int Minor) ComputeCapability =>
        (Attribute(Interop.Cuda.DeviceAttribute.ComputeCapabilityMajor), Attribute(Interop.Cuda.DeviceAttribute.ComputeCapabilityMinor));

    public int MultiprocessorCount => Attribute(Interop.Cuda.DeviceAttribute.MultiprocessorCount);

    /// <summary>Whether this device can address <paramref name="peer"/>'s memory directly (NVLink or PCIe P2P).</summary>
    public unsafe bool CanAccessPeer(CudaDevice peer)
    {
        int can;
        Interop.Cuda.DeviceCanAccessPeer(&can, Ordinal, peer.Ordinal).ThrowIfFailed();
        return can != 0;
    }

    /// <summary>Whether atomics to the peer are native: true over NVLink, false over PCIe.</summary>
    public unsafe bool HasNativeAtomicsWith(CudaDevice peer)
    {
        int value;
        Interop.Cuda.DeviceGetP2PAttribute(&value, Interop.Cuda.P2PAttribute.NativeAtomicSupported, Ordinal, peer.Ordinal).ThrowIfFailed();
        return value != 0;
    }

    public override string ToString() => $"GPU {Ordinal}";

    private unsafe int Attribute(Interop.Cuda.DeviceAttribute attribute)
    {
        int value;
        Interop.Cuda.DeviceGetAttribute(&value, attribute, Ordinal).ThrowIfFailed();
        return value;
    }
}

internal static class SpanExtensions
{
    internal static ReadOnlySpan<byte> TrimNulTerminated(this ReadOnlySpan<byte> bytes)
    {
        int end = bytes.IndexOf((byte)0);
        return end < 0 ? bytes : bytes[..end];
    }
}

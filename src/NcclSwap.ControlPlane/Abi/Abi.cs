using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace NcclSwap.ControlPlane.Abi;

// The C# side of native/include/nccl_swap_abi.h. Every field here is checked against the header by
// AbiLayoutTests, which compiles it: same offset, same size, and every header field not declared here is
// padding. Field names are the header's in PascalCase.

/// <summary>Constants of the ABI header.</summary>
public static class AbiConstants
{
    public const uint AbiVersion = 1;
    public const ulong TableMagic = 0x315442544E535750;
    public const ulong RingMagic = 0x31474E524E535750;
    public const uint RequestMagic = 0x5152534E;
    public const uint ResponseMagic = 0x5352534E;
    public const int NameBytes = 64;
    public const int PayloadBytes = 96;
    public const uint EntryInUse = 0x1;
    public const uint EntryPaused = 0x2;

    /// <summary>In a publish request's flags: answer once the version's outcome is known, not at the snapshot.</summary>
    public const ushort PublishWait = 0x1;
}

[InlineArray(AbiConstants.NameBytes)]
public struct NameBytes
{
    private byte _element0;
}

[InlineArray(AbiConstants.PayloadBytes)]
public struct PayloadBytes
{
    private byte _element0;
}

/// <summary><c>nccl_swap_version_entry</c>: one weight set's row of the version table.</summary>
[NativeStruct("nccl_swap_version_entry")]
[StructLayout(LayoutKind.Explicit, Size = 128)]
public struct VersionEntry
{
    /// <summary>(version &lt;&lt; 8) | (slot &lt;&lt; 1) | 1, or 0 before the first activation.</summary>
    [FieldOffset(0)] public ulong State;
    [FieldOffset(8)] public ulong LastGood;
    [FieldOffset(16)] public ulong ManifestDigest;
    [FieldOffset(24)] public ulong ActivatedNs;
    [FieldOffset(32)] public uint Flags;
    [FieldOffset(40)] public NameBytes Name;
    [FieldOffset(104)] public ulong CanaryLanes;
    [FieldOffset(112)] public ulong CanaryState;

    public static ulong PackState(ulong version, int slot) =>
        version >= 1UL << 56 ? throw new ArgumentOutOfRangeException(nameof(version), $"version {version} does not fit in 56 bits")
        : (uint)slot > 1 ? throw new ArgumentOutOfRangeException(nameof(slot), $"slot {slot} is not 0 or 1")
        : (version << 8) | ((ulong)slot << 1) | 1;

    public static (ulong Version, int Slot) UnpackState(ulong state) => (state >> 8, (int)(state >> 1) & 1);
}

/// <summary><c>nccl_swap_version_table</c>: the table's header; the entries follow it.</summary>
[NativeStruct("nccl_swap_version_table")]
[StructLayout(LayoutKind.Explicit, Size = 64)]
public struct VersionTableHeader
{
    [FieldOffset(0)] public ulong Magic;
    [FieldOffset(8)] public uint AbiVersion;
    [FieldOffset(12)] public uint Capacity;
    [FieldOffset(16)] public ulong Generation;
    [FieldOffset(24)] public ulong AgentPid;
}

/// <summary><c>nccl_swap_ring_header</c>: a single-producer single-consumer ring; the entries follow it.</summary>
[NativeStruct("nccl_swap_ring_header")]
[StructLayout(LayoutKind.Explicit, Size = 256)]
public struct RingHeader
{
    [FieldOffset(0)] public ulong Magic;
    [FieldOffset(8)] public uint AbiVersion;
    [FieldOffset(12)] public uint Capacity;
    [FieldOffset(16)] public uint EntryBytes;
    [FieldOffset(64)] public uint Head;
    [FieldOffset(128)] public uint Tail;
    [FieldOffset(192)] public uint Doorbell;
    [FieldOffset(196)] public uint Sleepers;
}

public enum RequestKind : ushort
{
    Ping = 1,
    Publish = 2,
    Ack = 3,
    Rollback = 4,
    Status = 5,
    CopyIn = 6,
    Report = 7,
}

/// <summary><c>nccl_swap_status</c>: 0 or a negative errno.</summary>
public static class Status
{
    public const int Ok = 0;
    public const int NotPermitted = -1;    // EPERM: the session's role may not make this request
    public const int NotFound = -2;        // ENOENT: no such version, or no last good version
    public const int Busy = -16;           // EBUSY
    public const int Invalid = -22;        // EINVAL: malformed, or does not fit the session
    public const int NotImplemented = -38; // ENOSYS
    public const int Corrupt = -74;        // EBADMSG: bytes did not match their digest
    public const int TimedOut = -110;      // ETIMEDOUT
    public const int Stale = -116;         // ESTALE: not newer than a version already published
    public const int Canceled = -125;      // ECANCELED: superseded, or abandoned at shutdown

    /// <summary>The constant's name for a status, for messages.</summary>
    public static string Name(int status) => status switch
    {
        Ok => "ok",
        NotPermitted => "not permitted",
        NotFound => "not found",
        Busy => "busy",
        Invalid => "invalid",
        NotImplemented => "not implemented",
        Corrupt => "corrupt",
        TimedOut => "timed out",
        Stale => "stale",
        Canceled => "canceled",
        _ => $"status {status}",
    };
}

/// <summary><c>nccl_swap_request</c>.</summary>
[NativeStruct("nccl_swap_request")]
[StructLayout(LayoutKind.Explicit, Size = 128)]
public struct Request
{
    [FieldOffset(0)] public uint Magic;
    [FieldOffset(4)] public ushort Kind;
    [FieldOffset(6)] public ushort Flags;
    [FieldOffset(8)] public ulong Id;
    [FieldOffset(16)] public ulong Version;
    [FieldOffset(24)] public uint WeightSet;
    [FieldOffset(28)] public uint PayloadBytes;
    [FieldOffset(32)] public PayloadBytes Payload;
}

/// <summary><c>nccl_swap_response</c>.</summary>
[NativeStruct("nccl_swap_response")]
[StructLayout(LayoutKind.Explicit, Size = 128)]
public struct Response
{
    [FieldOffset(0)] public uint Magic;
    [FieldOffset(4)] public int Status;
    [FieldOffset(8)] public ulong Id;
    [FieldOffset(16)] public ulong Version;
    [FieldOffset(24)] public uint DetailBytes;
    [FieldOffset(32)] public PayloadBytes Detail;
}

[InlineArray(ReportPayload.Buckets)]
public struct LatencyBuckets
{
    private ushort _element0;
}

/// <summary><c>nccl_swap_report</c>: a consumer's counters since its last report, a REPORT request's payload.</summary>
[NativeStruct("nccl_swap_report")]
[StructLayout(LayoutKind.Explicit, Size = 96)]
public struct ReportPayload
{
    public const int Buckets = 40;

    [FieldOffset(0)] public uint Requests;
    [FieldOffset(4)] public uint Errors;
    [FieldOffset(8)] public uint QualityCount;
    [FieldOffset(12)] public float QualitySum;
    [FieldOffset(16)] public LatencyBuckets Latency;

    /// <summary>The upper bound of bucket <paramref name="bucket"/> in milliseconds: 2^(i/2); the last bucket has none.</summary>
    public static double UpperMilliseconds(int bucket) => bucket >= Buckets - 1 ? double.PositiveInfinity : Math.Pow(2, bucket / 2.0);

    /// <summary>The bucket a latency of <paramref name="milliseconds"/> falls in.</summary>
    public static int BucketOf(double milliseconds) =>
        milliseconds <= 1 ? 0 : Math.Min(Buckets - 1, (int)Math.Ceiling(2 * Math.Log2(milliseconds) - 1e-9));
}

/// <summary><c>nccl_swap_gate</c>: the words a GPU consumer's stream and the agent's stream order copy-ins and switches with.</summary>
[NativeStruct("nccl_swap_gate")]
[StructLayout(LayoutKind.Explicit, Size = 256)]
public struct Gate
{
    [FieldOffset(0)] public uint Quiesced;
    [FieldOffset(64)] public uint Done;
    [FieldOffset(128)] public uint Passed;
}

/// <summary>Names the C struct of the ABI header that a C# struct mirrors.</summary>
[AttributeUsage(AttributeTargets.Struct)]
public sealed class NativeStructAttribute(string name) : Attribute
{
    public string Name { get; } = name;
}

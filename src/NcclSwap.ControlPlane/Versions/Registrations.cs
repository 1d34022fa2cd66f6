using System.Runtime.InteropServices;
using System.Text.Json;
using Microsoft.Win32.SafeHandles;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.Cuda;
using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Versions;

/// <summary>How a consumer takes new versions.</summary>
public enum ConsumerMode
{
    /// <summary>Two slots of its own (A and B); the agent writes into the one not in use and the consumer switches.</summary>
    Flip,

    /// <summary>One set of buffers; at a step boundary the consumer asks the agent to copy the active version in.</summary>
    CopyIn,
}

/// <summary>
/// A client's region: shared memory (a memfd it passed with its hello, mapped into the agent and the backend) or
/// GPU memory (allocations it named by CUDA IPC handle, opened by the backend and laid end to end at the offsets
/// the client chose: a <see cref="SegmentedBuffer"/> when there are several).
/// </summary>
internal sealed class ClientRegion : IDisposable
{
    private readonly SharedRegion? _region;

    private ClientRegion(string name, SharedRegion? region, IDeviceBuffer buffer)
    {
        Name = name;
        _region = region;
        Buffer = buffer;
    }

    public string Name { get; }

    public IDeviceBuffer Buffer { get; }

    /// <summary>True for GPU memory, false for shared memory.</summary>
    public bool IsDevice => _region is null;

    /// <summary>Where shared memory is mapped in the agent (zero for GPU memory).</summary>
    public unsafe nint Pointer => _region is null ? 0 : (nint)_region.Pointer;

    /// <summary>
    /// Maps <paramref name="descriptor"/> (taking it over) after checking that it is sealed against shrinking and
    /// holds <paramref name="needed"/> bytes; errors name the region.
    /// </summary>
    public static unsafe ClientRegion Map(SafeFileHandle descriptor, string name, bool writable, long needed, IBackend backend)
    {
        int fd = (int)descriptor.DangerousGetHandle();
        if (!SharedRegion.IsSealedAgainstShrinking(fd))
        {
            descriptor.Dispose();
            throw new SessionRefusedException($"region '{name}' is not a memfd sealed against shrinking (F_SEAL_SHRINK): the agent maps only regions that cannot be cut short under it");
        }
        descriptor.SetHandleAsInvalid(); // the region owns the descriptor from here
        SharedRegion region;
        try
        {
            region = SharedRegion.FromDescriptor(fd, name, writable);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
        {
            throw new SessionRefusedException($"region '{name}' cannot be mapped {(writable ? "for writing" : "for reading")}: {e.Message}");
        }
        try
        {
            if (region.Length < needed || region.Length == 0)
                throw new SessionRefusedException($"region '{name}' holds {region.Length} bytes, but its tensors reach byte {needed} (and a region holds at least one)");
            return new ClientRegion(name, region, backend.MapHost((nint)region.Pointer, region.Length, readOnly: !writable, name));
        }
        catch
        {
            region.Dispose();
            throw;
        }
    }

    /// <summary>Opens the allocations of a GPU region and checks that every tensor of <paramref name="layout"/> lies in one of them.</summary>
    public static ClientRegion Open(RegionSpec spec, RegionLayout layout, IBackend backend)
    {
        CudaSegment[] segments = spec.Segments ?? throw new ArgumentException($"region '{spec.Name}' is shared memory, not GPU memory", nameof(spec));
        var opened = new List<(long At, IDeviceBuffer Buffer)>();
        try
        {
            for (int i = 0; i < segments.Length; i++)
            {
                CudaSegment segment = segments[i];
                try
                {
                    opened.Add((segment.At, backend.OpenIpc(segment.Handle, segment.Offset, segment.Bytes, $"region '{spec.Name}' allocation {i}")));
                }
                catch (Exception e) when (e is NotSupportedException or ArgumentException or CudaException)
                {
                    throw new SessionRefusedException(e is NotSupportedException ? e.Message : $"region '{spec.Name}': allocation {i} cannot be opened: {e.Message}");
                }
            }
            IDeviceBuffer buffer = opened.Count == 1 && opened[0].At == 0 ? opened[0].Buffer : new SegmentedBuffer(opened, spec.Name);
            opened = [];
            try
            {
                foreach (TensorPlacement tensor in layout.Tensors)
                    if (tensor.Bytes > 0 && !SegmentedBuffer.Holds(buffer, tensor.Offset, tensor.Bytes))
                        throw new SessionRefusedException($"region '{spec.Name}': tensor '{tensor.Name}' ([{tensor.Offset}, {tensor.Offset + tensor.Bytes})) does not lie within one of its allocations");
                return new ClientRegion(spec.Name, null, buffer);
            }
            catch
            {
                buffer.Dispose();
                throw;
            }
        }
        finally
        {
            foreach (var (_, buffer) in opened)
                buffer.Dispose();
        }
    }

    public void Dispose()
    {
        Buffer.Dispose();
        _region?.Dispose();
    }
}

/// <summary>
/// The gate of a consumer with GPU regions (<c>nccl_swap_gate</c>): a page of its shared memory whose words the
/// consumer's stream and the agent's stream write and wait on, so that neither host thread waits for the other.
/// </summary>
internal sealed unsafe class ConsumerGate(ClientRegion region)
{
    public static readonly long QuiescedOffset = Marshal.OffsetOf<Gate>(nameof(Gate.Quiesced));
    public static readonly long DoneOffset = Marshal.OffsetOf<Gate>(nameof(Gate.Done));
    public static readonly long PassedOffset = Marshal.OffsetOf<Gate>(nameof(Gate.Passed));

    public ClientRegion Region { get; } = region;

    /// <summary>The low 32 bits of the state word the consumer's stream has switched to (flip).</summary>
    public uint Passed => Volatile.Read(ref Word(PassedOffset));

    /// <summary>
    /// Writes <paramref name="sequence"/> to the word at <paramref name="offset"/> from the CPU, unless it is there
    /// already: "done" when the agent's stream will not (a copy-in that failed before it was queued), "quiesced"
    /// when the consumer is gone and the agent's stream must not wait for it any more.
    /// </summary>
    public void Release(long offset, uint sequence)
    {
        ref uint word = ref Word(offset);
        if ((int)(Volatile.Read(ref word) - sequence) < 0)
            Volatile.Write(ref word, sequence);
    }

    private ref uint Word(long offset) => ref *(uint*)(Region.Pointer + (nint)offset);
}

/// <summary>
/// A registered client of a weight set: its session, its layout and its regions. The regions stay mapped while
/// any work uses them (<see cref="TryEnter"/>/<see cref="Exit"/>), even if the client leaves meanwhile; they are
/// unmapped when it has left and the last such work is done.
/// </summary>
internal abstract class Registration(SessionInfo session, RegionLayout layout, ClientRegion[] regions)
{
    private readonly Lock _lock = new();
    private int _users;
    private bool _gone;

    public SessionInfo Session { get; } = session;

    public RegionLayout Layout { get; } = layout;

    public ClientRegion[] Regions { get; } = regions;

    public bool IsGone
    {
        get
        {
            lock (_lock)
                return _gone;
        }
    }

    public bool TryEnter()
    {
        lock (_lock)
        {
            if (_gone)
                return false;
            _users++;
            return true;
        }
    }

    public void Exit()
    {
        lock (_lock)
        {
            if (--_users == 0 && _gone)
                Unmap();
        }
    }

    /// <summary>The client left (or was ended): no new work starts on its regions.</summary>
    public void Leave()
    {
        lock (_lock)
        {
            if (_gone)
                return;
            _gone = true;
            if (_users == 0)
                Unmap();
        }
    }

    private void Unmap()
    {
        foreach (ClientRegion region in Regions)
            region.Dispose();
    }

    public override string ToString() => $"{Session.Role.ToString().ToLowerInvariant()} pid {Session.Peer.Pid} (session {Session.Id})";
}

internal sealed class PublisherRegistration(SessionInfo session, RegionLayout layout, ClientRegion region)
    : Registration(session, layout, [region])
{
    public ClientRegion Region => Regions[0];
}

internal sealed class ConsumerRegistration(SessionInfo session, RegionLayout layout, ConsumerMode mode, ClientRegion[] regions, ConsumerGate? gate, ulong serving)
    : Registration(session, layout, gate is null ? regions : [.. regions, gate.Region])
{
    private readonly ClientRegion[] _weights = regions;
    private readonly Lock _states = new();
    private readonly List<ulong> _since = []; // states activated after the one it last acknowledged: it may have switched to any
    private ulong _serving = serving;
    private long _acknowledgements;

    public ConsumerMode Mode { get; } = mode;

    /// <summary>Present when its weights are GPU memory: its stream and the agent's order their work through it.</summary>
    public ConsumerGate? Gate { get; } = gate;

    /// <summary>The state word the consumer last said it serves (its hello, then its acknowledgements and copy-ins).</summary>
    public ulong Serving
    {
        get
        {
            lock (_states)
                return _serving;
        }
    }

    public long Acknowledgements => Interlocked.Read(ref _acknowledgements);

    /// <summary>Its bit in the row's canary lanes (0..63), or -1: never a canary. Given under the weight set's membership lock.</summary>
    public int Lane { get; set; } = -1;

    /// <summary>What it reported serving, over its whole session (requests, errors, latencies, quality).</summary>
    public ServingFigures Reported { get; } = new();

    /// <summary>A new state was activated (recorded before the table shows it): the consumer may switch to it at any step from now.</summary>
    public void Activated(ulong state)
    {
        lock (_states)
            _since.Add(state);
    }

    /// <summary>The consumer serves <paramref name="state"/> now: states activated up to it no longer matter.</summary>
    public void Acknowledge(ulong state)
    {
        lock (_states)
        {
            _serving = state;
            int at = _since.LastIndexOf(state);
            _since.RemoveRange(0, at + 1);
        }
        Interlocked.Increment(ref _acknowledgements);
    }

    /// <summary>The buffers that hold slot <paramref name="slot"/> (copy-in consumers have one, whatever the slot).</summary>
    public ClientRegion Slot(int slot) => Mode == ConsumerMode.Flip ? _weights[slot] : _weights[0];

    /// <summary>
    /// Whether the consumer may be reading slot <paramref name="slot"/> now: the slot of the state it acknowledged,
    /// or of any state activated since (it may have switched without the acknowledgement having arrived yet); and,
    /// with a gate, any slot until its stream has passed the switch it acknowledged (work queued before the switch
    /// may still read the other slot).
    /// </summary>
    public bool MayRead(int slot)
    {
        lock (_states)
        {
            if (_serving != 0 && VersionEntry.UnpackState(_serving).Slot == slot)
                return true;
            if (Gate is { } gate && gate.Passed != (uint)_serving)
                return true;
            foreach (ulong state in _since)
                if (VersionEntry.UnpackState(state).Slot == slot)
                    return true;
            return false;
        }
    }
}

/// <summary>Part of an allocation in a GPU region: its CUDA IPC handle, <paramref name="Bytes"/> bytes from <paramref name="Offset"/> of it, placed at <paramref name="At"/>.</summary>
internal readonly record struct CudaSegment(CuIpcMemHandle Handle, long Offset, long Bytes, long At);

/// <summary>A region a hello names: shared memory (a descriptor came with it) or GPU memory (<paramref name="Segments"/>).</summary>
internal sealed record RegionSpec(string Name, CudaSegment[]? Segments)
{
    public bool IsDevice => Segments is not null;

    public const int MaxSegments = 1 << 16;

    /// <summary>A string (shared memory) or <c>{"name", "cuda": [{"handle", "offset", "bytes", "at"}, ...]}</c>; errors name the region and the field.</summary>
    public static RegionSpec Parse(JsonElement entry, int index)
    {
        if (entry.ValueKind == JsonValueKind.String)
            return new RegionSpec(entry.GetString()!, null);
        if (entry.ValueKind != JsonValueKind.Object || !entry.TryGetProperty("name", out JsonElement n) || n.ValueKind != JsonValueKind.String)
            throw new SessionRefusedException($"regions[{index}] must be a name (shared memory sent as a descriptor) or an object with a name and its \"cuda\" allocations");
        string name = n.GetString()!;
        if (!entry.TryGetProperty("cuda", out JsonElement list) || list.ValueKind != JsonValueKind.Array || list.GetArrayLength() == 0)
            throw new SessionRefusedException($"region '{name}': cuda must be a non-empty array of {{\"handle\", \"offset\", \"bytes\", \"at\"}}");
        if (list.GetArrayLength() > MaxSegments)
            throw new SessionRefusedException($"region '{name}': {list.GetArrayLength()} allocations, more than {MaxSegments}");
        var segments = new List<CudaSegment>();
        long end = 0;
        foreach (JsonElement s in list.EnumerateArray())
        {
            string where = $"region '{name}' allocation {segments.Count}";
            CuIpcMemHandle handle;
            try
            {
                handle = s.ValueKind == JsonValueKind.Object && s.TryGetProperty("handle", out JsonElement h) && h.ValueKind == JsonValueKind.String
                    ? CuIpcMemHandle.FromHex(h.GetString()!)
                    : throw new SessionRefusedException($"{where}: handle must be a string of {2 * CuIpcMemHandle.Size} hex digits");
            }
            catch (FormatException e)
            {
                throw new SessionRefusedException($"{where}: handle: {e.Message}");
            }
            long offset = Whole(s, "offset", where);
            long bytes = Whole(s, "bytes", where);
            long at = Whole(s, "at", where);
            if (bytes <= 0)
                throw new SessionRefusedException($"{where}: bytes must be positive");
            if (offset < 0)
                throw new SessionRefusedException($"{where}: offset must not be negative");
            if (at < 0 || at > long.MaxValue - bytes)
                throw new SessionRefusedException($"{where}: at {at} is out of range");
            if (segments.Count > 0 && at < end + RegionLayout.PackedAlignment)
                throw new SessionRefusedException($"{where}: at {at} must be at least {RegionLayout.PackedAlignment} bytes past the end of the one before ({end}), so that no copy spans two allocations");
            segments.Add(new CudaSegment(handle, offset, bytes, at));
            end = at + bytes;
        }
        return new RegionSpec(name, [.. segments]);
    }

    private static long Whole(JsonElement segment, string field, string where) =>
        segment.TryGetProperty(field, out JsonElement v) && v.ValueKind == JsonValueKind.Number && v.TryGetInt64(out long value)
            ? value
            : throw new SessionRefusedException($"{where}: {field} must be a whole number");
}

/// <summary>What a client's hello registers, read and checked; errors name the field, the tensor or the region.</summary>
internal sealed record Hello(RegionLayout? Layout, RegionSpec[] Regions, RegionSpec? Gate, ConsumerMode Mode, ulong Serving)
{
    public const string GateName = "gate";

    public static Hello Parse(JsonElement hello, Role role, int descriptors)
    {
        RegionLayout? layout = null;
        try
        {
            if (hello.TryGetProperty("tensors", out JsonElement tensors))
                layout = RegionLayout.FromJson(tensors);
        }
        catch (LayoutException e)
        {
            throw new SessionRefusedException($"tensors: {e.Message}");
        }
        var regions = new List<RegionSpec>();
        if (hello.TryGetProperty("regions", out JsonElement names))
        {
            if (names.ValueKind != JsonValueKind.Array)
                throw new SessionRefusedException("regions must be an array: names of shared memory (one per descriptor sent with the hello) or GPU regions");
            int index = 0;
            foreach (JsonElement entry in names.EnumerateArray())
                regions.Add(RegionSpec.Parse(entry, index++));
        }
        int shared = regions.Count(r => !r.IsDevice);
        if (shared != descriptors)
            throw new SessionRefusedException($"the hello names {shared} shared-memory region(s) but {descriptors} descriptor(s) came with it");

        ConsumerMode mode = ConsumerMode.Flip;
        if (hello.TryGetProperty("mode", out JsonElement m))
            mode = m.ValueKind == JsonValueKind.String ? m.GetString() switch
            {
                "flip" => ConsumerMode.Flip,
                "copy-in" => ConsumerMode.CopyIn,
                var other => throw new SessionRefusedException($"mode '{other}' is not flip or copy-in"),
            } : throw new SessionRefusedException("mode must be \"flip\" or \"copy-in\"");
        ulong serving = 0;
        if (hello.TryGetProperty("serving", out JsonElement s) && !(s.ValueKind == JsonValueKind.Number && s.TryGetUInt64(out serving) && (serving == 0 || (serving & 1) == 1)))
            throw new SessionRefusedException("serving must be a state word of the version table, or 0 for none");

        RegionSpec? gate = null;
        if (role == Role.Consumer && regions.Count > 0 && regions[^1] is { IsDevice: false, Name: GateName } last)
        {
            gate = last;
            regions.RemoveAt(regions.Count - 1);
        }
        int expected = role switch
        {
            Role.Publisher => 1,
            Role.Consumer => mode == ConsumerMode.Flip ? 2 : 1,
            _ => 0,
        };
        if (role == Role.Operator && (layout is not null || regions.Count > 0))
            throw new SessionRefusedException("an operator registers no tensors or regions");
        if (role != Role.Operator && layout is null && (regions.Count > 0 || gate is not null))
            throw new SessionRefusedException("regions came without tensors: say where each tensor lies");
        if (layout is not null && regions.Count != expected)
        {
            string what = role == Role.Publisher ? "a publisher registers one region (its tensors)"
                : mode == ConsumerMode.Flip ? "a flip consumer registers two regions (slots A and B)"
                : "a copy-in consumer registers one region (its weights)";
            throw new SessionRefusedException($"{what}, not {regions.Count}");
        }
        bool onGpu = regions.Any(r => r.IsDevice);
        if (role == Role.Consumer && onGpu && gate is null)
            throw new SessionRefusedException($"a consumer with GPU regions also sends its gate, last: a memfd named '{GateName}' of one page (nccl_swap_gate), through which its stream and the agent's order their work");
        if (gate is not null && !onGpu)
            throw new SessionRefusedException($"region '{GateName}' is a gate, which only a consumer with GPU regions sends");
        return new Hello(layout, [.. regions], gate, mode, serving);
    }
}

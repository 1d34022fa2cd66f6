using System.Text.Json;
using Microsoft.Win32.SafeHandles;
using NcclSwap.ControlPlane.Abi;
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

/// <summary>A client's region of shared memory (a memfd it passed with its hello), mapped into the agent and the backend.</summary>
internal sealed class ClientRegion : IDisposable
{
    private readonly SharedRegion _region;

    private ClientRegion(string name, SharedRegion region, IDeviceBuffer buffer)
    {
        Name = name;
        _region = region;
        Buffer = buffer;
    }

    public string Name { get; }

    public IDeviceBuffer Buffer { get; }

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

    public void Dispose()
    {
        Buffer.Dispose();
        _region.Dispose();
    }
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

internal sealed class ConsumerRegistration(SessionInfo session, RegionLayout layout, ConsumerMode mode, ClientRegion[] regions, ulong serving)
    : Registration(session, layout, regions)
{
    private readonly Lock _states = new();
    private readonly List<ulong> _since = []; // states activated after the one it last acknowledged: it may have switched to any
    private ulong _serving = serving;
    private long _acknowledgements;

    public ConsumerMode Mode { get; } = mode;

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
    public ClientRegion Slot(int slot) => Mode == ConsumerMode.Flip ? Regions[slot] : Regions[0];

    /// <summary>
    /// Whether the consumer may be reading slot <paramref name="slot"/> now: the slot of the state it acknowledged,
    /// or of any state activated since (it may have switched without the acknowledgement having arrived yet).
    /// </summary>
    public bool MayRead(int slot)
    {
        lock (_states)
        {
            if (_serving != 0 && VersionEntry.UnpackState(_serving).Slot == slot)
                return true;
            foreach (ulong state in _since)
                if (VersionEntry.UnpackState(state).Slot == slot)
                    return true;
            return false;
        }
    }
}

/// <summary>What a client's hello registers, read and checked; errors name the field, the tensor or the region.</summary>
internal sealed record Hello(RegionLayout? Layout, string[] RegionNames, ConsumerMode Mode, ulong Serving)
{
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
        string[] regions = [];
        if (hello.TryGetProperty("regions", out JsonElement names))
        {
            if (names.ValueKind != JsonValueKind.Array || names.EnumerateArray().Any(n => n.ValueKind != JsonValueKind.String))
                throw new SessionRefusedException("regions must be an array of names, one per descriptor sent with the hello");
            regions = names.EnumerateArray().Select(n => n.GetString()!).ToArray();
        }
        if (regions.Length != descriptors)
            throw new SessionRefusedException($"the hello names {regions.Length} region(s) but {descriptors} descriptor(s) came with it");

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

        int expected = role switch
        {
            Role.Publisher => 1,
            Role.Consumer => mode == ConsumerMode.Flip ? 2 : 1,
            _ => 0,
        };
        if (role == Role.Operator && (layout is not null || regions.Length > 0))
            throw new SessionRefusedException("an operator registers no tensors or regions");
        if (role != Role.Operator && layout is null && regions.Length > 0)
            throw new SessionRefusedException("regions came without tensors: say where each tensor lies");
        if (layout is not null && regions.Length != expected)
        {
            string what = role == Role.Publisher ? "a publisher registers one region (its tensors)"
                : mode == ConsumerMode.Flip ? "a flip consumer registers two regions (slots A and B)"
                : "a copy-in consumer registers one region (its weights)";
            throw new SessionRefusedException($"{what}, not {regions.Length}");
        }
        return new Hello(layout, regions, mode, serving);
    }
}

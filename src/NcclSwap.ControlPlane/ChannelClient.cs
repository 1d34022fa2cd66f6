using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane;

/// <summary>The refusal of the agent's front door, with its reason.</summary>
public sealed class ChannelRefusedException(string message) : Exception(message);

/// <summary>The agent closed the session (it stopped, died, or ended the lease) while a request waited.</summary>
public sealed class ChannelClosedException(string message) : IOException(message);

/// <summary>
/// What a client registers with its hello: where its tensors lie, and the regions (one layout for all) that hold them:
/// shared memory (<paramref name="Regions"/>, sent as descriptors) or GPU memory (<paramref name="DeviceRegions"/>).
/// </summary>
public sealed record RegistrationRequest(RegionLayout Layout, IReadOnlyList<WeightRegion> Regions, string? Mode = null, ulong Serving = 0,
    IReadOnlyList<DeviceRegion>? DeviceRegions = null);

/// <summary>
/// A region in GPU memory: <paramref name="Bytes"/> bytes from <paramref name="Offset"/> of the allocation that
/// <paramref name="Handle"/> (its CUDA IPC handle) names, which the agent opens on its GPU. The owner keeps the
/// allocation while it is registered.
/// </summary>
public sealed record DeviceRegion(string Name, NcclSwap.Cuda.CuIpcMemHandle Handle, long Offset, long Bytes);

/// <summary>
/// A client's session with the agent (the C# counterpart of the Python client's <c>connect</c>): the version
/// table (read-only) and the session's rings, received as descriptors. Dispose ends the session.
/// </summary>
public sealed class ChannelClient : IDisposable
{
    private readonly Socket _socket;
    private long _nextId;

    private readonly Bell _bell;

    private ChannelClient(Socket socket, long session, Role role, VersionTable table, SharedRing requests, SharedRing responses, Bell bell, int row, ulong state)
    {
        _bell = bell;
        _socket = socket;
        Session = session;
        Role = role;
        Table = table;
        Requests = requests;
        Responses = responses;
        Row = row;
        WelcomeState = state;
    }

    /// <summary>The weight set's row in the version table (-1 when the front door has no agent behind it).</summary>
    public int Row { get; }

    /// <summary>A consumer's lane: while its bit is set in the row's canary lanes, it serves the canary version (-1: never).</summary>
    public int Lane { get; private init; } = -1;

    /// <summary>The active state when the agent accepted this client.</summary>
    public ulong WelcomeState { get; }

    /// <summary>False once the agent has closed the session (checked with a poll of the socket: a system call, not for every step).</summary>
    public bool IsAlive => !(_socket.Poll(0, SelectMode.SelectRead) && _socket.Available == 0);

    /// <summary>Blocks until the agent closes the session (or this client is disposed).</summary>
    public void WaitUntilClosed()
    {
        byte[] sink = new byte[64];
        try
        {
            while (_socket.Receive(sink) > 0)
            {
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
    }

    /// <summary>A request of this session: a fresh id, this session's row.</summary>
    public Request NewRequest(RequestKind kind, ulong version = 0, ushort flags = 0) =>
        Messages.NewRequest(kind, (ulong)Interlocked.Increment(ref _nextId), version, (uint)Math.Max(Row, 0)) with { Flags = flags };

    /// <summary>
    /// Writes <paramref name="request"/> without waiting for its answer (which <see cref="DrainResponses"/> drops
    /// later), ringing the agent's bell if its dispatcher sleeps. False if the ring stayed full for <paramref name="timeout"/>.
    /// </summary>
    public bool Send(in Request request, TimeSpan timeout)
    {
        if (!Requests.Write(request, timeout))
            return false;
        Interlocked.MemoryBarrier(); // the head's store before the load of the announcement (see RequestDispatcher)
        if (Requests.Sleepers != 0)
            _bell.Ring();
        return true;
    }

    /// <summary>
    /// Sends <paramref name="request"/> and waits for its response (others that arrive first, such as answers to
    /// acknowledgements nobody waited for, are dropped). Throws <see cref="ChannelClosedException"/> if the agent
    /// goes away, <see cref="TimeoutException"/> after <paramref name="timeout"/>.
    /// </summary>
    public Response Call(in Request request, TimeSpan timeout)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (!Send(request, TimeSpan.FromMilliseconds(50)))
            Check(request, clock, timeout);
        while (true)
        {
            if (Responses.Read(out Response response, TimeSpan.FromMilliseconds(50)))
            {
                if (response.Id == request.Id)
                    return response;
                continue;
            }
            Check(request, clock, timeout);
        }
    }

    /// <summary>Drops responses nobody waits for (to fire-and-forget requests), so the ring never fills.</summary>
    public void DrainResponses()
    {
        while (Responses.TryRead(out Response _))
        {
        }
    }

    private void Check(in Request request, System.Diagnostics.Stopwatch clock, TimeSpan timeout)
    {
        if (!IsAlive)
            throw new ChannelClosedException($"the agent closed session {Session} while {((RequestKind)request.Kind).ToString().ToLowerInvariant()} {request.Id} waited");
        if (clock.Elapsed > timeout)
            throw new TimeoutException($"no answer to {((RequestKind)request.Kind).ToString().ToLowerInvariant()} {request.Id} within {timeout.TotalSeconds:0.###} s");
    }

    /// <summary>The detail text of a response.</summary>
    public static string Detail(in Response response) =>
        Encoding.UTF8.GetString(System.Runtime.InteropServices.MemoryMarshal.AsBytes(new ReadOnlySpan<PayloadBytes>(in response.Detail))[..(int)Math.Min(response.DetailBytes, AbiConstants.PayloadBytes)]);

    public long Session { get; }

    public Role Role { get; }

    public VersionTable Table { get; }

    /// <summary>This client writes requests here.</summary>
    public SharedRing Requests { get; }

    /// <summary>The agent's responses arrive here.</summary>
    public SharedRing Responses { get; }

    public static ChannelClient Connect(string socketPath, Role role, string weightSet, TimeSpan? timeout = null, RegistrationRequest? registration = null)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        int[] descriptors = [];
        try
        {
            socket.ReceiveTimeout = socket.SendTimeout = (int)(timeout ?? TimeSpan.FromSeconds(10)).TotalMilliseconds;
            socket.Connect(new UnixDomainSocketEndPoint(socketPath));
            var json = new MemoryStream();
            using (var writer = new Utf8JsonWriter(json))
            {
                writer.WriteStartObject();
                writer.WriteString("role", role.ToString().ToLowerInvariant());
                writer.WriteString("weight_set", weightSet);
                if (registration is not null)
                {
                    writer.WritePropertyName("tensors");
                    registration.Layout.WriteJson(writer);
                    writer.WriteStartArray("regions");
                    foreach (WeightRegion region in registration.Regions)
                        writer.WriteStringValue(region.Name);
                    foreach (DeviceRegion region in registration.DeviceRegions ?? [])
                    {
                        writer.WriteStartObject();
                        writer.WriteString("name", region.Name);
                        writer.WriteStartArray("cuda");
                        writer.WriteStartObject();
                        writer.WriteString("handle", region.Handle.ToHex());
                        writer.WriteNumber("offset", region.Offset);
                        writer.WriteNumber("bytes", region.Bytes);
                        writer.WriteNumber("at", 0);
                        writer.WriteEndObject();
                        writer.WriteEndArray();
                        writer.WriteEndObject();
                    }
                    writer.WriteEndArray();
                    if (registration.Mode is not null)
                        writer.WriteString("mode", registration.Mode);
                    writer.WriteNumber("serving", registration.Serving);
                }
                writer.WriteEndObject();
            }
            json.WriteByte((byte)'\n');
            FdPassing.Send(socket, json.ToArray(), registration?.Regions.Select(r => r.Descriptor).ToArray() ?? []);
            byte[] buffer = new byte[64 << 10];
            (int length, descriptors) = FdPassing.Receive(socket, buffer);
            if (length == 0)
                throw new ChannelRefusedException($"{socketPath}: the agent closed the connection without an answer");
            using JsonDocument reply = JsonDocument.Parse(buffer.AsMemory(0, length));
            if (!reply.RootElement.GetProperty("ok").GetBoolean())
                throw new ChannelRefusedException($"{socketPath}: {reply.RootElement.GetProperty("error").GetString()}");
            if (descriptors.Length != 4)
                throw new IOException($"{socketPath}: the agent sent {descriptors.Length} descriptors, not 4 (table, requests, responses, bell)");
            long session = reply.RootElement.GetProperty("session").GetInt64();
            int row = reply.RootElement.TryGetProperty("row", out JsonElement r) ? r.GetInt32() : -1;
            ulong state = reply.RootElement.TryGetProperty("state", out JsonElement st) ? st.GetUInt64() : 0;
            int lane = reply.RootElement.TryGetProperty("lane", out JsonElement l) ? l.GetInt32() : -1;
            VersionTable table = VersionTable.FromDescriptor(descriptors[0]);
            SharedRing requests = SharedRing.FromDescriptor(descriptors[1], $"session {session} requests");
            SharedRing responses = SharedRing.FromDescriptor(descriptors[2], $"session {session} responses");
            Bell bell = Bell.FromDescriptor(descriptors[3]);
            descriptors = [];
            socket.ReceiveTimeout = 0; // from now on the socket only tells when the session ends (WaitUntilClosed)
            return new ChannelClient(socket, session, role, table, requests, responses, bell, row, state) { Lane = lane };
        }
        catch
        {
            foreach (int fd in descriptors)
                new Microsoft.Win32.SafeHandles.SafeFileHandle(fd, ownsHandle: true).Dispose();
            socket.Dispose();
            throw;
        }
    }

    public void Dispose()
    {
        _bell.Dispose();
        Requests.Dispose();
        Responses.Dispose();
        Table.Dispose();
        _socket.Dispose();
    }
}

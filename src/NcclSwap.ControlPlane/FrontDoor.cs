using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane;

/// <summary>What a client may do; a peer can hold several.</summary>
[Flags]
public enum Role
{
    None = 0,
    Publisher = 1,
    Consumer = 2,
    Operator = 4,
}

/// <summary>Who is at the other end of a socket, as the kernel says (SO_PEERCRED), never as the client says.</summary>
public readonly record struct PeerIdentity(int Pid, uint Uid, uint Gid)
{
    public override string ToString() => $"uid {Uid} gid {Gid} (pid {Pid})";
}

/// <summary>Roles granted per uid and per gid; a peer gets the union of its uid's and its gid's.</summary>
public sealed class RolePolicy
{
    public Dictionary<uint, Role> Users { get; } = [];

    public Dictionary<uint, Role> Groups { get; } = [];

    public Role For(PeerIdentity peer) =>
        (Users.TryGetValue(peer.Uid, out Role byUser) ? byUser : Role.None) | (Groups.TryGetValue(peer.Gid, out Role byGroup) ? byGroup : Role.None);
}

/// <summary>A refused connection, for the audit log: who, what they asked for, and why not.</summary>
public readonly record struct Refusal(PeerIdentity Peer, string Request, string Reason);

/// <summary>
/// The agent's front door: a Unix socket where a client says which role it wants, the agent checks the
/// peer's kernel identity against the policy and answers with a line of JSON that carries, as SCM_RIGHTS
/// descriptors, a read-only descriptor of the version table and the session's private request and response
/// rings (anonymous memfds: nothing on disk, nothing another user can open). The connection stays open as the
/// client's lease: when it closes, for whatever reason, the agent drops the session's rings.
/// </summary>
public sealed class FrontDoor : IAsyncDisposable
{
    public const int MaxHelloBytes = 4096;
    public const int RingCapacity = 64;

    private readonly Socket _listener;
    private readonly RolePolicy _policy;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _accepting;
    private readonly Dictionary<long, Session> _sessions = [];
    private readonly List<Task> _serving = [];
    private readonly Lock _lock = new();
    private static int s_doors;
    private long _nextSession;

    public FrontDoor(string socketPath, string tablePath, RolePolicy policy)
    {
        SocketPath = socketPath;
        TablePath = tablePath;
        _policy = policy;
        if (File.Exists(socketPath))
        {
            using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                probe.Connect(new UnixDomainSocketEndPoint(socketPath));
                throw new InvalidOperationException($"{socketPath}: another agent is listening there");
            }
            catch (SocketException)
            {
                File.Delete(socketPath); // a stale socket of an agent that is gone
            }
        }
        _listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        _listener.Bind(new UnixDomainSocketEndPoint(socketPath));
        File.SetUnixFileMode(socketPath, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.GroupWrite);
        _listener.Listen(64);
        _accepting = Task.Run(AcceptLoop);
    }

    public string SocketPath { get; }

    public string TablePath { get; }

    /// <summary>How this front door's session rings are named (<c>memfd:PREFIX{id}-requests</c> in /proc/PID/fd).</summary>
    public string SessionPrefix { get; } = $"nccl-swap-{Environment.ProcessId}.{Interlocked.Increment(ref s_doors)}-session-";

    /// <summary>Raised for every refused client, on a background thread.</summary>
    public event Action<Refusal>? Refused;

    /// <summary>Raised when a session starts and when it ends, on a background thread.</summary>
    public event Action<SessionInfo, bool>? SessionChanged;

    public IReadOnlyList<SessionInfo> Sessions
    {
        get
        {
            lock (_lock)
                return _sessions.Values.Select(s => s.Info).ToList();
        }
    }

    /// <summary>
    /// Runs <paramref name="use"/> on the agent's ends of session <paramref name="id"/>'s rings (it reads
    /// requests and writes responses), holding the session open meanwhile; false if the session has ended.
    /// </summary>
    public bool TryUse(long id, Action<SharedRing, SharedRing> use)
    {
        Session? session;
        lock (_lock)
            _sessions.TryGetValue(id, out session);
        if (session is null)
            return false;
        lock (session)
        {
            if (session.Closed)
                return false;
            use(session.Requests, session.Responses);
            return true;
        }
    }

    /// <summary>For tests: the rings of a live session; unsafe once it may have ended (use <see cref="TryUse"/>).</summary>
    internal bool TryGetRings(long id, out SharedRing requests, out SharedRing responses)
    {
        lock (_lock)
        {
            bool found = _sessions.TryGetValue(id, out Session? session);
            requests = session?.Requests!;
            responses = session?.Responses!;
            return found;
        }
    }

    private async Task AcceptLoop()
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await _listener.AcceptAsync(_stop.Token);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                return;
            }
            lock (_lock)
            {
                _serving.RemoveAll(t => t.IsCompleted);
                _serving.Add(Task.Run(() => Serve(client)));
            }
        }
    }

    private async Task Serve(Socket client)
    {
        using (client)
        {
            PeerIdentity peer = Identify(client);
            string hello = "";
            Session? session = null;
            try
            {
                using var helloTimeout = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token);
                helloTimeout.CancelAfter(TimeSpan.FromSeconds(10));
                hello = await ReadLine(client, helloTimeout.Token);
                (Role role, string weightSet) = ParseHello(hello);
                Role granted = _policy.For(peer);
                if ((granted & role) == 0)
                    throw new RefusedException($"{peer} may not act as {role.ToString().ToLowerInvariant()} (granted: {granted})");
                session = Open(peer, role, weightSet);
                using (var table = File.OpenHandle(TablePath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite))
                    FdPassing.Send(client, Encoding.UTF8.GetBytes(Reply(session.Info)),
                        [(int)table.DangerousGetHandle(), session.Requests.Descriptor, session.Responses.Descriptor]);
                SessionChanged?.Invoke(session.Info, true);

                // The lease: the session lives until the client closes its end (or dies).
                byte[] sink = new byte[256];
                while (await client.ReceiveAsync(sink, SocketFlags.None, _stop.Token) > 0)
                {
                }
            }
            catch (RefusedException e)
            {
                Refused?.Invoke(new Refusal(peer, hello, e.Message));
                await TrySend(client, Error(e.Message));
            }
            catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
            {
                // Timed out, or the client went away: nothing to answer.
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidDataException)
            {
                // The agent's side failed (memfd, the table's file): the client is told, and nothing is left open.
                Refused?.Invoke(new Refusal(peer, hello, $"the agent could not open the session: {e.Message}"));
                await TrySend(client, Error($"the agent could not open the session: {e.Message}"));
            }
            finally
            {
                if (session is not null)
                    Close(session);
            }
        }
    }

    private Session Open(PeerIdentity peer, Role role, string weightSet)
    {
        long id = Interlocked.Increment(ref _nextSession);
        int entryBytes = Marshal.SizeOf<Request>();
        var requests = SharedRing.CreateAnonymous($"{SessionPrefix}{id}-requests", RingCapacity, entryBytes);
        var responses = SharedRing.CreateAnonymous($"{SessionPrefix}{id}-responses", RingCapacity, entryBytes);
        var session = new Session(new SessionInfo(id, peer, role, weightSet, requests.Path, responses.Path), requests, responses);
        lock (_lock)
            _sessions.Add(id, session);
        return session;
    }

    private void Close(Session session)
    {
        lock (_lock)
            _sessions.Remove(session.Info.Id);
        lock (session)
        {
            session.Closed = true;
            session.Requests.Dispose();
            session.Responses.Dispose();
        }
        SessionChanged?.Invoke(session.Info, false);
    }

    private string Reply(SessionInfo info)
    {
        var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream))
        {
            writer.WriteStartObject();
            writer.WriteBoolean("ok", true);
            writer.WriteNumber("session", info.Id);
            writer.WriteString("role", info.Role.ToString().ToLowerInvariant());
            writer.WriteString("table", TablePath);
            writer.WriteStartArray("descriptors"); // the order of the SCM_RIGHTS descriptors sent with this line
            writer.WriteStringValue("table");
            writer.WriteStringValue("requests");
            writer.WriteStringValue("responses");
            writer.WriteEndArray();
            writer.WriteNumber("entry_bytes", Marshal.SizeOf<Request>());
            writer.WriteEndObject();
        }
        return Encoding.UTF8.GetString(stream.ToArray()) + "\n";
    }

    private static byte[] Error(string message)
    {
        var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream))
        {
            writer.WriteStartObject();
            writer.WriteBoolean("ok", false);
            writer.WriteString("error", message);
            writer.WriteEndObject();
        }
        return [.. stream.ToArray(), (byte)'\n'];
    }

    /// <summary>The hello: <c>{"role": "publisher|consumer|operator", "weight_set": "name"}</c> on one line.</summary>
    internal static (Role Role, string WeightSet) ParseHello(string line)
    {
        try
        {
            using JsonDocument document = JsonDocument.Parse(line);
            JsonElement root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new RefusedException("the hello must be a JSON object");
            string? role = root.TryGetProperty("role", out JsonElement r) && r.ValueKind == JsonValueKind.String ? r.GetString() : null;
            string? weightSet = root.TryGetProperty("weight_set", out JsonElement w) && w.ValueKind == JsonValueKind.String ? w.GetString() : null;
            Role parsed = role switch
            {
                "publisher" => Role.Publisher,
                "consumer" => Role.Consumer,
                "operator" => Role.Operator,
                _ => throw new RefusedException($"unknown role '{role}' (publisher, consumer or operator)"),
            };
            if (string.IsNullOrEmpty(weightSet) || Encoding.UTF8.GetByteCount(weightSet) >= AbiConstants.NameBytes)
                throw new RefusedException($"weight_set must be a name of 1 to {AbiConstants.NameBytes - 1} bytes");
            return (parsed, weightSet);
        }
        catch (JsonException e)
        {
            throw new RefusedException($"the hello is not JSON: {e.Message}");
        }
    }

    private static PeerIdentity Identify(Socket client)
    {
        Span<byte> credentials = stackalloc byte[12]; // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
        client.GetRawSocketOption(1 /* SOL_SOCKET */, 17 /* SO_PEERCRED */, credentials);
        return new PeerIdentity(BitConverter.ToInt32(credentials), BitConverter.ToUInt32(credentials[4..]), BitConverter.ToUInt32(credentials[8..]));
    }

    private static async Task<string> ReadLine(Socket client, CancellationToken cancel)
    {
        byte[] buffer = new byte[MaxHelloBytes];
        int length = 0;
        while (true)
        {
            int read = await client.ReceiveAsync(buffer.AsMemory(length), SocketFlags.None, cancel);
            if (read == 0)
                throw new RefusedException("the client closed the connection before its hello ended");
            int newline = Array.IndexOf(buffer, (byte)'\n', length, read);
            length += read;
            if (newline >= 0)
                return Encoding.UTF8.GetString(buffer, 0, newline);
            if (length == buffer.Length)
                throw new RefusedException($"the hello is longer than {MaxHelloBytes} bytes");
        }
    }

    internal static async Task Send(Socket client, byte[] bytes, CancellationToken cancel)
    {
        for (int sent = 0; sent < bytes.Length;)
            sent += await client.SendAsync(bytes.AsMemory(sent), SocketFlags.None, cancel);
    }

    private static async Task TrySend(Socket client, byte[] bytes)
    {
        try
        {
            await Send(client, bytes, CancellationToken.None);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
    }

    /// <summary>Stops accepting, ends every session (removing its rings) and removes the socket.</summary>
    public async ValueTask DisposeAsync()
    {
        _stop.Cancel();
        _listener.Dispose();
        await _accepting;
        Task[] serving;
        lock (_lock)
            serving = [.. _serving];
        await Task.WhenAll(serving);
        File.Delete(SocketPath);
    }

    private sealed record Session(SessionInfo Info, SharedRing Requests, SharedRing Responses)
    {
        public bool Closed { get; set; }
    }

    private sealed class RefusedException(string message) : Exception(message);
}

/// <summary>One connected client; its rings are named as they appear in /proc/PID/fd (memfd:…).</summary>
public sealed record SessionInfo(long Id, PeerIdentity Peer, Role Role, string WeightSet, string RequestsName, string ResponsesName);

using System.Diagnostics;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using Microsoft.Win32.SafeHandles;
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

    /// <summary>This process's identity (real uid and gid, from /proc/self/status): what the agent sees when it connects to itself.</summary>
    public static PeerIdentity OfThisProcess()
    {
        string[] lines = File.ReadAllLines("/proc/self/status");
        uint Field(string name) => uint.Parse(lines.First(l => l.StartsWith(name, StringComparison.Ordinal)).Split('\t', StringSplitOptions.RemoveEmptyEntries)[1], System.Globalization.CultureInfo.InvariantCulture);
        return new PeerIdentity(Environment.ProcessId, Field("Uid:"), Field("Gid:"));
    }
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

/// <summary>Thrown by an <see cref="ISessionHost"/> (or the front door itself) to refuse a client; the message is the reason it is told.</summary>
public sealed class SessionRefusedException(string message) : Exception(message);

/// <summary>What the agent tells a client it accepted, beyond the descriptors: its weight set's row and the state to start from.</summary>
public readonly record struct SessionWelcome(int Row, ulong State, int Lane = -1);

/// <summary>
/// What the agent does with a client the front door let in, before the client is answered: reads the rest of
/// its hello (what it registers: tensors, regions), takes the descriptors that came with it, and says where the
/// client starts. <see cref="Close"/> follows every successful <see cref="Open"/> when the session ends.
/// </summary>
public interface ISessionHost
{
    /// <summary>
    /// Accepts <paramref name="session"/> or throws <see cref="SessionRefusedException"/> with the reason. Owns
    /// <paramref name="descriptors"/> (the hello's SCM_RIGHTS, in order) from the call on, refused or not.
    /// </summary>
    SessionWelcome Open(SessionInfo session, JsonElement hello, IReadOnlyList<Microsoft.Win32.SafeHandles.SafeFileHandle> descriptors);

    void Close(SessionInfo session);
}

/// <summary>
/// The agent's front door: a Unix socket where a client says which role it wants, the agent checks the
/// peer's kernel identity against the policy and answers with a line of JSON that carries, as SCM_RIGHTS
/// descriptors, a read-only descriptor of the version table, the session's private request and response
/// rings (anonymous memfds: nothing on disk, nothing another user can open) and the request bell (an eventfd). The connection stays open as the
/// client's lease: when it closes, for whatever reason, the agent drops the session's rings.
/// </summary>
public sealed class FrontDoor : IAsyncDisposable
{
    /// <summary>The longest hello: a registration lists every tensor of a weight set.</summary>
    public const int MaxHelloBytes = 1 << 20;
    public const int RingCapacity = 64;

    private readonly Socket _listener;
    private readonly RolePolicy _policy;
    private readonly ISessionHost? _host;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _accepting;
    private readonly Dictionary<long, Session> _sessions = [];
    private readonly List<Task> _serving = [];
    private readonly Lock _lock = new();
    private static int s_doors;
    private long _nextSession;

    /// <param name="socketGroup">The group the socket belongs to (mode 0660): other users' clients in it may connect; null: the agent's group.</param>
    public FrontDoor(string socketPath, string tablePath, RolePolicy policy, ISessionHost? host = null, uint? socketGroup = null)
    {
        SocketPath = socketPath;
        TablePath = tablePath;
        _policy = policy;
        _host = host;
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
        if (socketGroup is uint gid && Interop.Sys.Chown(socketPath, uint.MaxValue, gid) != 0)
            throw new IOException($"{socketPath}: cannot give the socket to group {gid}: {Marshal.GetLastPInvokeErrorMessage()}");
        _listener.Listen(64);
        _accepting = Task.Run(AcceptLoop);
    }

    public string SocketPath { get; }

    public string TablePath { get; }

    /// <summary>The bell every client gets, to wake the dispatcher when it sleeps (<see cref="RequestDispatcher"/>).</summary>
    public Bell RequestBell { get; } = Bell.Create();

    /// <summary>How this front door's session rings are named (<c>memfd:PREFIX{id}-requests</c> in /proc/PID/fd).</summary>
    public string SessionPrefix { get; } = $"nccl-swap-{Environment.ProcessId}.{Interlocked.Increment(ref s_doors)}-session-";

    /// <summary>Raised for every refused client, on a background thread.</summary>
    public event Action<Refusal>? Refused;

    /// <summary>Raised for every operator verb run (<see cref="ICommandHost"/>), once it ended, on a background thread.</summary>
    public event Action<CommandRecord>? CommandRun;

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

    /// <summary>
    /// Ends session <paramref name="id"/> from the agent's side (its lease expired, say): the connection is shut
    /// down, so the client sees it close, and the session is closed as if the client had left. False if it had ended.
    /// </summary>
    public bool End(long id, string reason)
    {
        Session? session;
        lock (_lock)
            _sessions.TryGetValue(id, out session);
        if (session is null)
            return false;
        session.EndReason = reason;
        try
        {
            session.Socket.Shutdown(SocketShutdown.Both);
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
        return true;
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
            bool welcomed = false;
            try
            {
                (hello, List<SafeFileHandle> descriptors) = ReadHello(client, TimeSpan.FromSeconds(10), _stop.Token);
                SessionWelcome welcome = default;
                try
                {
                    using JsonDocument document = ParseJson(hello);
                    (Role role, string weightSet) = ParseHello(document.RootElement);
                    Role granted = _policy.For(peer);
                    if ((granted & role) == 0)
                        throw new SessionRefusedException($"{peer} may not act as {role.ToString().ToLowerInvariant()} (granted: {granted})");
                    if (document.RootElement.TryGetProperty("command", out JsonElement command))
                    {
                        await RunCommand(client, peer, role, weightSet, document.RootElement, command);
                        return;
                    }
                    session = Open(peer, role, weightSet, client);
                    if (_host is not null)
                    {
                        List<SafeFileHandle> handed = descriptors;
                        descriptors = [];
                        welcome = _host.Open(session.Info, document.RootElement, handed);
                        welcomed = true;
                    }
                }
                finally
                {
                    foreach (SafeFileHandle descriptor in descriptors)
                        descriptor.Dispose();
                }
                using (var table = File.OpenHandle(TablePath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite))
                    FdPassing.Send(client, Encoding.UTF8.GetBytes(Reply(session.Info, welcome)),
                        [(int)table.DangerousGetHandle(), session.Requests.Descriptor, session.Responses.Descriptor, RequestBell.Descriptor]);
                SessionChanged?.Invoke(session.Info, true);
                RequestBell.Ring(); // a dispatcher asleep learns of the new session now, not at its next poll

                // The lease: the session lives until the client closes its end (or dies), or the agent ends it.
                byte[] sink = new byte[256];
                while (await client.ReceiveAsync(sink, SocketFlags.None, _stop.Token) > 0)
                {
                }
            }
            catch (SessionRefusedException e)
            {
                Refused?.Invoke(new Refusal(peer, Shorten(hello), e.Message));
                await TrySend(client, Error(e.Message));
            }
            catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
            {
                // Timed out, or the client went away: nothing to answer.
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidDataException)
            {
                // The agent's side failed (memfd, the table's file): the client is told, and nothing is left open.
                Refused?.Invoke(new Refusal(peer, Shorten(hello), $"the agent could not open the session: {e.Message}"));
                await TrySend(client, Error($"the agent could not open the session: {e.Message}"));
            }
            finally
            {
                if (session is not null)
                    Close(session, welcomed);
            }
        }
    }

    /// <summary>An operator's verb: one JSON line in, one out, then the connection closes.</summary>
    private async Task RunCommand(Socket client, PeerIdentity peer, Role role, string weightSet, JsonElement hello, JsonElement command)
    {
        if (role != Role.Operator)
            throw new SessionRefusedException($"commands are for operators; {peer} asked as {role.ToString().ToLowerInvariant()}");
        if (_host is not ICommandHost commands || command.ValueKind != JsonValueKind.String)
            throw new SessionRefusedException(_host is ICommandHost ? "command must be a string" : "this front door runs no commands");
        CommandReply reply = await Task.Run(() => commands.Run(peer, weightSet, hello));
        ulong? version = hello.TryGetProperty("version", out JsonElement v) && v.TryGetUInt64(out ulong number) && number != 0 ? number : null;
        CommandRun?.Invoke(new CommandRecord(peer, command.GetString()!, weightSet, version, reply.Ok, reply.Ok ? reply.Message ?? "" : $"{reply.Code}: {reply.Message}"));
        await Send(client, Encoding.UTF8.GetBytes(reply.ToJsonLine()), _stop.Token);
    }

    private static string Shorten(string hello) => hello.Length <= 512 ? hello : hello[..512] + $"… ({hello.Length} characters)";

    private Session Open(PeerIdentity peer, Role role, string weightSet, Socket socket)
    {
        long id = Interlocked.Increment(ref _nextSession);
        int entryBytes = Marshal.SizeOf<Request>();
        var requests = SharedRing.CreateAnonymous($"{SessionPrefix}{id}-requests", RingCapacity, entryBytes);
        var responses = SharedRing.CreateAnonymous($"{SessionPrefix}{id}-responses", RingCapacity, entryBytes);
        var session = new Session(new SessionInfo(id, peer, role, weightSet, requests.Path, responses.Path), requests, responses, socket);
        lock (_lock)
            _sessions.Add(id, session);
        return session;
    }

    private void Close(Session session, bool welcomed)
    {
        lock (_lock)
            _sessions.Remove(session.Info.Id);
        lock (session)
        {
            session.Closed = true;
            session.Requests.Dispose();
            session.Responses.Dispose();
        }
        if (welcomed)
            _host!.Close(session.Info);
        SessionChanged?.Invoke(session.Info with { EndReason = session.EndReason }, false);
    }

    private string Reply(SessionInfo info, SessionWelcome welcome)
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
            writer.WriteStringValue("bell");
            writer.WriteEndArray();
            writer.WriteNumber("entry_bytes", Marshal.SizeOf<Request>());
            if (_host is not null)
            {
                writer.WriteNumber("row", welcome.Row);
                writer.WriteNumber("state", welcome.State);
                writer.WriteNumber("lane", welcome.Lane);
            }
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

    /// <summary>
    /// The hello: one line of JSON, <c>{"role": "publisher|consumer|operator", "weight_set": "name", …}</c>; what
    /// else it holds (a registration) is the session host's to read.
    /// </summary>
    internal static (Role Role, string WeightSet) ParseHello(JsonElement root)
    {
        if (root.ValueKind != JsonValueKind.Object)
            throw new SessionRefusedException("the hello must be a JSON object");
        string? role = root.TryGetProperty("role", out JsonElement r) && r.ValueKind == JsonValueKind.String ? r.GetString() : null;
        string? weightSet = root.TryGetProperty("weight_set", out JsonElement w) && w.ValueKind == JsonValueKind.String ? w.GetString() : null;
        Role parsed = role switch
        {
            "publisher" => Role.Publisher,
            "consumer" => Role.Consumer,
            "operator" => Role.Operator,
            _ => throw new SessionRefusedException($"unknown role '{role}' (publisher, consumer or operator)"),
        };
        if (string.IsNullOrEmpty(weightSet) || Encoding.UTF8.GetByteCount(weightSet) >= AbiConstants.NameBytes)
            throw new SessionRefusedException($"weight_set must be a name of 1 to {AbiConstants.NameBytes - 1} bytes");
        return (parsed, weightSet);
    }

    private static JsonDocument ParseJson(string line)
    {
        try
        {
            return JsonDocument.Parse(line);
        }
        catch (JsonException e)
        {
            throw new SessionRefusedException($"the hello is not JSON: {e.Message}");
        }
    }

    private static PeerIdentity Identify(Socket client)
    {
        Span<byte> credentials = stackalloc byte[12]; // struct ucred { pid_t pid; uid_t uid; gid_t gid; }
        client.GetRawSocketOption(1 /* SOL_SOCKET */, 17 /* SO_PEERCRED */, credentials);
        return new PeerIdentity(BitConverter.ToInt32(credentials), BitConverter.ToUInt32(credentials[4..]), BitConverter.ToUInt32(credentials[8..]));
    }

    /// <summary>
    /// Reads the hello line and the descriptors sent with it (SCM_RIGHTS, which a plain receive would drop), waiting
    /// at most <paramref name="timeout"/>. The caller owns the descriptors.
    /// </summary>
    private static (string Line, List<SafeFileHandle> Descriptors) ReadHello(Socket client, TimeSpan timeout, CancellationToken stop)
    {
        var descriptors = new List<SafeFileHandle>();
        try
        {
            byte[] buffer = new byte[64 << 10];
            int length = 0;
            var clock = Stopwatch.StartNew();
            while (true)
            {
                if (length == buffer.Length)
                {
                    if (buffer.Length >= MaxHelloBytes)
                        throw new SessionRefusedException($"the hello is longer than {MaxHelloBytes} bytes");
                    Array.Resize(ref buffer, Math.Min(MaxHelloBytes, buffer.Length * 2));
                }
                TimeSpan left = timeout - clock.Elapsed;
                if (left <= TimeSpan.Zero || stop.IsCancellationRequested)
                    throw new OperationCanceledException("no complete hello in time");
                if (!client.Poll(left < TimeSpan.FromMilliseconds(100) ? left : TimeSpan.FromMilliseconds(100), SelectMode.SelectRead))
                    continue;
                (int read, int[] received) = FdPassing.Receive(client, buffer.AsSpan(length), dontWait: true);
                foreach (int fd in received)
                    descriptors.Add(new SafeFileHandle(fd, ownsHandle: true));
                if (read < 0)
                    continue; // nothing after all (EAGAIN)
                if (read == 0)
                    throw new SessionRefusedException("the client closed the connection before its hello ended");
                int newline = Array.IndexOf(buffer, (byte)'\n', length, read);
                length += read;
                if (newline >= 0)
                    return (Encoding.UTF8.GetString(buffer, 0, newline), descriptors);
            }
        }
        catch
        {
            foreach (SafeFileHandle descriptor in descriptors)
                descriptor.Dispose();
            throw;
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
        RequestBell.Dispose();
    }

    private sealed record Session(SessionInfo Info, SharedRing Requests, SharedRing Responses, Socket Socket)
    {
        public bool Closed { get; set; }

        public string? EndReason { get; set; }
    }
}

/// <summary>
/// One connected client; its rings are named as they appear in /proc/PID/fd (memfd:…). When the session has
/// ended, <see cref="EndReason"/> says why if the agent ended it (null when the client left).
/// </summary>
public sealed record SessionInfo(long Id, PeerIdentity Peer, Role Role, string WeightSet, string RequestsName, string ResponsesName)
{
    public string? EndReason { get; init; }

    public override string ToString() => $"session {Id} of {Peer} as {Role.ToString().ToLowerInvariant()} of '{WeightSet}'";
}

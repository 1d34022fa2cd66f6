using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane.Tests;

public sealed class FrontDoorTests : IAsyncDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-door-").FullName;
    private readonly VersionTable _table;

    public FrontDoorTests() => _table = VersionTable.Create(Path.Combine(_folder, "table"), 4);

    private static PeerIdentity Me() => PeerIdentity.OfThisProcess(); // from /proc, not from SO_PEERCRED

    private FrontDoor Open(Role granted)
    {
        var policy = new RolePolicy();
        policy.Users[Me().Uid] = granted;
        return new FrontDoor(Path.Combine(_folder, "agent.sock"), _table.Path, policy);
    }

    private static (Socket Socket, JsonDocument Reply) Hello(FrontDoor door, string hello)
    {
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        socket.Connect(new UnixDomainSocketEndPoint(door.SocketPath));
        socket.Send(Encoding.UTF8.GetBytes(hello));
        var reply = new List<byte>();
        byte[] buffer = new byte[4096];
        socket.ReceiveTimeout = 10_000;
        while (!reply.Contains((byte)'\n'))
        {
            int read = socket.Receive(buffer);
            Assert.True(read > 0, "the agent closed the connection without an answer");
            reply.AddRange(buffer[..read]);
        }
        return (socket, JsonDocument.Parse(reply.ToArray()));
    }

    /// <summary>Descriptors this process holds on <paramref name="door"/>'s session rings, from /proc/self/fd.</summary>
    private static string[] SessionDescriptors(FrontDoor door) =>
        Directory.GetFiles("/proc/self/fd")
            .Select(fd => { try { return new FileInfo(fd).LinkTarget ?? ""; } catch (IOException) { return ""; } })
            .Where(target => target.Contains("memfd:" + door.SessionPrefix, StringComparison.Ordinal))
            .ToArray();

    [Fact]
    public async Task A_granted_client_gets_the_table_and_private_rings_as_descriptors_that_the_agent_drops_with_its_connection()
    {
        int row = _table.Add("llama");
        await using FrontDoor door = Open(Role.Consumer | Role.Publisher);
        var ended = new TaskCompletionSource<SessionInfo>();
        door.SessionChanged += (info, started) => { if (!started) ended.TrySetResult(info); };
        long id;
        using (ChannelClient client = ChannelClient.Connect(door.SocketPath, Role.Consumer, "llama"))
        {
            id = client.Session;
            Assert.Equal(Role.Consumer, client.Role);
            SessionInfo session = Assert.Single(door.Sessions);
            Assert.Equal(Environment.ProcessId, session.Peer.Pid); // from the kernel, not from the hello
            Assert.Equal(Me().Uid, session.Peer.Uid);
            Assert.Equal("llama", session.WeightSet);
            Assert.Equal($"memfd:{door.SessionPrefix}{id}-requests", session.RequestsName);
            Assert.Empty(Directory.GetFiles(_folder, "*session*")); // nothing on disk

            // The table is the agent's, seen read-only; the rings are shared with the agent's ends.
            _table.Activate(row, 4, 0, 0);
            Assert.Equal(VersionEntry.PackState(4, 0), client.Table.ReadState(row));
            Assert.Contains("read-only", Assert.Throws<InvalidOperationException>(() => client.Table.Activate(row, 5, 1, 0)).Message);
            Assert.True(door.TryGetRings(id, out SharedRing requests, out SharedRing responses));
            Assert.True(client.Requests.Write(Messages.NewRequest(RequestKind.Ping, 42), TimeSpan.FromSeconds(5)));
            Assert.True(requests.Read(out Request request, TimeSpan.FromSeconds(5)));
            Assert.Equal(42UL, request.Id);
            Assert.True(responses.Write(Messages.NewResponse(request, 0, "pong"), TimeSpan.FromSeconds(5)));
            Assert.True(client.Responses.Read(out Response response, TimeSpan.FromSeconds(5)));
            Assert.Equal(42UL, response.Id);
            Assert.Equal(4, SessionDescriptors(door).Length); // the agent's two and the client's two
        }
        SessionInfo gone = await ended.Task.WaitAsync(TimeSpan.FromSeconds(10), TestContext.Current.CancellationToken);
        Assert.Equal(id, gone.Id);
        Assert.Empty(door.Sessions);
        Assert.False(door.TryGetRings(id, out _, out _));
        Assert.Empty(SessionDescriptors(door));
    }

    [Theory]
    [InlineData("{\"role\": \"publisher\", \"weight_set\": \"llama\"}\n", "may not act as publisher (granted: Consumer)")]
    [InlineData("{\"role\": \"root\", \"weight_set\": \"llama\"}\n", "unknown role 'root'")]
    [InlineData("{\"role\": \"consumer\"}\n", "weight_set must be a name")]
    [InlineData("hello agent\n", "the hello is not JSON")]
    [InlineData("[1, 2]\n", "must be a JSON object")]
    public async Task Refused_clients_are_told_why_audited_and_given_nothing(string hello, string reason)
    {
        await using FrontDoor door = Open(Role.Consumer);
        var refusals = new List<Refusal>();
        door.Refused += r => { lock (refusals) refusals.Add(r); };
        (Socket socket, JsonDocument reply) = Hello(door, hello);
        using (socket)
        using (reply)
        {
            Assert.False(reply.RootElement.GetProperty("ok").GetBoolean());
            Assert.Contains(reason, reply.RootElement.GetProperty("error").GetString());
        }
        Assert.Empty(door.Sessions);
        Assert.Empty(SessionDescriptors(door));
        var clock = Stopwatch.StartNew();
        while (refusals.Count == 0 && clock.Elapsed < TimeSpan.FromSeconds(5))
            await Task.Delay(10, TestContext.Current.CancellationToken);
        Refusal refusal = Assert.Single(refusals);
        Assert.Equal(Environment.ProcessId, refusal.Peer.Pid);
        Assert.Contains(reason, refusal.Reason);
    }

    [Fact]
    public async Task A_second_agent_cannot_take_a_live_socket_and_stopping_ends_every_session()
    {
        FrontDoor door = Open(Role.Consumer);
        var e = Assert.Throws<InvalidOperationException>(() => Open(Role.Consumer));
        Assert.Contains("another agent is listening", e.Message);
        using (ChannelClient client = ChannelClient.Connect(door.SocketPath, Role.Consumer, "llama"))
        {
            Assert.Single(door.Sessions);
            await door.DisposeAsync();
            Assert.Empty(door.Sessions);
            Assert.Equal(2, SessionDescriptors(door).Length); // only the client's own ends are left
            Assert.False(File.Exists(door.SocketPath));
        }
        await using FrontDoor next = Open(Role.Consumer); // the socket is free again
    }

    [Fact]
    public async Task A_failure_on_the_agents_side_is_reported_to_the_client_and_leaves_nothing_open()
    {
        await using FrontDoor door = Open(Role.Consumer);
        File.Move(_table.Path, _table.Path + ".moved"); // the table's file can no longer be opened for a client
        try
        {
            var e = Assert.Throws<ChannelRefusedException>(() => ChannelClient.Connect(door.SocketPath, Role.Consumer, "llama"));
            Assert.Contains("the agent could not open the session", e.Message);
            var clock = Stopwatch.StartNew(); // the agent closes the half-open session just after it answers
            while ((door.Sessions.Count > 0 || SessionDescriptors(door).Length > 0) && clock.Elapsed < TimeSpan.FromSeconds(5))
                await Task.Delay(10, TestContext.Current.CancellationToken);
            Assert.Empty(door.Sessions);
            Assert.Empty(SessionDescriptors(door));
        }
        finally
        {
            File.Move(_table.Path + ".moved", _table.Path);
        }
    }

    [Fact]
    public async Task An_overlong_hello_is_refused()
    {
        await using FrontDoor door = Open(Role.Consumer);
        (Socket socket, JsonDocument reply) = Hello(door, new string('x', FrontDoor.MaxHelloBytes + 10));
        using (socket)
        using (reply)
            Assert.Contains($"longer than {FrontDoor.MaxHelloBytes} bytes", reply.RootElement.GetProperty("error").GetString());
        Assert.Empty(SessionDescriptors(door));
    }

    [Fact]
    public async Task The_python_client_connects_and_its_request_reaches_the_agent()
    {
        await using FrontDoor door = Open(Role.Publisher);
        int row = _table.Add("llama");
        _table.Activate(row, 9, 1, 0);
        string python = Path.GetFullPath(Path.Combine(Path.GetDirectoryName(NativeLayout.HeaderPath)!, "..", "..", "src", "python"));
        const string script = """
            import sys
            from nccl_swap import connect, abi, unpack_state, RefusedError
            try:
                connect("consumer", "llama", sys.argv[1])
            except RefusedError as e:
                print("refused:", e, flush=True)
            with connect("publisher", "llama", sys.argv[1]) as session:
                print("state", *unpack_state(session.table.state(session.table.find("llama"))), flush=True)
                request = abi.Request(magic=abi.REQUEST_MAGIC, kind=abi.RequestKind.PING, id=77)
                assert session.requests.write(bytes(request), timeout=10)
                print("sent", flush=True)
                sys.stdin.readline()
            """;
        var start = new ProcessStartInfo("python3", ["-c", script, door.SocketPath]) { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true };
        start.Environment["PYTHONPATH"] = python;
        using Process client = Process.Start(start)!;
        string? line;
        var lines = new List<string>();
        while ((line = client.StandardOutput.ReadLine()) is not null && line != "sent")
            lines.Add(line);
        if (line != "sent")
            Assert.Fail($"python: {string.Join(" | ", lines)} {client.StandardError.ReadToEnd()}");
        Assert.Contains(lines, l => l.StartsWith("refused:", StringComparison.Ordinal) && l.Contains("may not act as consumer"));
        Assert.Contains("state 9 1", lines);

        SessionInfo session = Assert.Single(door.Sessions);
        Assert.True(door.TryGetRings(session.Id, out SharedRing requests, out _));
        Assert.True(requests.Read(out Request request, TimeSpan.FromSeconds(10)));
        Assert.Null(Messages.Validate(request));
        Assert.Equal(77UL, request.Id);
        Assert.Equal((ushort)RequestKind.Ping, request.Kind);
        client.StandardInput.WriteLine();
        client.WaitForExit();
        Assert.Equal(0, client.ExitCode);
    }

    public async ValueTask DisposeAsync()
    {
        _table.Dispose();
        await Task.Yield();
        Directory.Delete(_folder, recursive: true);
    }
}

using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane.Tests;

public sealed class RequestDispatcherTests : IAsyncDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-dispatch-").FullName;
    private readonly VersionTable _table;
    private readonly FrontDoor _door;
    private readonly RecordingHandler _handler = new();
    private readonly RequestDispatcher _dispatcher;

    public RequestDispatcherTests()
    {
        _table = VersionTable.Create(Path.Combine(_folder, "table"), 4);
        var policy = new RolePolicy();
        uint uid = PeerIdentity.OfThisProcess().Uid;
        policy.Users[uid] = Role.Publisher | Role.Consumer | Role.Operator;
        _door = new FrontDoor(Path.Combine(_folder, "agent.sock"), _table.Path, policy);
        _dispatcher = new RequestDispatcher(_door, _handler);
    }

    private static Response RoundTrip(ChannelClient client, Request request)
    {
        Assert.True(client.Requests.Write(request, TimeSpan.FromSeconds(10)));
        Assert.True(client.Responses.Read(out Response response, TimeSpan.FromSeconds(10)), "no response within 10 s");
        return response;
    }

    private static string Detail(in Response response) =>
        System.Text.Encoding.UTF8.GetString(System.Runtime.InteropServices.MemoryMarshal.AsBytes(new ReadOnlySpan<PayloadBytes>(in response.Detail))[..(int)response.DetailBytes]);

    [Fact]
    public void Requests_reach_the_handler_only_from_roles_allowed_to_make_them()
    {
        var refused = new List<string>();
        _dispatcher.RequestRefused += (_, _, reason) => { lock (refused) refused.Add(reason); };
        using ChannelClient consumer = ChannelClient.Connect(_door.SocketPath, Role.Consumer, "llama");
        using ChannelClient publisher = ChannelClient.Connect(_door.SocketPath, Role.Publisher, "llama");

        Response ack = RoundTrip(consumer, Messages.NewRequest(RequestKind.Ack, 1, version: 5));
        Assert.Equal(Status.Ok, ack.Status);
        Assert.Equal(6UL, ack.Version);

        Response wrong = RoundTrip(consumer, Messages.NewRequest(RequestKind.Publish, 2, version: 9));
        Assert.Equal(Status.NotPermitted, wrong.Status);
        Assert.Equal(2UL, wrong.Id);
        Assert.Equal("a consumer may not send publish", Detail(wrong));
        Assert.Equal(Status.NotPermitted, RoundTrip(publisher, Messages.NewRequest(RequestKind.Rollback, 3)).Status);
        Assert.Equal(Status.Ok, RoundTrip(publisher, Messages.NewRequest(RequestKind.Publish, 4, version: 9)).Status);

        Assert.Equal([(RequestKind.Ack, 5UL, Role.Consumer), (RequestKind.Publish, 9UL, Role.Publisher)], _handler.Calls);
        Assert.Equal(2, _dispatcher.Refused);
        Assert.Equal(2, _dispatcher.Handled);
        lock (refused)
            Assert.Equal(2, refused.Count);
    }

    [Fact]
    public void Malformed_entries_are_refused_with_the_reason_and_change_nothing()
    {
        using ChannelClient client = ChannelClient.Connect(_door.SocketPath, Role.Publisher, "llama");
        Request good = Messages.NewRequest(RequestKind.Publish, 7, version: 3);
        Response badMagic = RoundTrip(client, good with { Magic = 0xDEADBEEF });
        Assert.Equal(Status.Invalid, badMagic.Status);
        Assert.Contains("magic 0xdeadbeef", Detail(badMagic));
        Assert.Equal(Status.Invalid, RoundTrip(client, good with { Kind = 77 }).Status);
        Assert.Contains("exceeds 96", Detail(RoundTrip(client, good with { PayloadBytes = 4000 })));
        Assert.Empty(_handler.Calls);
        Assert.Equal(0UL, _table.ReadState(0));

        Assert.Equal(Status.Ok, RoundTrip(client, good).Status); // the session still works
        Assert.Single(_handler.Calls);
    }

    public async ValueTask DisposeAsync()
    {
        _dispatcher.Dispose();
        await _door.DisposeAsync();
        _table.Dispose();
        Directory.Delete(_folder, recursive: true);
    }

    private sealed class RecordingHandler : IRequestHandler
    {
        private readonly List<(RequestKind, ulong, Role)> _calls = [];

        public List<(RequestKind, ulong, Role)> Calls
        {
            get
            {
                lock (_calls)
                    return [.. _calls];
            }
        }

        public Response? Handle(SessionInfo session, in Request request, RequestDispatcher dispatcher)
        {
            lock (_calls)
                _calls.Add(((RequestKind)request.Kind, request.Version, session.Role));
            Request answered = request with { Version = request.Version + 1 };
            return Messages.NewResponse(answered, Status.Ok);
        }
    }
}

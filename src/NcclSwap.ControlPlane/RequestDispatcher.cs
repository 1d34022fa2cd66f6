using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane;

/// <summary>What the agent does with a well-formed request from a client allowed to make it.</summary>
public interface IRequestHandler
{
    /// <summary>
    /// The response, or null when the work takes longer (a snapshot, a copy): the handler then answers exactly
    /// once, from any thread, with <see cref="RequestDispatcher.Reply"/>. Called on the dispatcher's thread, which
    /// serves every session: it must not block.
    /// </summary>
    Response? Handle(SessionInfo session, in Request request, RequestDispatcher dispatcher);
}

/// <summary>
/// The agent's side of every session's rings: takes each request, refuses malformed ones and ones the
/// session's role may not make (answering why, and changing nothing), hands the rest to the handler, and
/// writes its response. One thread polls all sessions: it spins while there is traffic; when there is none it
/// announces its sleep in every request ring and sleeps on the front door's bell, which a client rings after
/// writing a request into a ring that says so.
/// </summary>
public sealed class RequestDispatcher : IDisposable
{
    private static readonly Dictionary<RequestKind, Role> s_allowed = new()
    {
        [RequestKind.Ping] = Role.Publisher | Role.Consumer | Role.Operator,
        [RequestKind.Status] = Role.Publisher | Role.Consumer | Role.Operator,
        [RequestKind.Publish] = Role.Publisher,
        [RequestKind.Ack] = Role.Consumer,
        [RequestKind.Rollback] = Role.Operator,
        [RequestKind.CopyIn] = Role.Consumer,
        [RequestKind.Report] = Role.Consumer,
    };

    private readonly FrontDoor _door;
    private readonly IRequestHandler _handler;
    private readonly Thread _thread;
    private readonly System.Collections.Concurrent.ConcurrentQueue<(long Session, Response Response)> _later = new();
    private volatile bool _stopping;
    private long _handled;
    private long _refused;

    public RequestDispatcher(FrontDoor door, IRequestHandler handler)
    {
        _door = door;
        _handler = handler;
        _thread = new Thread(Run) { IsBackground = true, Name = "nccl-swap requests" };
        _thread.Start();
    }

    /// <summary>Requests handed to the handler.</summary>
    public long Handled => Interlocked.Read(ref _handled);

    /// <summary>Requests refused as malformed or out of role.</summary>
    public long Refused => Interlocked.Read(ref _refused);

    /// <summary>Raised for every refused request, on the dispatcher's thread, with the reason: for the audit log.</summary>
    public event Action<SessionInfo, Request, string>? RequestRefused;

    /// <summary>Raised for every request handed to the handler, just before, on the dispatcher's thread: for the audit log.</summary>
    public event Action<SessionInfo, Request>? RequestAccepted;

    /// <summary>Answers a request whose handler returned null; the response goes out on the dispatcher's thread (rings have one producer).</summary>
    public void Reply(long session, in Response response)
    {
        _later.Enqueue((session, response));
        _door.RequestBell.Ring();
    }

    /// <summary>What is wrong with <paramref name="request"/> from <paramref name="session"/>, or null if it may be handled.</summary>
    public static (int Status, string Reason)? Check(SessionInfo session, in Request request)
    {
        if (Messages.Validate(request) is { } malformed)
            return (Status.Invalid, malformed);
        Role allowed = s_allowed[(RequestKind)request.Kind];
        if ((session.Role & allowed) == 0)
            return (Status.NotPermitted, $"a {session.Role.ToString().ToLowerInvariant()} may not send {((RequestKind)request.Kind).ToString().ToLowerInvariant()}");
        return null;
    }

    private bool Serve(SessionInfo session, SharedRing requests, SharedRing responses)
    {
        bool any = false;
        while (requests.TryRead(out Request request))
        {
            any = true;
            Response response;
            if (Check(session, request) is { } refusal)
            {
                Interlocked.Increment(ref _refused);
                RequestRefused?.Invoke(session, request, refusal.Reason);
                response = Messages.NewResponse(request, refusal.Status, refusal.Reason);
            }
            else
            {
                Interlocked.Increment(ref _handled);
                RequestAccepted?.Invoke(session, request);
                if (_handler.Handle(session, request, this) is not { } now)
                    continue;
                response = now;
            }
            // A client that does not drain its responses loses them, not the agent its thread.
            responses.Write(response, TimeSpan.FromMilliseconds(100));
        }
        return any;
    }

    private void Run()
    {
        int idle = 0;
        while (!_stopping)
        {
            // Briefly hot after traffic, yielding (a client woken on this core must get it back), then asleep on
            // the bell: a long spin here would keep the client that rang it off its core.
            bool any = Poll();
            if (any)
                idle = 0;
            else if (++idle < 64)
                Thread.SpinWait(20);
            else if (idle < 128)
                Thread.Yield();
            else
                Sleep();
        }
    }

    /// <summary>One pass: deferred responses out, then every session's requests in. True if anything was done.</summary>
    private bool Poll()
    {
        bool any = false;
        while (_later.TryDequeue(out var later))
        {
            any = true;
            _door.TryUse(later.Session, (_, responses) => responses.Write(later.Response, TimeSpan.FromMilliseconds(100)));
        }
        foreach (SessionInfo session in _door.Sessions)
            _door.TryUse(session.Id, (requests, responses) => any |= Serve(session, requests, responses));
        return any;
    }

    /// <summary>
    /// Announces the sleep in every request ring, looks once more (a request written before a client could see the
    /// announcement is not missed: the announcement is an atomic increment, and clients fence between writing the
    /// head and reading the announcement), then sleeps on the bell. The poll timeout only bounds a lost wake-up.
    /// </summary>
    private void Sleep()
    {
        List<SessionInfo> sessions = [.. _door.Sessions];
        foreach (SessionInfo session in sessions)
            _door.TryUse(session.Id, (requests, _) => requests.AnnounceSleep());
        try
        {
            bool pending = !_later.IsEmpty;
            foreach (SessionInfo session in sessions)
                _door.TryUse(session.Id, (requests, _) => pending |= requests.Count > 0);
            if (!pending && !_stopping)
                _door.RequestBell.Wait(TimeSpan.FromMilliseconds(100));
        }
        finally
        {
            foreach (SessionInfo session in sessions)
                _door.TryUse(session.Id, (requests, _) => requests.EndSleep());
        }
    }

    public void Dispose()
    {
        _stopping = true;
        _door.RequestBell.Ring();
        _thread.Join();
    }
}

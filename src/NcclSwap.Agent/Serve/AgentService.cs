using System.Net.Sockets;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Hosting.Systemd;
using Microsoft.Extensions.Logging;
using NcclSwap.ControlPlane;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.State;

namespace NcclSwap.Agent.Serve;

/// <summary>
/// The agent as a hosted service: the version table, the front door and the request dispatcher, with the
/// systemd watchdog fed only while a real health check passes (the front door answers a connection). At start
/// it puts every weight set's active and last good version back into the table from the persisted state, so
/// consumers that reconnect after a crash or restart find the versions they served. Requests of the version
/// life cycle are answered "not implemented" until it lands; ping and status work.
/// </summary>
public sealed class AgentService(AgentSettings settings, ISystemdNotifier notifier, ILogger<AgentService> log) : BackgroundService, IRequestHandler
{
    private FrontDoor? _door;
    private RequestDispatcher? _dispatcher;
    private VersionTable? _table;

    protected override async Task ExecuteAsync(CancellationToken stopping)
    {
        Directory.CreateDirectory(settings.StateDirectory);
        Directory.CreateDirectory(Path.GetDirectoryName(settings.SocketPath)!);
        _table = VersionTable.Create(settings.TablePath, settings.TableCapacity);
        AgentState state = new StateStore(settings.StatePath).Load();
        foreach (WeightSetState set in state.WeightSets)
        {
            int row = _table.Add(set.Name);
            if (set.Active is { } active)
                _table.Restore(row, active.Version, active.Slot, active.ManifestDigest, set.LastGood);
            log.LogInformation("recovered weight set {Name}: version {Version} active, last good {LastGood}", set.Name, set.Active?.Version ?? 0, set.LastGood);
        }
        _door = new FrontDoor(settings.SocketPath, settings.TablePath, settings.Roles);
        _door.Refused += r => log.LogWarning("refused {Peer}: {Reason}", r.Peer, r.Reason);
        _door.SessionChanged += (s, started) => log.LogInformation("session {Id} of {Peer} as {Role} {State}", s.Id, s.Peer, s.Role, started ? "started" : "ended");
        _dispatcher = new RequestDispatcher(_door, this);
        _dispatcher.RequestRefused += (s, _, reason) => log.LogWarning("session {Id} of {Peer}: request refused: {Reason}", s.Id, s.Peer, reason);
        log.LogInformation("nccl-swap agent listening on {Socket}, version table {Table} ({Capacity} rows)", settings.SocketPath, settings.TablePath, settings.TableCapacity);
        notifier.Notify(ServiceState.Ready);

        TimeSpan? watchdog = WatchdogInterval();
        while (!stopping.IsCancellationRequested)
        {
            try
            {
                await Task.Delay(watchdog is { } w ? w / 2 : TimeSpan.FromSeconds(5), stopping);
            }
            catch (OperationCanceledException)
            {
                break;
            }
            if (watchdog is not null)
            {
                if (Healthy(out string why))
                    notifier.Notify(new ServiceState("WATCHDOG=1"));
                else
                    log.LogError("health check failed, not feeding the watchdog: {Why}", why);
            }
        }
    }

    public Response Handle(SessionInfo session, in Request request) => (RequestKind)request.Kind switch
    {
        RequestKind.Ping => Messages.NewResponse(request, Status.Ok),
        RequestKind.Status => Messages.NewResponse(request, Status.Ok, $"sessions {_door?.Sessions.Count ?? 0}"),
        _ => Messages.NewResponse(request, Status.NotImplemented, $"{((RequestKind)request.Kind).ToString().ToLowerInvariant()} is not implemented by this agent yet"),
    };

    private bool Healthy(out string why)
    {
        try
        {
            using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            probe.Connect(new UnixDomainSocketEndPoint(settings.SocketPath));
        }
        catch (SocketException e)
        {
            why = $"the front door does not accept connections: {e.Message}";
            return false;
        }
        why = "";
        return true;
    }

    private static TimeSpan? WatchdogInterval() =>
        ulong.TryParse(Environment.GetEnvironmentVariable("WATCHDOG_USEC"), out ulong usec) && usec > 0 ? TimeSpan.FromMicroseconds(usec) : null;

    public override async Task StopAsync(CancellationToken cancellationToken)
    {
        notifier.Notify(ServiceState.Stopping);
        await base.StopAsync(cancellationToken);
        _dispatcher?.Dispose();
        if (_door is not null)
            await _door.DisposeAsync();
        _table?.Dispose();
        log.LogInformation("nccl-swap agent stopped");
    }
}

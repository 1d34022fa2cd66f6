using System.Net.Sockets;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Hosting.Systemd;
using Microsoft.Extensions.Logging;
using NcclSwap.ControlPlane;
using NcclSwap.DataPlane;

namespace NcclSwap.Agent.Serve;

/// <summary>
/// The agent as a hosted service: an <see cref="AgentCore"/> (version table, version life cycle, front door, request
/// dispatcher) restored from the persisted state at start, with the systemd watchdog fed only while a real health
/// check passes (the front door answers a connection). Stopping abandons updates in flight without activating
/// anything; the state file and the active versions' staging stay for the next start.
/// </summary>
public sealed class AgentService(AgentSettings settings, ISystemdNotifier notifier, ILogger<AgentService> log) : BackgroundService
{
    private AgentCore? _agent;
    private IBackend? _backend;
    private MetricsEndpoint? _metrics;

    protected override async Task ExecuteAsync(CancellationToken stopping)
    {
        try
        {
            _backend = Backend.Create(settings.Backend);
            _agent = AgentCore.Start(settings.Options, _backend, log);
            if (settings.MetricsPort > 0)
            {
                _metrics = new MetricsEndpoint(settings.MetricsPort);
                log.LogInformation("metrics at http://127.0.0.1:{Port}/metrics", settings.MetricsPort);
            }
        }
        catch (Exception e)
        {
            // The host stops; the exit code tells systemd (Restart=on-failure) and scripts that it did not start.
            log.LogCritical(e, "the agent could not start: {Reason}", e.Message);
            Environment.ExitCode = 1;
            throw;
        }
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
        _metrics?.Dispose();
        if (_agent is not null)
            await _agent.DisposeAsync();
        _backend?.Dispose();
    }
}

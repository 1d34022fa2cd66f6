using Microsoft.Extensions.Logging;
using NcclSwap.ControlPlane.State;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.DataPlane;

namespace NcclSwap.ControlPlane;

/// <summary>Where the agent keeps things and whom it serves.</summary>
public sealed record AgentOptions(string SocketPath, string StateDirectory, string StagingDirectory, int TableCapacity, RolePolicy Roles,
    UpdatePolicy Policy, TimeSpan AckTimeout)
{
    public StagingPlacement Placement { get; init; } = StagingPlacement.Auto;

    /// <summary>The group that owns the socket (mode 0660), so that its members' clients can connect; null: the agent's own.</summary>
    public uint? SocketGroup { get; init; }

    /// <summary>Per weight set: signatures, publishers, rollout (<see cref="WeightSetPolicy"/>).</summary>
    public IReadOnlyDictionary<string, WeightSetPolicy> WeightSets { get; init; } = new Dictionary<string, WeightSetPolicy>();

    public string TablePath => Path.Combine(StateDirectory, "versions.table");

    /// <summary>The audit log (<see cref="Audit.AuditLog"/>), beside the state.</summary>
    public string AuditLogPath => Path.Combine(StateDirectory, "audit.jsonl");

    public string StatePath => Path.Combine(StateDirectory, "state.json");
}

/// <summary>
/// The agent's parts, put together and started: the version table (kept across restarts, so consumers that map it
/// see the next life's activations), the version life cycle restored from the persisted state, the front door and
/// the request dispatcher. <c>nccl-swap serve</c> runs one under systemd; <c>demo</c> and tests run one in-process.
/// </summary>
public sealed class AgentCore : IAsyncDisposable
{
    private readonly ILogger _log;

    private AgentCore(AgentOptions options, VersionTable table, VersionManager versions, FrontDoor door, RequestDispatcher dispatcher, Audit.AuditLog audit, ILogger log)
    {
        Audit = audit;
        Options = options;
        Table = table;
        Versions = versions;
        Door = door;
        Dispatcher = dispatcher;
        _log = log;
    }

    public AgentOptions Options { get; }

    public VersionTable Table { get; }

    public VersionManager Versions { get; }

    public FrontDoor Door { get; }

    public RequestDispatcher Dispatcher { get; }

    /// <summary>The audit log, at <see cref="AgentOptions.AuditLogPath"/>.</summary>
    public Audit.AuditLog Audit { get; }

    public static AgentCore Start(AgentOptions options, IBackend backend, ILogger log)
    {
        Directory.CreateDirectory(options.StateDirectory);
        if (Path.GetDirectoryName(options.SocketPath) is { Length: > 0 } socketFolder)
            Directory.CreateDirectory(socketFolder);
        VersionTable table = VersionTable.OpenOrCreate(options.TablePath, options.TableCapacity);
        VersionManager? versions = null;
        FrontDoor? door = null;
        Audit.AuditLog? audit = null;
        try
        {
            audit = NcclSwap.ControlPlane.Audit.AuditLog.Open(options.AuditLogPath);
            versions = new VersionManager(table, new StateStore(options.StatePath), backend,
                new LifecycleOptions(options.StagingDirectory, options.Policy, options.AckTimeout) { Placement = options.Placement, WeightSets = options.WeightSets }, log);
            door = new FrontDoor(options.SocketPath, options.TablePath, options.Roles, versions, options.SocketGroup);
            versions.Attach(door);
            door.Refused += r => log.LogWarning("refused {Peer}: {Reason}", r.Peer, r.Reason);
            door.SessionChanged += (s, started) => log.LogInformation("{Session} {State}{Reason}", s, started ? "started" : "ended", s.EndReason is { } why ? $": {why}" : "");
            var dispatcher = new RequestDispatcher(door, versions);
            dispatcher.RequestRefused += (s, _, reason) => log.LogWarning("{Session}: request refused: {Reason}", s, reason);
            _ = new Audit.AgentAudit(audit, log, door, dispatcher, versions);
            log.LogInformation("nccl-swap agent listening on {Socket}, version table {Table} ({Capacity} rows), staging in {Staging}, {Backend}, {Policy} policy",
                options.SocketPath, options.TablePath, options.TableCapacity, options.StagingDirectory, backend.Description, options.Policy.ToString().ToLowerInvariant());
            return new AgentCore(options, table, versions, door, dispatcher, audit, log);
        }
        catch
        {
            door?.DisposeAsync().AsTask().GetAwaiter().GetResult();
            versions?.Dispose();
            audit?.Dispose();
            table.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Stops cleanly: updates in flight are abandoned without activating anything, then every session ends and
    /// the socket goes. The state file and the active versions' staging stay for the next start.
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        Versions.Stop();
        Dispatcher.Dispose();
        await Door.DisposeAsync();
        Versions.Dispose();
        Table.Dispose();
        Audit.Dispose();
        _log.LogInformation("nccl-swap agent stopped");
    }
}

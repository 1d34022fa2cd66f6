using System.Collections.Concurrent;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using Microsoft.Win32.SafeHandles;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.State;
using NcclSwap.DataPlane;

namespace NcclSwap.ControlPlane.Versions;

/// <summary>What happens to a version published while another is being staged.</summary>
public enum UpdatePolicy
{
    /// <summary>It waits for its turn; a newer one waiting replaces it (the replaced one ends "superseded").</summary>
    Supersede,

    /// <summary>Every version is staged and activated in turn; a publish waits while one is already waiting.</summary>
    Queue,
}

/// <summary>Where a weight set's staged versions live (decided at its first snapshot).</summary>
public enum StagingPlacement
{
    /// <summary>GPU memory if the publisher's tensors are on the GPU and three copies fit with room to spare; if only two fit, GPU memory with the last good version shadowed in page-locked host files; else host files.</summary>
    Auto,

    /// <summary>Device memory (the active, last good and next versions).</summary>
    Gpu,

    /// <summary>Device memory for the active and next versions; the last good one moves to a page-locked host file.</summary>
    GpuWithHostShadow,

    /// <summary>Page-locked host files only.</summary>
    Host,
}

/// <summary>Settings of the version life cycle.</summary>
public sealed record LifecycleOptions(string StagingDirectory, UpdatePolicy Policy, TimeSpan AckTimeout)
{
    public StagingPlacement Placement { get; init; } = StagingPlacement.Auto;

    /// <summary>How many times a tensor whose digest does not match is copied again before the update fails.</summary>
    public int Resends { get; init; } = 2;

    /// <summary>Per weight set: signatures, publishers, rollout; a set not named here takes <see cref="WeightSetPolicy.Open"/>.</summary>
    public IReadOnlyDictionary<string, WeightSetPolicy> WeightSets { get; init; } = new Dictionary<string, WeightSetPolicy>();

    public WeightSetPolicy PolicyFor(string weightSet) => WeightSets.TryGetValue(weightSet, out WeightSetPolicy? policy) ? policy : WeightSetPolicy.Open;
}

/// <summary>
/// The agent's version life cycle for every weight set: the front door's session host (registrations) and the
/// dispatcher's request handler (publish, acknowledge, copy-in, rollback, status). It restores each weight set
/// from the persisted state at start and saves the state, atomically, before every activation.
/// </summary>
public sealed partial class VersionManager : ISessionHost, IRequestHandler, IDisposable
{
    private readonly ConcurrentDictionary<string, WeightSetLifecycle> _sets = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<long, (WeightSetLifecycle Set, Registration? Registration)> _sessions = new();
    private readonly StateStore _store;
    private readonly Lock _state = new();
    private readonly Lock _adding = new();
    private FrontDoor? _door;
    private long _auditPosition;

    public VersionManager(VersionTable table, StateStore store, IBackend backend, LifecycleOptions options, ILogger log)
    {
        Table = table;
        _store = store;
        Backend = backend;
        Options = options;
        Log = log;
        Metrics = new AgentMetrics(() => _sets.Values.OrderBy(s => s.Row).Select(s => s.Status()).ToList());
        Updated += Metrics.Updated;
        Rollout += Metrics.Decided;
        Directory.CreateDirectory(options.StagingDirectory);
        // Versions staged in GPU memory need no file; those staged in host memory (shared-memory publishers, or GPU
        // memory too short) fail naming the directory. Said at start rather than first at a publish.
        if (StagingBuffer.Probe(options.StagingDirectory, backend) is { } problem)
            log.LogWarning("{Problem}. Until then every version staged in host memory fails; versions staged in GPU memory are not affected", problem);
        AgentState state = store.Load();
        _auditPosition = state.AuditPosition;
        foreach (WeightSetState set in state.WeightSets)
        {
            int row = table.Find(set.Name) is int found and >= 0 ? found : table.Add(set.Name);
            _sets[set.Name] = new WeightSetLifecycle(this, set.Name, row, set);
            log.LogInformation("recovered weight set {Name}: version {Version} active, last good {LastGood}", set.Name, set.Active?.Version ?? 0, set.LastGood);
        }
        RemoveStrayStaging();
    }

    public VersionTable Table { get; }

    public IBackend Backend { get; }

    public LifecycleOptions Options { get; }

    internal ILogger Log { get; }

    /// <summary>The agent's instruments (meter <see cref="AgentMetrics.MeterName"/>).</summary>
    public AgentMetrics Metrics { get; }

    /// <summary>Raised at every rollout step (a canary began, was promoted or rolled back; a pause), on the thread that took it.</summary>
    public event Action<RolloutDecision>? Rollout;

    internal void ReportRollout(RolloutDecision decision) =>
        Tell(Rollout, decision, "rollout decisions", decision.WeightSet, decision.Version);

    /// <summary>Every weight set as an operator's status shows it, in table order.</summary>
    public IReadOnlyList<WeightSetStatus> Statuses() => _sets.Values.OrderBy(s => s.Row).Select(s => s.Status()).ToList();

    /// <summary>The weight set an operator's verb names, or null.</summary>
    internal WeightSetLifecycle? Find(string weightSet) => _sets.TryGetValue(weightSet, out WeightSetLifecycle? set) ? set : null;

    /// <summary>Raised when an update ends (activated, superseded, failed, abandoned), on the thread that ended it.</summary>
    public event Action<UpdateOutcome>? Updated;

    /// <summary>The front door whose sessions this manager may end (a consumer whose lease expired).</summary>
    public void Attach(FrontDoor door) => _door = door;

    /// <summary>The updates of <paramref name="weightSet"/> so far (the latest 4096), oldest first.</summary>
    public IReadOnlyList<UpdateOutcome> History(string weightSet) =>
        _sets.TryGetValue(weightSet, out WeightSetLifecycle? set) ? set.History : [];

    /// <summary>The consumers of <paramref name="weightSet"/> now: session id, mode, the state each serves, acknowledgements.</summary>
    public IReadOnlyList<(long Session, ConsumerMode Mode, ulong Serving, long Acknowledgements)> Consumers(string weightSet) =>
        _sets.TryGetValue(weightSet, out WeightSetLifecycle? set)
            ? set.Consumers.Select(c => (c.Session.Id, c.Mode, c.Serving, c.Acknowledgements)).ToList()
            : [];

    public SessionWelcome Open(SessionInfo session, JsonElement hello, IReadOnlyList<SafeFileHandle> descriptors)
    {
        WeightSetLifecycle set;
        Hello parsed;
        try
        {
            parsed = Hello.Parse(hello, session.Role, descriptors.Count);
            if (session.Role == Role.Publisher && Options.PolicyFor(session.WeightSet).RefusePublisher(session.Peer, session.WeightSet) is { } refusal)
                throw new SessionRefusedException(refusal);
            set = SetFor(session.WeightSet);
        }
        catch
        {
            foreach (SafeFileHandle descriptor in descriptors)
                descriptor.Dispose();
            throw;
        }
        (SessionWelcome welcome, Registration? registration) = set.Open(session, parsed, descriptors);
        _sessions[session.Id] = (set, registration);
        return welcome;
    }

    public void Close(SessionInfo session)
    {
        if (_sessions.TryRemove(session.Id, out var entry))
            entry.Set.Close(session);
    }

    public Response? Handle(SessionInfo session, in Request request, RequestDispatcher dispatcher)
    {
        if (!_sessions.TryGetValue(session.Id, out var entry))
            return Messages.NewResponse(request, Status.Invalid, "this session is not registered with the agent");
        if ((RequestKind)request.Kind == RequestKind.Ping)
            return Messages.NewResponse(request, Status.Ok);
        if (request.WeightSet != (uint)entry.Set.Row)
            return Messages.NewResponse(request, Status.Invalid, $"weight_set {request.WeightSet} is not this session's row {entry.Set.Row} ('{entry.Set.Name}')");
        return entry.Set.Handle(session, request, entry.Registration, dispatcher);
    }

    private WeightSetLifecycle SetFor(string name)
    {
        if (_sets.TryGetValue(name, out WeightSetLifecycle? set))
            return set;
        lock (_adding)
        {
            if (_sets.TryGetValue(name, out set))
                return set;
            int row;
            try
            {
                row = Table.Find(name) is int found and >= 0 ? found : Table.Add(name);
            }
            catch (InvalidOperationException e)
            {
                throw new SessionRefusedException($"weight set '{name}' cannot be added: {e.Message}");
            }
            set = new WeightSetLifecycle(this, name, row, null);
            _sets[name] = set;
            SaveState();
            Log.LogInformation("weight set {Name} added in row {Row}", name, row);
            return set;
        }
    }

    /// <summary>
    /// Saves every weight set's persisted state in one atomic replacement of the state file; with
    /// <paramref name="flush"/> false it is not flushed to disk yet (<see cref="FlushState"/>).
    /// </summary>
    internal void SaveState(bool flush = true, PreparedState? prepared = null)
    {
        lock (_state)
            _store.Save(new AgentState(_sets.Values.OrderBy(s => s.Row).Select(s => s.Persisted).ToList(), _auditPosition), prepared, flush);
    }

    /// <summary>
    /// Writes and flushes, ahead of time, the state the agent will save once weight set <paramref name="set"/> has
    /// <paramref name="next"/> and every other set is as it is now; <see cref="SaveState"/> renames it into place if
    /// that is still what it must save.
    /// </summary>
    internal PreparedState PrepareState(string set, WeightSetState next)
    {
        AgentState state;
        lock (_state)
            state = new AgentState(_sets.Values.OrderBy(s => s.Row).Select(s => s.Name == set ? next : s.Persisted).ToList(), _auditPosition);
        return _store.Prepare(state); // the write and its flush, outside the lock
    }

    /// <summary>Flushes the state file saved last to disk.</summary>
    internal void FlushState()
    {
        lock (_state)
            _store.Flush();
    }

    internal void EndSession(long session, string reason) => _door?.End(session, reason);

    /// <summary>Raised when a request is refused before any update began (a publish not newer than one before: a replay), on the dispatcher's thread.</summary>
    public event Action<SessionInfo, Request, string>? RequestRefused;

    internal void ReportRefused(SessionInfo session, in Request request, string reason) => RequestRefused?.Invoke(session, request, reason);

    internal void Report(UpdateOutcome outcome) => Tell(Updated, outcome, "update outcomes", outcome.WeightSet, outcome.Version);

    /// <summary>Tells every listener, each on its own: one that fails (logged) does not keep the news from the others.</summary>
    private void Tell<T>(Action<T>? listeners, T news, string what, string set, ulong version)
    {
        if (listeners is null)
            return;
        foreach (Action<T> listener in listeners.GetInvocationList().Cast<Action<T>>())
        {
            try
            {
                listener(news);
            }
            catch (Exception e)
            {
                Log.LogError(e, "a listener of {What} failed on {Set} version {Version}", what, set, version);
            }
        }
    }

    /// <summary>Staging files no weight set's state names: left by a crash in the middle of an update.</summary>
    private void RemoveStrayStaging()
    {
        var kept = _sets.Values.SelectMany(s => s.StagingFiles).ToHashSet(StringComparer.Ordinal);
        foreach (string path in Directory.EnumerateFiles(Options.StagingDirectory))
        {
            string name = Path.GetFileName(path);
            string owner = name.EndsWith(".manifest", StringComparison.Ordinal) ? name[..^".manifest".Length] : name;
            if (!kept.Contains(owner))
                File.Delete(path);
        }
    }

    /// <summary>Stops every weight set's updates: the one in flight and those queued are abandoned, nothing more is activated.</summary>
    public void Stop()
    {
        foreach (WeightSetLifecycle set in _sets.Values)
            set.Stop();
    }

    /// <summary>Stops (if not done), waits for copies still running, and unmaps everything.</summary>
    public void Dispose()
    {
        Stop();
        foreach (WeightSetLifecycle set in _sets.Values)
            set.Dispose();
        Metrics.Dispose();
    }
}

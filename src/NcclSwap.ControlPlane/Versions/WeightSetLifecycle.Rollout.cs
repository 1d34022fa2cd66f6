using System.Diagnostics;
using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Versions;

/// <summary>A rollout step of a weight set, for the audit log and metrics: the canary began, was promoted or rolled back; a pause.</summary>
/// <param name="By">The operator who decided, or null when the policy did.</param>
public sealed record RolloutDecision(string WeightSet, ulong Version, string Decision, string Figures, PeerIdentity? By);

/// <summary>An operator's word on the canary in flight.</summary>
internal enum CanaryCommand
{
    None,
    Promote,
    RollBack,
}

// Canary rollout, consumers' reports and the operator's verbs.
internal sealed partial class WeightSetLifecycle
{
    private CanaryRun? _canary; // under _refs
    private readonly HashSet<ulong> _canaryStates = []; // under _refs: states shown to canaries, which they may acknowledge
    private bool _paused; // under _queue
    private (CanaryCommand Command, PeerIdentity By) _command; // under _queue

    /// <summary>A version on some consumers first, and what they and the others reported since.</summary>
    private sealed class CanaryRun(ulong state, ulong baseline, StagedVersion source, List<ConsumerRegistration> members, ulong lanes, int consumers)
    {
        public ulong State { get; } = state;

        /// <summary>The state the other consumers serve meanwhile.</summary>
        public ulong Baseline { get; } = baseline;

        public StagedVersion Source { get; } = source;

        public List<ConsumerRegistration> Members { get; } = members;

        public ulong Lanes { get; } = lanes;

        public int ConsumersAtStart { get; } = consumers;

        public Stopwatch Clock { get; } = Stopwatch.StartNew();

        public ServingFigures Canaries { get; } = new();

        public ServingFigures Others { get; } = new();

        public string Figures => $"after {Clock.Elapsed.TotalSeconds:0.0} s: canaries {Canaries}; others {Others}";
    }

    /// <summary>Gives a joining consumer the lowest lane that no consumer holds and no canary's mask names (under <c>_membership</c>).</summary>
    private void AssignLane(ConsumerRegistration consumer)
    {
        ulong taken;
        lock (_refs)
            taken = _canary?.Lanes ?? 0;
        foreach (ConsumerRegistration other in _consumers)
            if (other.Lane >= 0)
                taken |= 1UL << other.Lane;
        consumer.Lane = taken == ulong.MaxValue ? -1 : System.Numerics.BitOperations.TrailingZeroCount(~taken);
    }

    /// <summary>The version <paramref name="consumer"/> must serve (the canary version for a canary), with a reference to its staged bytes.</summary>
    private (ulong State, StagedVersion? Source) TargetOf(ConsumerRegistration consumer)
    {
        lock (_refs)
            return _canary is { } run && run.Members.Contains(consumer)
                ? (run.State, run.Source.AddReference())
                : (_activeState, _active?.AddReference());
    }

    private bool IsCanaryState(ulong state)
    {
        lock (_refs)
            return _canaryStates.Contains(state);
    }

    /// <summary>A consumer's counters since its last report, on the state it names; canaries' and the others' feed the canary in flight.</summary>
    private Response Report(ConsumerRegistration? consumer, in Request request)
    {
        if (consumer is null)
            return Messages.NewResponse(request, Abi.Status.Invalid, "reports are for consumers");
        if (request.PayloadBytes != Marshal.SizeOf<ReportPayload>())
            return Messages.NewResponse(request, Abi.Status.Invalid, $"a report's payload is nccl_swap_report ({Marshal.SizeOf<ReportPayload>()} bytes), not {request.PayloadBytes} bytes");
        ReportPayload report = MemoryMarshal.Read<ReportPayload>(request.Payload);
        long latencies = 0;
        for (int i = 0; i < ReportPayload.Buckets; i++)
            latencies += report.Latency[i];
        if (report.Errors > report.Requests || report.QualityCount > report.Requests || latencies > report.Requests || !float.IsFinite(report.QualitySum))
            return Messages.NewResponse(request, Abi.Status.Invalid, $"a report of {report.Requests} requests cannot hold {report.Errors} errors, {report.QualityCount} quality scores (sum {report.QualitySum}) or {latencies} latencies");
        consumer.Reported.Add(report);
        _manager.Metrics.Reported(Name, report);
        lock (_refs)
        {
            if (_canary is { } run)
            {
                bool member = run.Members.Contains(consumer);
                if (member && request.Version == run.State)
                    run.Canaries.Add(report);
                else if (!member && request.Version == run.Baseline)
                    run.Others.Add(report);
            }
        }
        return Messages.NewResponse(request, Abi.Status.Ok);
    }

    /// <summary>
    /// Puts a verified version on the canary share of the consumers (their free slots for flip consumers; copy-in
    /// canaries copy it in at their next step) and shows it to them alone, then waits for the policy's decision or an
    /// operator's. Returns the flip canaries, which hold the version already, when it is to be promoted (the caller
    /// delivers it to the rest and activates it); throws when it is rolled back, after the canaries were sent back to
    /// the active version, which they still hold (flip) or copy in again (copy-in). Null when there are too few
    /// consumers for a canary.
    /// </summary>
    private List<ConsumerRegistration>? RunCanary(Job job, StagedVersion source, int slot, CanaryPolicy policy)
    {
        UpdateOutcome outcome = job.Outcome;
        ulong state = VersionEntry.PackState(source.Version, slot);
        List<ConsumerRegistration> members;
        int consumers;
        lock (_membership)
        {
            consumers = _consumers.Length;
            int wanted = policy.CanariesOf(consumers);
            members = [.. _consumers.Where(c => c.Lane >= 0).OrderBy(c => c.Lane).Take(wanted)];
            if (wanted == 0 || members.Count < wanted)
                return null;
        }
        outcome.Phase = "staging canaries";
        var flips = members.Where(c => c.Mode == ConsumerMode.Flip).ToList();
        WaitUntilFree(slot, flips, outcome);
        foreach (ConsumerRegistration consumer in flips)
        {
            if (!consumer.TryEnter())
                continue;
            try
            {
                if (Deliver(source, consumer, slot, outcome) is { } failure)
                    throw new UpdateException(Abi.Status.Corrupt, $"{failure}; not activated", UpdateResult.Failed);
            }
            finally
            {
                consumer.Exit();
            }
            outcome.Consumers++;
        }
        ulong lanes = members.Aggregate(0UL, (mask, c) => mask | 1UL << c.Lane);
        CanaryRun run;
        lock (_membership)
        {
            StopCheck();
            lock (_refs)
            {
                run = new CanaryRun(state, _activeState, source, members, lanes, consumers);
                foreach (ConsumerRegistration consumer in flips)
                    consumer.Activated(state); // before the table shows it: they may switch from now on
                _canaryStates.Add(state);
                _canary = run;
                _manager.Table.SetCanary(Row, state, lanes);
            }
        }
        outcome.Result = UpdateResult.Canary;
        outcome.Phase = "canary";
        string on = $"on {members.Count} of {consumers} consumers ({string.Join(", ", members.Select(m => $"session {m.Session.Id} pid {m.Session.Peer.Pid}"))})";
        Log.LogInformation("{Set}: version {Version} {On}: canary", Name, source.Version, on);
        _manager.ReportRollout(new RolloutDecision(Name, source.Version, "started", on, null));
        while (true)
        {
            (CanaryCommand decision, string why, PeerIdentity? by) = Decide(run, policy);
            outcome.Progress = policy.MinDuration > TimeSpan.Zero ? Math.Min(0.99, run.Clock.Elapsed / policy.MinDuration) : 0.99;
            if (decision == CanaryCommand.Promote)
            {
                outcome.Phase = "promoting";
                _manager.ReportRollout(new RolloutDecision(Name, source.Version, "promoted", $"{why}; {run.Figures}", by));
                outcome.Detail = $"promoted from {members.Count} canaries: {why}";
                outcome.Result = UpdateResult.Staging;
                return flips;
            }
            if (decision == CanaryCommand.RollBack)
            {
                EndCanary();
                _manager.ReportRollout(new RolloutDecision(Name, source.Version, "rolled-back", $"{why}; {run.Figures}", by));
                throw new UpdateException(Abi.Status.Canceled, $"rolled back from its canaries: {why}; {run.Figures}", UpdateResult.RolledBack);
            }
        }
    }

    /// <summary>
    /// The next word on the canary: an operator's, else the policy's once the canaries have served long enough and
    /// reported enough, else (after <see cref="CanaryPolicy.MaxDuration"/> without enough reports) a rollback. Waits
    /// up to 50 ms for an operator; a paused weight set hears only its operator.
    /// </summary>
    private (CanaryCommand Decision, string Why, PeerIdentity? By) Decide(CanaryRun run, CanaryPolicy policy)
    {
        lock (_queue)
        {
            if (_command.Command == CanaryCommand.None && !_stopping)
                Monitor.Wait(_queue, 50);
            StopCheck();
            if (_command.Command != CanaryCommand.None)
            {
                var (command, by) = _command;
                _command = default;
                return (command, $"by the operator ({by})", by);
            }
            if (_paused)
                return (CanaryCommand.None, "", null);
        }
        ConsumerRegistration[] now = Consumers.ToArray();
        if (!run.Members.Any(now.Contains))
            return (CanaryCommand.RollBack, "every canary left", null);
        TimeSpan elapsed = run.Clock.Elapsed;
        ServingFigures canaries = run.Canaries, others = run.Others;
        if (elapsed >= policy.MinDuration && canaries.Requests >= policy.MinSamples)
        {
            if (canaries.ErrorRate > policy.MaxErrorRate)
                return (CanaryCommand.RollBack, $"error rate {canaries.ErrorRate:0.####} above {policy.MaxErrorRate}", null);
            if (canaries.P99 is { } p99 && others.P99 is { } baseline && p99 > policy.MaxP99Ratio * baseline)
                return (CanaryCommand.RollBack, $"p99 ≤{p99:0.#} ms is above {policy.MaxP99Ratio} × the others' ≤{baseline:0.#} ms", null);
            if (policy.MinQuality is { } minimum && canaries.MeanQuality is { } quality && quality < minimum)
                return (CanaryCommand.RollBack, $"quality {quality:0.###} below {minimum}", null);
            return (CanaryCommand.Promote, $"healthy: error rate {canaries.ErrorRate:0.####} ≤ {policy.MaxErrorRate}, p99 within {policy.MaxP99Ratio} × the others'", null);
        }
        if (elapsed >= policy.MaxDuration)
            return (CanaryCommand.RollBack, $"{canaries.Requests} requests reported in {elapsed.TotalSeconds:0} s, fewer than {policy.MinSamples}", null);
        return (CanaryCommand.None, "", null);
    }

    /// <summary>
    /// Sends the canaries back to the active version, if a canary runs: flip canaries may switch back at any step from
    /// now (recorded before the table shows it), so their slot of the canary version is theirs until they acknowledge.
    /// </summary>
    private void EndCanary()
    {
        lock (_membership)
        lock (_refs)
        {
            if (_canary is not { } run)
                return;
            foreach (ConsumerRegistration consumer in run.Members.Where(c => c.Mode == ConsumerMode.Flip))
                consumer.Activated(_activeState);
            _manager.Table.ClearCanary(Row);
            _canary = null;
        }
    }

    // Operator's verbs

    /// <summary>Promotes (or rolls back) the canary in flight; false when none runs.</summary>
    public bool Command(CanaryCommand command, PeerIdentity by)
    {
        lock (_refs)
            if (_canary is null)
                return false;
        lock (_queue)
        {
            _command = (command, by);
            Monitor.PulseAll(_queue);
        }
        return true;
    }

    /// <summary>The canary version in flight, or 0.</summary>
    public ulong CanaryVersion
    {
        get
        {
            lock (_refs)
                return _canary is { } run ? run.Source.Version : 0;
        }
    }

    public bool Paused
    {
        get
        {
            lock (_queue)
                return _paused;
        }
    }

    /// <summary>Pauses or resumes the rollout: while paused no new version starts its update and a canary waits for its operator. False if it was so already.</summary>
    public bool Pause(bool paused, PeerIdentity by)
    {
        lock (_queue)
        {
            if (_paused == paused)
                return false;
            _paused = paused;
            _manager.Table.SetPaused(Row, paused);
            Monitor.PulseAll(_queue);
        }
        _manager.ReportRollout(new RolloutDecision(Name, CanaryVersion, paused ? "paused" : "resumed", "", by));
        return true;
    }

    /// <summary>
    /// Digests a staged version again (the active, last good or canary one), and every flip consumer's slot that holds
    /// it, against its manifest. Null when the version is not staged; else the mismatches found (none: intact).
    /// </summary>
    public (ulong Version, List<string> Bad, int Copies)? VerifyAgain(ulong version)
    {
        StagedVersion? staged;
        ulong state;
        lock (_refs)
        {
            var candidates = new List<(StagedVersion? Version, ulong State)> { (_active, _activeState), (_lastGood, 0) };
            if (_canary is { } run)
                candidates.Add((run.Source, run.State));
            (staged, state) = candidates.FirstOrDefault(c => c.Version is { } v && (version == 0 ? c.Version == _active : v.Version == version));
            staged = staged?.AddReference();
        }
        if (staged is null)
            return null;
        try
        {
            if (!staged.WaitFilled(_manager.Options.AckTimeout))
                return (staged.Version, ["its staged copy was never made"], 0);
            var bad = Mismatches(staged.Buffer.Buffer, staged.Layout, staged.Manifest).Select(t => $"staging: tensor '{t}'").ToList();
            int copies = 1;
            foreach (ConsumerRegistration consumer in Consumers.Where(c => c.Mode == ConsumerMode.Flip && state != 0 && c.Serving == state))
            {
                if (!consumer.TryEnter())
                    continue;
                try
                {
                    int slot = VersionEntry.UnpackState(state).Slot;
                    bad.AddRange(Mismatches(consumer.Slot(slot).Buffer, consumer.Layout, staged.Manifest).Select(t => $"{consumer} slot {slot}: tensor '{t}'"));
                    copies++;
                }
                finally
                {
                    consumer.Exit();
                }
            }
            return (staged.Version, bad, copies);
        }
        finally
        {
            staged.Release();
        }
    }

    /// <summary>The weight set as an operator's status shows it.</summary>
    public WeightSetStatus Status()
    {
        ulong active, canaryState = 0;
        ulong canaryVersion = 0;
        string? canaryFigures = null;
        HashSet<ConsumerRegistration> members = [];
        lock (_refs)
        {
            active = _activeState;
            if (_canary is { } run)
            {
                canaryVersion = run.Source.Version;
                canaryState = run.State;
                canaryFigures = run.Figures;
                members = [.. run.Members];
            }
        }
        UpdateOutcome? current;
        int queued;
        lock (_queue)
            queued = (_pending is null ? 0 : 1) + _rollbacks.Count;
        lock (_history)
            current = _outcomes.LastOrDefault(o => !o.IsFinal);
        return new WeightSetStatus(Name, Row, VersionEntry.UnpackState(active).Version, LastGoodVersion, Paused, canaryVersion, canaryFigures,
            current is null ? null : new UpdateStatus(current.Version, current.IsRollback, current.Phase, current.Progress, current.Bytes),
            queued, Placement,
            Consumers.Select(c => new ConsumerStatus(c.Session.Id, c.Session.Peer, c.Mode == ConsumerMode.Flip ? "flip" : "copy-in",
                VersionEntry.UnpackState(c.Serving).Version, c.Lane, members.Contains(c), c.Reported.Requests, c.Reported.Errors, c.Reported.P99)).ToList());
    }
}

public sealed record UpdateStatus(ulong Version, bool Rollback, string Phase, double Progress, long Bytes);

public sealed record ConsumerStatus(long Session, PeerIdentity Peer, string Mode, ulong Serving, int Lane, bool Canary, long Requests, long Errors, double? P99);

public sealed record WeightSetStatus(string Name, int Row, ulong Active, ulong LastGood, bool Paused, ulong Canary, string? CanaryFigures,
    UpdateStatus? Update, int Queued, string Placement, IReadOnlyList<ConsumerStatus> Consumers);

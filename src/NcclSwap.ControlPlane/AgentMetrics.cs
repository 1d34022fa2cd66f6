using System.Diagnostics.Metrics;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Versions;

namespace NcclSwap.ControlPlane;

/// <summary>
/// The agent's instruments (<see cref="System.Diagnostics.Metrics"/>, meter <c>nccl_swap</c>, whose name prefixes the Prometheus series: <c>nccl_swap_updates_total</c>, …): bytes and
/// durations of each phase of every update, its rate, outcomes by result (failures by cause), rollbacks, canary
/// decisions, copy-in pauses, what consumers report, and, observed on each collection, the version each weight set
/// and each consumer serves. The serve command exports them in Prometheus text format.
/// </summary>
public sealed class AgentMetrics : IDisposable
{
    public const string MeterName = "nccl_swap";

    private readonly Meter _meter;
    private readonly Counter<long> _bytes;
    private readonly Histogram<double> _duration;
    private readonly Histogram<double> _rate;
    private readonly Counter<long> _updates;
    private readonly Counter<long> _rollbacks;
    private readonly Counter<long> _decisions;
    private readonly Histogram<double> _pause;
    private readonly Counter<long> _requests;
    private readonly Counter<long> _errors;

    public AgentMetrics(Func<IEnumerable<WeightSetStatus>> status)
    {
        _meter = new Meter(MeterName);
        _bytes = _meter.CreateCounter<long>("phase_bytes_total", "By", "Bytes moved by each phase of the updates (snapshot, stage, verify).");
        _duration = _meter.CreateHistogram<double>("phase_duration_seconds", "s", "How long each phase of an update took.");
        _rate = _meter.CreateHistogram<double>("phase_rate_bytes_per_second", "By/s", "Bytes per second of each phase of an update.");
        _updates = _meter.CreateCounter<long>("updates_total", "{update}", "Updates ended, by result: activated, failed, refused (signature), rolledback (canaries), superseded, abandoned.");
        _rollbacks = _meter.CreateCounter<long>("rollbacks_total", "{rollback}", "Returns to an earlier version: by an operator (last good) or from canaries.");
        _decisions = _meter.CreateCounter<long>("canary_decisions_total", "{decision}", "Canary rollout steps: started, promoted, rolled-back, paused, resumed; by the policy or an operator.");
        _pause = _meter.CreateHistogram<double>("activation_pause_seconds", "s", "Copy-in pauses: the copy of a version into a consumer's buffers.");
        _requests = _meter.CreateCounter<long>("consumer_requests_total", "{request}", "Requests consumers reported serving.");
        _errors = _meter.CreateCounter<long>("consumer_errors_total", "{error}", "Errors consumers reported.");
        _meter.CreateObservableGauge("active_version", () => status().Select(s =>
            new Measurement<long>((long)s.Active, new KeyValuePair<string, object?>("weight_set", s.Name))), "{version}", "The active version of each weight set.");
        _meter.CreateObservableGauge("consumer_version", () => status().SelectMany(s => s.Consumers.Select(c =>
            new Measurement<long>((long)c.Serving, new("weight_set", s.Name), new("session", c.Session), new("pid", c.Peer.Pid), new("mode", c.Mode), new("canary", c.Canary)))),
            "{version}", "The version each consumer serves.");
    }

    public void Updated(UpdateOutcome outcome)
    {
        if (!outcome.IsFinal)
            return;
        var set = new KeyValuePair<string, object?>("weight_set", outcome.WeightSet);
        _updates.Add(1, set, new("result", outcome.Result.ToString().ToLowerInvariant()));
        if (outcome.IsRollback && outcome.Result == UpdateResult.Activated)
            _rollbacks.Add(1, set, new("kind", "operator"));
        if (outcome.Result == UpdateResult.RolledBack)
            _rollbacks.Add(1, set, new("kind", "canary"));
        foreach ((string phase, TimeSpan took) in new[] { ("snapshot", outcome.Snapshot), ("stage", outcome.Stage), ("verify", outcome.Verify), ("activate", outcome.Activate) })
        {
            if (took <= TimeSpan.Zero)
                continue;
            var tag = new KeyValuePair<string, object?>("phase", phase);
            _duration.Record(took.TotalSeconds, set, tag);
            if (phase != "activate")
            {
                _bytes.Add(outcome.Bytes, set, tag);
                _rate.Record(outcome.Bytes / took.TotalSeconds, set, tag);
            }
        }
    }

    public void Decided(RolloutDecision decision) =>
        _decisions.Add(1, new("weight_set", decision.WeightSet), new("decision", decision.Decision), new("by", decision.By is null ? "policy" : "operator"));

    public void CopiedIn(string weightSet, TimeSpan pause) => _pause.Record(pause.TotalSeconds, new KeyValuePair<string, object?>("weight_set", weightSet));

    public void Reported(string weightSet, in ReportPayload report)
    {
        var set = new KeyValuePair<string, object?>("weight_set", weightSet);
        _requests.Add(report.Requests, set);
        _errors.Add(report.Errors, set);
    }

    public void Dispose() => _meter.Dispose();
}

using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Versions;

namespace NcclSwap.ControlPlane.Audit;

/// <summary>
/// What the agent enters in its audit log: every refused connection and request (who, what, why), every publish and
/// rollback when it is asked for (who) and when it ends (the outcome, entered under the client that asked).
/// </summary>
internal sealed class AgentAudit
{
    private readonly AuditLog _log;
    private readonly ILogger _logger;
    private readonly ConcurrentDictionary<(string Set, ulong Version, bool Rollback), AuditActor> _askedBy = new();
    private readonly AuditActor _agent = AuditActor.Of(PeerIdentity.OfThisProcess());
    private (string Set, ulong Version, bool Rollback)? _enteredLast; // on the dispatcher's thread only

    public AgentAudit(AuditLog log, ILogger logger, FrontDoor door, RequestDispatcher dispatcher, VersionManager versions)
    {
        _log = log;
        _logger = logger;
        door.Refused += r => Enter(AuditActor.Of(r.Peer), new AuditEvent("connect", "denied", Detail: $"{r.Request}: {r.Reason}"));
        dispatcher.RequestRefused += (session, request, reason) =>
            Enter(AuditActor.Of(session.Peer), new AuditEvent(Name(request), "denied", session.WeightSet, request.Version, Detail: reason));
        dispatcher.RequestAccepted += Accepted;
        versions.RequestRefused += (session, request, reason) =>
        {
            // Raised on the dispatcher's thread right after Accepted of the same request: forget what it entered, if anything.
            if (_enteredLast == (session.WeightSet, request.Version, false))
                _askedBy.TryRemove((session.WeightSet, request.Version, false), out _);
            Enter(AuditActor.Of(session.Peer), new AuditEvent(Name(request), "denied", session.WeightSet, request.Version, Detail: reason));
        };
        versions.Updated += Ended;
        door.CommandRun += c =>
        {
            if (c.Command != "status") // reads change nothing an operator must trace
                Enter(AuditActor.Of(c.Peer), new AuditEvent(c.Command, c.Ok ? "done" : "failed", c.WeightSet, c.Version, Detail: c.Detail.Length > 0 ? c.Detail : null));
        };
        versions.Rollout += d => Enter(d.By is { } by ? AuditActor.Of(by) : _agent,
            new AuditEvent("canary", d.Decision, d.WeightSet, d.Version == 0 ? null : d.Version, Detail: d.Figures.Length > 0 ? d.Figures : null));
    }

    private void Accepted(SessionInfo session, Request request)
    {
        var kind = (RequestKind)request.Kind;
        if (kind is not (RequestKind.Publish or RequestKind.Rollback))
            return; // pings, status, acknowledgements and copy-ins change nothing an operator must trace
        AuditActor who = AuditActor.Of(session.Peer);
        var key = (session.WeightSet, kind == RequestKind.Rollback ? 0 : request.Version, kind == RequestKind.Rollback);
        // A publish repeating a version in flight (a replay, refused next) must not take over the entry of the client that sent it first.
        if (kind == RequestKind.Rollback)
            _askedBy[key] = who;
        _enteredLast = kind == RequestKind.Rollback || _askedBy.TryAdd(key, who) ? key : null;
        Enter(who, new AuditEvent(Name(request), "requested", session.WeightSet, kind == RequestKind.Rollback ? null : request.Version));
    }

    private void Ended(UpdateOutcome outcome)
    {
        if (!outcome.IsFinal)
            return;
        var key = (outcome.WeightSet, outcome.IsRollback ? 0 : outcome.Version, outcome.IsRollback);
        AuditActor who = _askedBy.TryRemove(key, out AuditActor asked) ? asked : _agent;
        string? signed = outcome.Signer is { } signer ? $"signed by key {signer}" : null;
        string? detail = outcome.Detail.Length > 0 ? signed is null ? outcome.Detail : $"{signed}; {outcome.Detail}" : signed;
        Enter(who, new AuditEvent(outcome.IsRollback ? "rollback" : "publish", outcome.Result.ToString().ToLowerInvariant(), outcome.WeightSet, outcome.Version,
            Manifest: outcome.ManifestSha256, Detail: detail));
    }

    private static string Name(Request request) => ((RequestKind)request.Kind).ToString().ToLowerInvariant();

    private void Enter(AuditActor who, AuditEvent what)
    {
        try
        {
            _log.Append(who, what);
        }
        catch (IOException e)
        {
            // The action goes on (refusing every client for a full disk would stop inference); the operator must know.
            _logger.LogError("audit log {Path}: could not enter {Action} {Outcome} by uid {Uid}: {Error}", _log.Path, what.Action, what.Outcome, who.Uid, e.Message);
        }
    }
}

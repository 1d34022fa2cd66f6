using System.Diagnostics;
using System.Text.Json;
using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane.Versions;

/// <summary>
/// The operator's verbs, sent as one line of JSON on the front door (<c>{"role": "operator", "weight_set": NAME,
/// "command": VERB, …}</c>) and answered with one: <c>status</c> (every weight set with <c>"weight_set": "*"</c>),
/// <c>promote</c>, <c>rollback</c>, <c>pause</c>, <c>resume</c>, <c>activate</c> (<c>"version"</c>), <c>verify</c>
/// (<c>"version"</c>, 0: the active one). Verbs that change something wait for its outcome (<c>"timeout_seconds"</c>,
/// 60 by default). A refused verb answers <c>{"ok": false, "code": "not-found"|"failed"|"invalid"|"timed-out", "error": …}</c>.
/// </summary>
public sealed partial class VersionManager : ICommandHost
{
    private static readonly string[] s_verbs = ["status", "promote", "rollback", "pause", "resume", "activate", "verify"];

    public CommandReply Run(PeerIdentity peer, string weightSet, JsonElement hello)
    {
        string verb = hello.GetProperty("command").GetString() ?? "";
        if (!s_verbs.Contains(verb))
            return CommandReply.Fail("invalid", $"unknown command '{verb}' ({string.Join(", ", s_verbs)})");
        if (verb == "status")
            return StatusReply(weightSet);
        if (Find(weightSet) is not { } set)
            return CommandReply.Fail("not-found", $"no weight set '{weightSet}' (the agent has: {string.Join(", ", _sets.Keys.Order()) switch { "" => "none", var names => names }})");
        TimeSpan timeout = TimeSpan.FromSeconds(hello.TryGetProperty("timeout_seconds", out JsonElement t) && t.TryGetDouble(out double seconds) && seconds > 0 ? seconds : 60);
        ulong version = hello.TryGetProperty("version", out JsonElement v) && v.TryGetUInt64(out ulong number) ? number : 0;
        switch (verb)
        {
            case "pause":
            case "resume":
                bool changed = set.Pause(verb == "pause", peer);
                return CommandReply.Done($"'{weightSet}' {(changed ? verb == "pause" ? "paused" : "resumed" : verb == "pause" ? "was paused already" : "was not paused")}");
            case "promote":
                return Canary(set, CanaryCommand.Promote, peer, timeout) ?? CommandReply.Fail("not-found", $"no canary of '{weightSet}' is in flight");
            case "rollback":
                return Canary(set, CanaryCommand.RollBack, peer, timeout) ?? RollbackToLastGood(set, timeout);
            case "activate":
                if (version == 0)
                    return CommandReply.Fail("invalid", "activate needs the version");
                if (version == set.CanaryVersion)
                    return Canary(set, CanaryCommand.Promote, peer, timeout) ?? CommandReply.Fail("failed", $"the canary of version {version} ended meanwhile");
                if (version == VersionEntry.UnpackState(set.ActiveState).Version)
                    return CommandReply.Done($"version {version} of '{weightSet}' is active already");
                if (version == set.LastGoodVersion)
                    return RollbackToLastGood(set, timeout);
                return CommandReply.Fail("not-found", $"version {version} of '{weightSet}' is not staged: the agent can activate its canary version ({Or(set.CanaryVersion)}) or return to its last good one ({Or(set.LastGoodVersion)})");
            default: // verify
                var clock = Stopwatch.StartNew();
                if (set.VerifyAgain(version) is not { } checkedVersion)
                    return CommandReply.Fail("not-found", version == 0 ? $"'{weightSet}' has no active version staged" : $"version {version} of '{weightSet}' is not staged (active, last good or canary)");
                string figures = $"version {checkedVersion.Version}: {checkedVersion.Copies} cop{(checkedVersion.Copies == 1 ? "y" : "ies")} digested in {clock.Elapsed.TotalMilliseconds:0.0} ms";
                return checkedVersion.Bad.Count == 0
                    ? CommandReply.Done($"{figures}, every tensor matches the manifest")
                    : CommandReply.Fail("corrupt", $"{figures}; mismatches: {string.Join("; ", checkedVersion.Bad.Take(8))}{(checkedVersion.Bad.Count > 8 ? $" and {checkedVersion.Bad.Count - 8} more" : "")}");
        }
    }

    private static string Or(ulong version) => version == 0 ? "none" : $"{version}";

    private static CommandReply? Canary(WeightSetLifecycle set, CanaryCommand command, PeerIdentity peer, TimeSpan timeout)
    {
        ulong version = set.CanaryVersion;
        if (version == 0 || !set.Command(command, peer))
            return null;
        return Await(set.OutcomeOf(version, rollback: false), timeout);
    }

    private static CommandReply RollbackToLastGood(WeightSetLifecycle set, TimeSpan timeout)
    {
        (UpdateOutcome? outcome, int status, string error) = set.QueueRollback(0, Messages.NewRequest(RequestKind.Rollback, 0, 0, (uint)set.Row), null);
        return outcome is null ? CommandReply.Fail(status == Abi.Status.NotFound ? "not-found" : "failed", error) : Await(outcome, timeout);
    }

    private static CommandReply Await(UpdateOutcome? outcome, TimeSpan timeout)
    {
        if (outcome is null)
            return CommandReply.Fail("failed", "the update ended before it could be followed");
        var clock = Stopwatch.StartNew();
        while (!outcome.IsFinal || outcome.Result == UpdateResult.Canary)
        {
            if (clock.Elapsed > timeout)
                return CommandReply.Fail("timed-out", $"{outcome.WeightSet} version {outcome.Version} is still {outcome.Phase} after {timeout.TotalSeconds:0} s");
            Thread.Sleep(5);
        }
        return outcome.Result is UpdateResult.Activated or UpdateResult.RolledBack
            ? CommandReply.Done(outcome.ToString())
            : CommandReply.Fail("failed", outcome.ToString());
    }

    private CommandReply StatusReply(string weightSet)
    {
        IReadOnlyList<WeightSetStatus> sets = weightSet == "*" ? Statuses() : Statuses().Where(s => s.Name == weightSet).ToList();
        if (sets.Count == 0 && weightSet != "*")
            return CommandReply.Fail("not-found", $"no weight set '{weightSet}'");
        return new CommandReply(true, null, null, writer =>
        {
            writer.WriteStartArray("weight_sets");
            foreach (WeightSetStatus s in sets)
            {
                WeightSetPolicy policy = Options.PolicyFor(s.Name);
                writer.WriteStartObject();
                writer.WriteString("name", s.Name);
                writer.WriteNumber("row", s.Row);
                writer.WriteNumber("active", s.Active);
                writer.WriteNumber("last_good", s.LastGood);
                writer.WriteBoolean("paused", s.Paused);
                writer.WriteBoolean("signature_required", policy.RequireSignature);
                writer.WriteStartArray("trusted_keys");
                foreach (Signing.TrustedKey key in policy.TrustedKeys)
                    writer.WriteStringValue(Signing.VersionSignature.IdText(key.Id));
                writer.WriteEndArray();
                if (policy.Canary is { } canary)
                {
                    writer.WriteStartObject("canary_policy");
                    writer.WriteNumber("fraction", canary.Fraction);
                    writer.WriteNumber("min_seconds", canary.MinDuration.TotalSeconds);
                    writer.WriteNumber("min_samples", canary.MinSamples);
                    writer.WriteNumber("max_error_rate", canary.MaxErrorRate);
                    writer.WriteNumber("max_p99_ratio", canary.MaxP99Ratio);
                    writer.WriteEndObject();
                }
                if (s.Canary != 0)
                {
                    writer.WriteStartObject("canary");
                    writer.WriteNumber("version", s.Canary);
                    writer.WriteString("figures", s.CanaryFigures);
                    writer.WriteEndObject();
                }
                if (s.Update is { } u)
                {
                    writer.WriteStartObject("update");
                    writer.WriteNumber("version", u.Version);
                    writer.WriteBoolean("rollback", u.Rollback);
                    writer.WriteString("phase", u.Phase);
                    writer.WriteNumber("progress", Math.Round(u.Progress, 3));
                    writer.WriteNumber("bytes", u.Bytes);
                    writer.WriteEndObject();
                }
                writer.WriteNumber("queued", s.Queued);
                writer.WriteString("placement", s.Placement);
                writer.WriteStartArray("consumers");
                foreach (ConsumerStatus c in s.Consumers)
                {
                    writer.WriteStartObject();
                    writer.WriteNumber("session", c.Session);
                    writer.WriteNumber("pid", c.Peer.Pid);
                    writer.WriteNumber("uid", c.Peer.Uid);
                    writer.WriteString("mode", c.Mode);
                    writer.WriteNumber("serving", c.Serving);
                    writer.WriteNumber("lane", c.Lane);
                    writer.WriteBoolean("canary", c.Canary);
                    writer.WriteNumber("requests", c.Requests);
                    writer.WriteNumber("errors", c.Errors);
                    if (c.P99 is { } p99 && double.IsFinite(p99))
                        writer.WriteNumber("p99_ms", p99);
                    writer.WriteEndObject();
                }
                writer.WriteEndArray();
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
        });
    }
}

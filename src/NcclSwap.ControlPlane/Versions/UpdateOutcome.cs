using System.Diagnostics;
using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane.Versions;

/// <summary>Where an update stands, or how it ended.</summary>
public enum UpdateResult
{
    /// <summary>Snapshotted and waiting for the update in flight to end.</summary>
    Pending,

    /// <summary>Being staged and verified.</summary>
    Staging,

    Activated,

    /// <summary>A newer version was published before this one's update began; it was never staged to consumers.</summary>
    Superseded,

    /// <summary>Its bytes could not be verified (or it could not be staged): nothing was activated.</summary>
    Failed,

    /// <summary>The agent stopped before it was activated.</summary>
    Abandoned,

    /// <summary>On canary consumers only, while the rollout policy (or an operator) decides.</summary>
    Canary,

    /// <summary>Taken back from its canaries (their figures, or an operator): the other consumers never had it.</summary>
    RolledBack,

    /// <summary>Its signature was missing where one is required, by a key not trusted, or did not match: nothing was staged to consumers.</summary>
    Refused,
}

/// <summary>
/// One update of a weight set (a published version, or a rollback), with the figures of each phase. Written by
/// the update's own thread; read by anyone once <see cref="IsFinal"/>, or as a snapshot (<see cref="ToString"/>).
/// </summary>
public sealed class UpdateOutcome(string weightSet, ulong version, bool rollback, long bytes)
{
    public string WeightSet { get; } = weightSet;

    public ulong Version { get; } = version;

    /// <summary>A rollback to <see cref="Version"/> rather than a publish of it.</summary>
    public bool IsRollback { get; } = rollback;

    public long Bytes { get; } = bytes;

    public UpdateResult Result { get; internal set; } = UpdateResult.Pending;

    /// <summary>Why it failed, what superseded it, who was left out.</summary>
    public string Detail { get; internal set; } = "";

    /// <summary>Status code a waiting publisher or operator is answered with.</summary>
    public int Status { get; internal set; } = Abi.Status.Ok;

    private readonly long _received = Stopwatch.GetTimestamp();

    /// <summary>From the request to the first copy of its bytes: its dispatch, the worker's start, a staging buffer.</summary>
    public TimeSpan Start { get; private set; }

    /// <summary>The first copy of the version's bytes begins now.</summary>
    internal void Started() => Start = Stopwatch.GetElapsedTime(_received);

    /// <summary>The copy from the publisher's memory and the digest of its bytes (the manifest), while the publisher waits.</summary>
    public TimeSpan Snapshot { get; internal set; }

    /// <summary>Waiting for consumers to stop reading the slot the version goes into.</summary>
    public TimeSpan AckWait { get; internal set; }

    /// <summary>Copying the staged bytes into every flip consumer's free slot.</summary>
    public TimeSpan Stage { get; internal set; }

    /// <summary>Digests of the staged bytes and of every consumer's copy, compared with the manifest.</summary>
    public TimeSpan Verify { get; internal set; }

    /// <summary>Saving the state and the one store that switches consumers.</summary>
    public TimeSpan Activate { get; internal set; }

    /// <summary>Flip consumers that received the version.</summary>
    public int Consumers { get; internal set; }

    /// <summary>Tensors copied again after their digest did not match.</summary>
    public int Resent { get; internal set; }

    /// <summary>Consumers ended because they did not stop reading the slot in time.</summary>
    public List<string> Evicted { get; } = [];

    /// <summary>The id of the trusted key whose signature was verified (16 hex digits), or null for an unsigned version.</summary>
    public string? Signer { get; internal set; }

    /// <summary>The SHA-256 of the version's manifest, once taken.</summary>
    public string? ManifestSha256 { get; internal set; }

    /// <summary>The state word activated (0 until then).</summary>
    public ulong State { get; internal set; }

    public bool IsFinal => Result is not (UpdateResult.Pending or UpdateResult.Staging or UpdateResult.Canary);

    /// <summary>What the update is doing now, for status: queued, verifying, staging, canary, activating, or its result.</summary>
    public string Phase { get; internal set; } = "queued";

    /// <summary>How far it is, from 0 to 1, for a progress bar.</summary>
    public double Progress { get; internal set; }

    public override string ToString()
    {
        string what = IsRollback ? $"rollback to version {Version}" : $"version {Version}";
        string figures = $"{Bytes} bytes; snapshot {Snapshot.TotalMilliseconds:0.0} ms, ack wait {AckWait.TotalMilliseconds:0.0} ms, stage {Stage.TotalMilliseconds:0.0} ms, verify {Verify.TotalMilliseconds:0.0} ms, activate {Activate.TotalMilliseconds:0.0} ms; {Consumers} flip consumer(s){(IsRollback ? "" : $"; first copy {Start.TotalMilliseconds:0.0} ms after the request")}";
        string extra = (Resent > 0 ? $"; {Resent} tensor(s) re-sent" : "") + (Evicted.Count > 0 ? $"; ended: {string.Join(", ", Evicted)}" : "");
        return $"{WeightSet} {what}: {Result.ToString().ToLowerInvariant()}{(Detail.Length > 0 ? $" ({Detail})" : "")}; {figures}{extra}";
    }
}

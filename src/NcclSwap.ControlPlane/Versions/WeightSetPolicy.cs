using NcclSwap.ControlPlane.Signing;

namespace NcclSwap.ControlPlane.Versions;

/// <summary>
/// How a new version of a weight set proves itself on some of its consumers before the rest: <see cref="Fraction"/>
/// of the consumers (at least one, never all) take it first; the agent compares what they report with what the
/// consumers still on the previous version report, and promotes it to all or rolls the canaries back.
/// </summary>
/// <param name="Fraction">Share of the consumers that take a new version first, in (0, 1).</param>
/// <param name="MinDuration">No decision before the canaries served this long.</param>
/// <param name="MinSamples">No decision before the canaries reported this many requests.</param>
/// <param name="MaxErrorRate">Roll back when the canaries' errors per request exceed this.</param>
/// <param name="MaxP99Ratio">Roll back when the canaries' p99 latency exceeds this times the p99 of the consumers on the previous version.</param>
/// <param name="MinQuality">Roll back when the canaries' mean quality score is below this (when they report one).</param>
/// <param name="MaxDuration">Roll back when the canaries have not reported enough by then.</param>
public sealed record CanaryPolicy(double Fraction, TimeSpan MinDuration, long MinSamples, double MaxErrorRate, double MaxP99Ratio,
    double? MinQuality, TimeSpan MaxDuration)
{
    public static CanaryPolicy Default { get; } = new(0.25, TimeSpan.FromSeconds(30), 100, 0.01, 1.5, null, TimeSpan.FromMinutes(10));

    /// <summary>How many of <paramref name="consumers"/> take a version first: none when fewer than two.</summary>
    public int CanariesOf(int consumers) => consumers < 2 ? 0 : Math.Clamp((int)Math.Ceiling(Fraction * consumers), 1, consumers - 1);
}

/// <summary>
/// What the operator configured for one weight set: whose versions it takes (signatures, and which uids and gids
/// may publish it) and how they roll out.
/// </summary>
public sealed record WeightSetPolicy
{
    public static WeightSetPolicy Open { get; } = new();

    /// <summary>Every version must carry a signature by one of <see cref="TrustedKeys"/>; no client can publish around it.</summary>
    public bool RequireSignature { get; init; }

    public IReadOnlyList<TrustedKey> TrustedKeys { get; init; } = [];

    /// <summary>The uids that may publish it; with <see cref="PublisherGroups"/> both empty, any client with the publisher role.</summary>
    public IReadOnlySet<uint> PublisherUsers { get; init; } = new HashSet<uint>();

    public IReadOnlySet<uint> PublisherGroups { get; init; } = new HashSet<uint>();

    /// <summary>Null: a new version goes to every consumer at once.</summary>
    public CanaryPolicy? Canary { get; init; }

    /// <summary>Why <paramref name="peer"/> may not publish <paramref name="weightSet"/>, or null if it may.</summary>
    public string? RefusePublisher(PeerIdentity peer, string weightSet) =>
        (PublisherUsers.Count == 0 && PublisherGroups.Count == 0) || PublisherUsers.Contains(peer.Uid) || PublisherGroups.Contains(peer.Gid)
            ? null
            : $"{peer} may not publish '{weightSet}' (its publishers: {Describe(PublisherUsers, "uid")}{(PublisherGroups.Count > 0 ? ", " + Describe(PublisherGroups, "gid") : "")})";

    private static string Describe(IReadOnlySet<uint> ids, string what) =>
        ids.Count == 0 ? $"no {what}" : string.Join(", ", ids.Order().Select(i => $"{what} {i}"));
}

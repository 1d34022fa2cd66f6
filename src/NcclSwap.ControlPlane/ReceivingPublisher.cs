using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane;

/// <summary>
/// A destination of a transfer plan that hands what it receives to its local agent: a publisher of weight set
/// <c>weightSet</c> whose region is laid out as the destination's share (<see cref="TransferPlan.DestinationLayout"/>).
/// <see cref="Receive"/> runs the plan into that region and, once every bucket has arrived and matched its digest,
/// publishes the version the sources sent; the agent then verifies, stages and activates it for its consumers as for
/// any publish. A transfer that fails (a dead or stalled peer, a bucket that stays wrong) publishes nothing, so every
/// consumer keeps serving its last good version; the next run skips the buckets the region still holds.
/// </summary>
public sealed class ReceivingPublisher : IDisposable
{
    private readonly PublisherClient _publisher;
    private readonly IDeviceBuffer _region;
    private readonly PlanExecutor _executor;

    private ReceivingPublisher(PublisherClient publisher, IDeviceBuffer region, PlanExecutor executor, int destination)
    {
        _publisher = publisher;
        _region = region;
        _executor = executor;
        Destination = destination;
    }

    public int Destination { get; }

    /// <summary>What the agent answered to the last publish.</summary>
    public PublishResult? LastPublish { get; private set; }

    /// <summary>A publisher registered for destination <paramref name="destination"/>'s share, to keep across swap groups (<see cref="Over"/>).</summary>
    public static PublisherClient Register(string socketPath, string weightSet, TransferPlan plan, int destination, TimeSpan? timeout = null) =>
        PublisherClient.Connect(socketPath, weightSet, plan.DestinationLayout(destination), timeout);

    /// <summary>
    /// Destination <paramref name="destination"/> of <paramref name="plan"/> on <paramref name="collective"/> (whose rank
    /// plays it in <paramref name="ranks"/>), receiving into <paramref name="publisher"/>'s region (<see cref="Register"/>).
    /// The caller keeps the publisher: a group formed again after a failure receives into the same region, with no new
    /// registration for the agent to weigh against the old one.
    /// </summary>
    public static ReceivingPublisher Over(PublisherClient publisher, TransferPlan plan, PlanRanks ranks, int destination, IBackend backend, ICollective collective)
    {
        if (ranks.Destinations[destination] != collective.Rank)
            throw new ArgumentException($"destination {destination} is rank {ranks.Destinations[destination]}, not this collective's rank {collective.Rank}");
        if (ranks.Sources.Contains(collective.Rank))
            throw new ArgumentException($"rank {collective.Rank} is also a source; a receiving publisher only receives");
        if (publisher.Tensors.Layout.Mismatch(plan.DestinationLayout(destination)) is { } problem)
            throw new ArgumentException($"the publisher's region is not destination {destination}'s share: {problem}");
        IDeviceBuffer region = backend.MapHost(publisher.Tensors.Pointer, publisher.Tensors.Length, readOnly: false, $"{publisher.Tensors.Name} as destination {destination}");
        try
        {
            // The region is host memory: buckets arrive in device staging and are copied out (not received in place).
            return new ReceivingPublisher(publisher, region, new PlanExecutor(plan, backend, collective, ranks) { InPlace = false }, destination);
        }
        catch
        {
            region.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Receives one run of the plan, then publishes the version the sources sent and (with
    /// <paramref name="waitForActivation"/>) waits until the agent has activated it. Throws what ended the transfer, or
    /// <see cref="InvalidOperationException"/> when the agent refused the version.
    /// </summary>
    public TransferReport Receive(bool waitForActivation = true, TimeSpan? timeout = null)
    {
        TransferReport report = _executor.Run(null, _region);
        if (report.Version == 0)
            throw new InvalidOperationException($"destination {Destination}: the sources sent version 0; a version to publish is 1 or more");
        PublishResult result = _publisher.Publish(report.Version, waitForActivation, timeout);
        LastPublish = result;
        if (!result.Ok)
            throw new InvalidOperationException($"destination {Destination}: the agent did not take version {report.Version}: {result}");
        return report;
    }

    /// <summary>Releases the executor and the mapping; the publisher's registration stays with its owner.</summary>
    public void Dispose()
    {
        _executor.Dispose();
        _region.Dispose();
    }
}

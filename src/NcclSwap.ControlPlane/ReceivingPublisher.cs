using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane;

/// <summary>
/// A destination of a transfer plan that hands what it receives to its local agent: a publisher of weight set
/// <c>weightSet</c> whose region is laid out as the destination's share (<see cref="TransferPlan.DestinationLayout"/>).
/// On a GPU the region is device memory of the destination's own, which buckets arrive in directly and the agent opens
/// through CUDA IPC; on the host backend it is the publisher's shared memory. <see cref="Receive"/> runs the plan into
/// that region and, once every bucket has arrived and matched its digest, publishes the version the sources sent; the
/// agent then verifies, stages and activates it for its consumers as for any publish. A transfer that fails (a dead or
/// stalled peer, a bucket that stays wrong) publishes nothing, so every consumer keeps serving its last good version;
/// the next run skips the buckets the region still holds.
/// </summary>
public sealed class ReceivingPublisher : IDisposable
{
    private readonly Registration _registration;
    private readonly IDeviceBuffer _region;
    private readonly bool _ownsRegion;
    private readonly PlanExecutor _executor;

    private ReceivingPublisher(Registration registration, IDeviceBuffer region, bool ownsRegion, PlanExecutor executor, int destination)
    {
        _registration = registration;
        _region = region;
        _ownsRegion = ownsRegion;
        _executor = executor;
        Destination = destination;
    }

    public int Destination { get; }

    /// <summary>What the agent answered to the last publish.</summary>
    public PublishResult? LastPublish { get; private set; }

    /// <summary>
    /// A destination's registration with its agent, kept across swap groups: the publisher, and on a GPU the device
    /// memory it registered (with the backend that allocated it), so that a group formed again receives into the same
    /// region with no new registration for the agent to weigh against the old one.
    /// </summary>
    public sealed class Registration : IDisposable
    {
        private readonly IBackend _backend;

        internal Registration(PublisherClient publisher, IBackend backend, IDeviceBuffer? device)
        {
            Publisher = publisher;
            _backend = backend;
            Device = device;
        }

        public PublisherClient Publisher { get; }

        /// <summary>The GPU memory the share is received into, or null where it is the publisher's shared memory.</summary>
        public IDeviceBuffer? Device { get; }

        public void Dispose()
        {
            Publisher.Dispose();
            Device?.Dispose();
            _backend.Dispose();
        }
    }

    /// <summary>
    /// Registers destination <paramref name="destination"/>'s share with the agent at <paramref name="socketPath"/>:
    /// in device memory that <paramref name="backend"/> allocates when it is a GPU backend (the agent must then run the
    /// cuda backend on this machine), else in the publisher's shared memory. The registration takes
    /// <paramref name="backend"/> over; keep it across swap groups (<see cref="Over"/>).
    /// </summary>
    public static Registration Register(string socketPath, string weightSet, TransferPlan plan, int destination, IBackend backend, TimeSpan? timeout = null)
    {
        RegionLayout layout = plan.DestinationLayout(destination);
        IDeviceBuffer? device = null;
        try
        {
            if (backend.Kind != "cuda")
                return new Registration(PublisherClient.Connect(socketPath, weightSet, layout, timeout), backend, null);
            device = backend.Allocate(Math.Max(layout.Length, 1));
            (NcclSwap.Cuda.CuIpcMemHandle handle, long offset) = backend.ExportIpc(device);
            PublisherClient publisher = PublisherClient.ConnectDevice(socketPath, weightSet, layout, new DeviceRegion("tensors", handle, offset, device.Length), timeout);
            return new Registration(publisher, backend, device);
        }
        catch
        {
            device?.Dispose();
            backend.Dispose();
            throw;
        }
    }

    /// <summary>
    /// Destination <paramref name="destination"/> of <paramref name="plan"/> on <paramref name="collective"/> (whose rank
    /// plays it in <paramref name="ranks"/>), receiving into <paramref name="registration"/>'s region (<see cref="Register"/>),
    /// in place where it is device memory. The caller keeps the registration.
    /// </summary>
    public static ReceivingPublisher Over(Registration registration, TransferPlan plan, PlanRanks ranks, int destination, IBackend backend, ICollective collective)
    {
        if (ranks.Destinations[destination] != collective.Rank)
            throw new ArgumentException($"destination {destination} is rank {ranks.Destinations[destination]}, not this collective's rank {collective.Rank}");
        if (ranks.Sources.Contains(collective.Rank))
            throw new ArgumentException($"rank {collective.Rank} is also a source; a receiving publisher only receives");
        PublisherClient publisher = registration.Publisher;
        if (publisher.Layout.Mismatch(plan.DestinationLayout(destination)) is { } problem)
            throw new ArgumentException($"the publisher's region is not destination {destination}'s share: {problem}");
        if (registration.Device is { } device)
            return new ReceivingPublisher(registration, device, ownsRegion: false, new PlanExecutor(plan, backend, collective, ranks), destination);
        IDeviceBuffer region = backend.MapHost(publisher.Tensors.Pointer, publisher.Tensors.Length, readOnly: false, $"{publisher.Tensors.Name} as destination {destination}");
        try
        {
            // Host memory: buckets arrive in device staging and are copied out (not received in place).
            return new ReceivingPublisher(registration, region, ownsRegion: true, new PlanExecutor(plan, backend, collective, ranks) { InPlace = false }, destination);
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
        PublishResult result = _registration.Publisher.Publish(report.Version, waitForActivation, timeout);
        LastPublish = result;
        if (!result.Ok)
            throw new InvalidOperationException($"destination {Destination}: the agent did not take version {report.Version}: {result}");
        return report;
    }

    /// <summary>Releases the executor and any mapping of shared memory; the registration stays with its owner.</summary>
    public void Dispose()
    {
        _executor.Dispose();
        if (_ownsRegion)
            _region.Dispose();
    }
}

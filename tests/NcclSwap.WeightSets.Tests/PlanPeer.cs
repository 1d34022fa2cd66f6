using System.Globalization;
using NcclSwap.DataPlane;
using NcclSwap.Testing;

namespace NcclSwap.WeightSets.Tests;

/// <summary>
/// One rank of a transfer plan run in its own process: the plan of <see cref="TransferPlanTests.MixedTensors"/>,
/// a source's model and a destination's starting bytes made from the seed; it runs the plan over the host collective,
/// prints <c>received N</c> after each bucket it receives (and, when <c>slow</c>, waits 200 ms there, so that a test can
/// kill it in the middle), writes its region to the output file and prints <c>done</c>.
/// </summary>
internal static class PlanPeer
{
    public const string Role = "plan";

    public static PeerProcess Start(string id, int rank, int sources, int destinations, int seed, string output, bool slow = false) =>
        PeerHost.Start(Role, id, $"{rank}", $"{sources}", $"{destinations}", $"{seed}", output, slow ? "slow" : "fast");

    public static TransferPlan Plan(int sources, int destinations) =>
        TransferPlan.Create(new ModelLayout("mixed", TransferPlanTests.MixedTensors), sources, destinations, bucketBytes: 1024);

    public static byte[] Model(TransferPlan plan, int seed) => TestData.Random((int)plan.SourceLayout().Length, seed);

    public static int Run(string[] args)
    {
        string id = args[0];
        int rank = int.Parse(args[1], CultureInfo.InvariantCulture);
        int sources = int.Parse(args[2], CultureInfo.InvariantCulture);
        int destinations = int.Parse(args[3], CultureInfo.InvariantCulture);
        int seed = int.Parse(args[4], CultureInfo.InvariantCulture);
        string output = args[5];
        bool slow = args[6] == "slow";
        TransferPlan plan = Plan(sources, destinations);
        byte[] start = rank < sources ? Model(plan, seed) : TestData.Random((int)plan.DestinationLayout(rank - sources).Length, seed + rank);

        using var backend = new HostBackend();
        using var collective = new Announcing(backend.JoinCollective(id, rank, sources + destinations, TimeSpan.FromSeconds(5)), slow);
        using IDeviceBuffer region = backend.Allocate(start.Length);
        backend.Upload(start, region);
        try
        {
            using var executor = new PlanExecutor(plan, backend, collective);
            executor.Run(region);
        }
        catch (Exception e) when (e is CollectiveException or InvalidDataException)
        {
            Console.WriteLine($"failed: {e.Message}");
            return 3;
        }
        byte[] held = new byte[start.Length];
        backend.Download(region, 0, held);
        File.WriteAllBytes(output, held);
        Console.WriteLine("done");
        return 0;
    }

    /// <summary>Says on stdout how many buckets (receives of more than a control word) have arrived.</summary>
    internal sealed class Announcing(ICollective inner, bool slow) : ICollective
    {
        private int _received;

        public int Rank => inner.Rank;

        public int Size => inner.Size;

        public void Broadcast(IDeviceBuffer buffer, long offset, long length, int root, ICopyStream stream) => inner.Broadcast(buffer, offset, length, root, stream);

        public void AllGather(IDeviceBuffer send, long sendOffset, IDeviceBuffer receive, long receiveOffset, long bytesPerRank, ICopyStream stream) =>
            inner.AllGather(send, sendOffset, receive, receiveOffset, bytesPerRank, stream);

        public void Send(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream) => inner.Send(buffer, offset, length, peer, stream);

        public void Receive(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream)
        {
            inner.Receive(buffer, offset, length, peer, stream);
            if (length <= 8)
                return;
            Console.WriteLine($"received {Interlocked.Increment(ref _received)}");
            if (slow)
                Thread.Sleep(200);
        }

        public IDisposable Group() => inner.Group();

        public void Abort() => inner.Abort();

        public void Dispose() => inner.Dispose();
    }
}

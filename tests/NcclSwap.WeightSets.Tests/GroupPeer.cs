using System.Globalization;
using NcclSwap.DataPlane;
using NcclSwap.Testing;

namespace NcclSwap.WeightSets.Tests;

/// <summary>
/// One member of a swap group in its own process: forms the group from a configuration file, then runs the plan of
/// <see cref="TransferPlanTests.MixedTensors"/> (sources on the first ranks) on each of its ranks, a source's model and
/// a destination's starting bytes made from the seed. Prints <c>joined</c>, <c>received N</c> after each bucket it
/// receives (waiting 200 ms there when <c>slow</c>), writes each rank's region to <c>DIR/rankR</c> and prints <c>done</c>;
/// on a failure prints <c>failed: MESSAGE</c> and exits 3.
/// </summary>
internal static class GroupPeer
{
    public const string Role = "group";

    public static PeerProcess Start(string config, int member, int sources, int destinations, int seed, string folder, bool slow = false) =>
        PeerHost.Start(Role, config, $"{member}", $"{sources}", $"{destinations}", $"{seed}", folder, slow ? "slow" : "fast");

    public static int Run(string[] args)
    {
        SwapGroupConfig config = SwapGroupConfig.Load(args[0]);
        int member = int.Parse(args[1], CultureInfo.InvariantCulture);
        int sources = int.Parse(args[2], CultureInfo.InvariantCulture);
        int destinations = int.Parse(args[3], CultureInfo.InvariantCulture);
        int seed = int.Parse(args[4], CultureInfo.InvariantCulture);
        string folder = args[5];
        bool slow = args[6] == "slow";
        TransferPlan plan = PlanPeer.Plan(sources, destinations);
        try
        {
            using SwapGroup group = SwapGroup.Form(config, member, _ => new HostBackend());
            Console.WriteLine("joined");
            group.RunOnEachRank(local =>
            {
                byte[] start = local.Rank < sources ? PlanPeer.Model(plan, seed) : TestData.Random((int)plan.DestinationLayout(local.Rank - sources).Length, seed + local.Rank);
                using IDeviceBuffer region = local.Backend.Allocate(start.Length);
                local.Backend.Upload(start, region);
                using var executor = new PlanExecutor(plan, local.Backend, new PlanPeer.Announcing(local.Collective, slow));
                executor.Run(region);
                byte[] held = new byte[start.Length];
                local.Backend.Download(region, 0, held);
                File.WriteAllBytes(Path.Combine(folder, $"rank{local.Rank}"), held);
                return 0;
            });
        }
        catch (Exception e) when (e is CollectiveException or InvalidDataException or InvalidOperationException)
        {
            Console.WriteLine($"failed: {e.Message}");
            return 3;
        }
        Console.WriteLine("done");
        return 0;
    }
}

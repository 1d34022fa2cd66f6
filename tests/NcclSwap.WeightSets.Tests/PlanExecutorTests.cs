using NcclSwap.DataPlane;
using NcclSwap.Testing;

namespace NcclSwap.WeightSets.Tests;

/// <summary>Plans run over the host collective, one thread per rank (each with its own backend and loopback TCP link).</summary>
public class PlanExecutorTests
{
    private static readonly TimeSpan Generous = TimeSpan.FromSeconds(60);

    /// <summary>Every rank's region after a run, or the exception that ended it; the model the sources sent.</summary>
    private sealed record Outcome(byte[][] Regions, TransferReport?[] Reports, Exception?[] Failures);

    private static Outcome RunAll(TransferPlan plan, byte[] model, byte[][]? regions = null, TransferReport?[]? previous = null,
        Action<int, FlakyCollective>? faults = null, TimeSpan? timeout = null, int? absent = null)
    {
        int size = plan.Sources + plan.Destinations;
        regions ??= Enumerable.Range(0, size).Select(r => r < plan.Sources ? model : TestData.Random((int)plan.DestinationLayout(r - plan.Sources).Length, r)).ToArray();
        var reports = new TransferReport?[size];
        var failures = new Exception?[size];
        string id = HostCollective.CreateId();
        // A thread of its own per rank, started at once (pool threads may come late, past a short deadline).
        var threads = Enumerable.Range(0, size).Select(rank => new Thread(() => RunRank(rank)) { IsBackground = true }).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        return new Outcome(regions, reports, failures);

        void RunRank(int rank)
        {
            try
            {
                if (rank == absent)
                {
                    // Joins, then never takes part (a stalled or dead rank), until the others have given up.
                    using var idle = new HostBackend();
                    using ICollective joined = idle.JoinCollective(id, rank, size, timeout ?? Generous);
                    Thread.Sleep(3 * (timeout ?? Generous));
                    return;
                }
                using var backend = new HostBackend();
                using var collective = new FlakyCollective(backend.JoinCollective(id, rank, size, timeout ?? Generous), backend);
                faults?.Invoke(rank, collective);
                using IDeviceBuffer region = backend.Allocate(regions[rank].Length);
                backend.Upload(regions[rank], region);
                reports[rank] = new PlanExecutor(plan, backend, collective).Run(region, previous?[rank]);
                backend.Download(region, 0, regions[rank] = new byte[regions[rank].Length]);
            }
            catch (Exception e)
            {
                failures[rank] = e;
            }
        }
    }

    private static void AssertHolds(TransferPlan plan, byte[] model, Outcome outcome, int seed)
    {
        RegionLayout source = plan.SourceLayout();
        for (int d = 0; d < plan.Destinations; d++)
        {
            RegionLayout layout = plan.DestinationLayout(d);
            foreach (LayoutTensor t in plan.Layout.Tensors)
            {
                byte[] expected = TransferPlanTests.Expected(t, model.AsSpan((int)source[t.Name].Offset, (int)t.Bytes).ToArray(), d, plan.Destinations);
                Assert.True(expected.AsSpan().SequenceEqual(outcome.Regions[plan.Sources + d].AsSpan((int)layout[t.Name].Offset, (int)layout[t.Name].Bytes)),
                    $"destination {d} of {plan.Destinations}: {t.Name} differs (seed {seed})");
            }
        }
    }

    [Theory]
    [InlineData(1, 1)]
    [InlineData(1, 2)]
    [InlineData(2, 4)]
    public void Every_destination_ends_with_exactly_its_parts_and_a_second_run_of_the_same_model_sends_nothing(int sources, int destinations)
    {
        int seed = TestData.NewSeed();
        TransferPlan plan = TransferPlan.Create(new ModelLayout("mixed", TransferPlanTests.MixedTensors), sources, destinations, bucketBytes: 1024);
        byte[] model = TestData.Random((int)plan.SourceLayout().Length, seed);

        Outcome first = RunAll(plan, model);
        Assert.All(first.Failures, f => Assert.Null(f));
        AssertHolds(plan, model, first, seed);
        for (int d = 0; d < destinations; d++)
            Assert.Equal(plan.Transfers.Where(t => t.Destinations.Contains(d)).Sum(t => t.Buckets.Buckets.Count), first.Reports[sources + d]!.Buckets);

        // The same bytes again: every bucket's digest matches what the destination holds, so none is sent.
        Outcome second = RunAll(plan, model, first.Regions, first.Reports);
        Assert.All(second.Failures, f => Assert.Null(f));
        Assert.All(second.Reports, r => Assert.Equal(0, r!.Buckets));
        AssertHolds(plan, model, second, seed);

        // One tensor changes: only the buckets that hold its parts travel.
        byte[] changed = (byte[])model.Clone();
        TensorPlacement q = plan.SourceLayout()["b.q_proj"];
        TestData.Random((int)q.Bytes, seed + 1).CopyTo(changed, q.Offset);
        Outcome third = RunAll(plan, changed, [.. second.Regions.Select((r, i) => i < sources ? changed : r)], second.Reports);
        Assert.All(third.Failures, f => Assert.Null(f));
        AssertHolds(plan, changed, third, seed);
        int holding = plan.Transfers.Sum(t => t.Buckets.Buckets.Count(b => b.Pieces.Any(p => p.Tensor.StartsWith("b.q_proj", StringComparison.Ordinal))) * t.Destinations.Count);
        Assert.Equal(holding, third.Reports.Take(sources).Sum(r => r!.Buckets));
    }

    [Fact]
    public void A_bucket_spoiled_on_the_way_is_sent_again_alone_and_one_that_stays_spoiled_fails_the_run_naming_it()
    {
        int seed = TestData.NewSeed();
        TransferPlan plan = TransferPlan.Create(new ModelLayout("mixed", TransferPlanTests.MixedTensors), 1, 2, bucketBytes: 1024);
        byte[] model = TestData.Random((int)plan.SourceLayout().Length, seed);

        Outcome once = RunAll(plan, model, faults: (rank, c) => { if (rank == 2) c.CorruptReceives(1); });
        Assert.All(once.Failures, f => Assert.Null(f));
        Assert.Equal(1, once.Reports[2]!.Resent);
        Assert.Equal(1, once.Reports[0]!.Resent);
        AssertHolds(plan, model, once, seed);

        Outcome always = RunAll(plan, model, faults: (rank, c) => { if (rank == 1) c.CorruptReceives(1000); });
        Assert.Contains("still arrives wrong after 2 re-send(s)", Assert.IsType<InvalidDataException>(always.Failures[1]).Message);
        Assert.Contains("still arrives wrong at destination 0 (rank 1)", Assert.IsType<InvalidDataException>(always.Failures[0]).Message);
    }

    [Fact]
    public void A_rank_that_stalls_ends_the_run_within_the_deadline_naming_it()
    {
        TransferPlan plan = TransferPlan.Create(new ModelLayout("mixed", TransferPlanTests.MixedTensors), 1, 2, bucketBytes: 1024);
        byte[] model = TestData.Random((int)plan.SourceLayout().Length, 3);
        var clock = System.Diagnostics.Stopwatch.StartNew();
        Outcome outcome = RunAll(plan, model, timeout: TimeSpan.FromSeconds(2), absent: 2);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), $"took {clock.Elapsed}");
        // The source waits for the stalled destination (rank 2) at its first bucket for it, and gives up at the deadline naming it.
        var failure = Assert.IsType<CollectiveException>(outcome.Failures[0]);
        Assert.Equal(2, failure.Peer);
        Assert.Contains("rank 2", failure.Message);
        // The other destination either finished before the source reached rank 2 (then it holds its parts) or was cut off.
        if (outcome.Failures[1] is null)
        {
            RegionLayout source = plan.SourceLayout(), layout = plan.DestinationLayout(0);
            foreach (LayoutTensor t in plan.Layout.Tensors)
                Assert.True(TransferPlanTests.Expected(t, model.AsSpan((int)source[t.Name].Offset, (int)t.Bytes).ToArray(), 0, 2)
                    .AsSpan().SequenceEqual(outcome.Regions[1].AsSpan((int)layout[t.Name].Offset, (int)layout[t.Name].Bytes)), t.Name);
        }
    }

    [Theory]
    [InlineData(1, 1)]
    [InlineData(1, 2)]
    [InlineData(2, 2)]
    public void Ranks_in_separate_processes_end_with_exactly_their_parts(int sources, int destinations)
    {
        int seed = TestData.NewSeed();
        TransferPlan plan = PlanPeer.Plan(sources, destinations);
        string id = HostCollective.CreateId();
        string folder = Directory.CreateTempSubdirectory("nccl-swap-plan-").FullName;
        var peers = new List<PeerProcess>();
        try
        {
            for (int rank = 0; rank < sources + destinations; rank++)
                peers.Add(PlanPeer.Start(id, rank, sources, destinations, seed, Path.Combine(folder, $"rank{rank}")));
            foreach (PeerProcess peer in peers)
                Assert.True(peer.WaitForExit(Generous) == 0, peer.ToString());
            byte[][] regions = Enumerable.Range(0, sources + destinations).Select(r => File.ReadAllBytes(Path.Combine(folder, $"rank{r}"))).ToArray();
            AssertHolds(plan, PlanPeer.Model(plan, seed), new Outcome(regions, [], []), seed);
        }
        finally
        {
            peers.ForEach(p => p.Dispose());
            Directory.Delete(folder, recursive: true);
        }
    }

    [Fact]
    public void A_destination_killed_mid_transfer_ends_the_run_at_its_source_naming_it()
    {
        int seed = TestData.NewSeed();
        string id = HostCollective.CreateId();
        string folder = Directory.CreateTempSubdirectory("nccl-swap-plan-").FullName;
        var peers = new List<PeerProcess>();
        try
        {
            for (int rank = 0; rank < 3; rank++)
                peers.Add(PlanPeer.Start(id, rank, 1, 2, seed, Path.Combine(folder, $"rank{rank}"), slow: rank == 2));
            peers[2].WaitForLine("received 2", Generous); // destination 1 is in the middle of its buckets
            using (var kill = System.Diagnostics.Process.Start("kill", ["-KILL", $"{peers[2].Process.Id}"]))
                kill.WaitForExit();
            var clock = System.Diagnostics.Stopwatch.StartNew();
            Assert.Equal(3, peers[0].WaitForExit(Generous));
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"the source took {clock.Elapsed} to give up");
            Assert.Contains("rank 2", peers[0].WaitForLine("failed: ", Generous));
        }
        finally
        {
            peers.ForEach(p => p.Dispose());
            Directory.Delete(folder, recursive: true);
        }
    }
}

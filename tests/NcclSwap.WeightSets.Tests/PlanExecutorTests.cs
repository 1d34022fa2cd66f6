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
        string id = HostCollective.CreateId();
        Exception?[] failures = Threads.Run(size, RunRank);
        return new Outcome(regions, reports, failures);

        void RunRank(int rank)
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
            using var executor = new PlanExecutor(plan, backend, collective);
            reports[rank] = executor.Run(region, previous?[rank]);
            backend.Download(region, 0, regions[rank] = new byte[regions[rank].Length]);
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
        // Every rank learns which delivery stays wrong, and says so naming the destination.
        for (int rank = 0; rank < 3; rank++)
            Assert.Contains("still arrives wrong at destination 0 (rank 1) after 2 re-send(s)", Assert.IsType<InvalidDataException>(always.Failures[rank]).Message);
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

    /// <summary>Runs a plan whose source 0 shares rank 0 with destination 0: rank r holds destination r.</summary>
    private static (byte[][] Held, TransferReport[] Reports) RunShared(TransferPlan plan, byte[] model, byte[][] held, TransferReport[]? previous, bool skip = true, bool inPlace = true)
    {
        int size = plan.Destinations;
        var ranks = new PlanRanks([0], Enumerable.Range(0, size).ToArray());
        var reports = new TransferReport[size];
        string id = HostCollective.CreateId();
        Exception?[] failures = Threads.Run(size, rank =>
        {
            using var backend = new HostBackend();
            using ICollective collective = backend.JoinCollective(id, rank, size, Generous);
            using IDeviceBuffer? source = rank == 0 ? backend.Allocate(model.Length) : null;
            using IDeviceBuffer destination = backend.Allocate(held[rank].Length);
            if (source is not null)
                backend.Upload(model, source);
            backend.Upload(held[rank], destination);
            using var executor = new PlanExecutor(plan, backend, collective, ranks) { SkipUnchanged = skip, InPlace = inPlace };
            reports[rank] = executor.Run(source, destination, previous?[rank]);
            backend.Download(destination, 0, held[rank] = new byte[held[rank].Length]);
        });
        Assert.All(failures, f => Assert.Null(f));
        return (held, reports);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    public void A_source_that_is_also_a_destination_gets_its_parts_through_the_collective(int destinations)
    {
        // One rank: the source sends to itself (a send and a receive in one group). Two or four: rank 0 is the root of
        // broadcasts it also receives, and unpacks what it sent.
        int seed = TestData.NewSeed();
        TransferPlan plan = TransferPlan.Create(new ModelLayout("mixed", TransferPlanTests.MixedTensors), 1, destinations, bucketBytes: 1024);
        byte[] model = TestData.Random((int)plan.SourceLayout().Length, seed);
        byte[][] start = Enumerable.Range(0, destinations).Select(d => TestData.Random((int)plan.DestinationLayout(d).Length, seed + 1 + d)).ToArray();

        var (held, reports) = RunShared(plan, model, start, null);
        AssertHolds(plan, model, new Outcome([model, .. held], [], []), seed);
        Assert.Equal(plan.Transfers.Sum(t => t.Buckets.Buckets.Count * t.Destinations.Count), reports[0].Buckets);

        var (again, second) = RunShared(plan, model, held, reports);
        Assert.All(second, r => Assert.Equal(0, r.Buckets));
        AssertHolds(plan, model, new Outcome([model, .. again], [], []), seed);
    }

    [Fact]
    public void One_destinations_share_of_a_plan_runs_on_one_rank_with_the_same_buckets()
    {
        // Destination 2 of 4 on its own (a single-GPU run of one tensor-parallel rank): it receives the bytes, in the
        // buckets, that it receives in the whole plan, and ends with exactly its parts.
        int seed = TestData.NewSeed();
        TransferPlan whole = TransferPlan.Create(new ModelLayout("mixed", TransferPlanTests.MixedTensors), 1, 4, bucketBytes: 1024);
        TransferPlan share = whole.ForDestination(2);
        Assert.Equal(1, share.Destinations);
        Assert.Equal(whole.ReceivedBytes()[2], share.ReceivedBytes()[0]);
        Assert.Equal(whole.DestinationLayout(2).Length, share.DestinationLayout(0).Length);
        Assert.All(share.Transfers, t => Assert.False(t.IsBroadcast));

        byte[] model = TestData.Random((int)share.SourceLayout().Length, seed);
        var (held, reports) = RunShared(share, model, [TestData.Random((int)share.DestinationLayout(0).Length, seed + 1)], null);
        RegionLayout source = share.SourceLayout(), layout = share.DestinationLayout(0);
        foreach (LayoutTensor t in share.Layout.Tensors)
            Assert.True(TransferPlanTests.Expected(t, model.AsSpan((int)source[t.Name].Offset, (int)t.Bytes).ToArray(), 2, 4)
                .AsSpan().SequenceEqual(held[0].AsSpan((int)layout[t.Name].Offset, (int)layout[t.Name].Bytes)), $"{t.Name} (seed {seed})");
        Assert.Equal(whole.ReceivedBytes()[2], reports[0].Bytes);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    public void Buckets_sent_and_received_in_place_land_exactly_as_staged_ones(int destinations)
    {
        // Whole tensors that lie in a region as they lie in the bucket go from and to the regions themselves; cut ones
        // go through staging. Both ways give every destination exactly its parts.
        int seed = TestData.NewSeed();
        TransferPlan plan = TransferPlan.Create(new ModelLayout("mixed", TransferPlanTests.MixedTensors), 1, destinations, bucketBytes: 1024);
        byte[] model = TestData.Random((int)plan.SourceLayout().Length, seed);
        byte[][] start = Enumerable.Range(0, destinations).Select(d => TestData.Random((int)plan.DestinationLayout(d).Length, seed + 1 + d)).ToArray();
        var (inPlace, placed) = RunShared(plan, model, start.Select(b => (byte[])b.Clone()).ToArray(), null, inPlace: true);
        var (staged, copied) = RunShared(plan, model, start.Select(b => (byte[])b.Clone()).ToArray(), null, inPlace: false);
        AssertHolds(plan, model, new Outcome([model, .. inPlace], [], []), seed);
        AssertHolds(plan, model, new Outcome([model, .. staged], [], []), seed);
        Assert.All(copied, r => Assert.Equal(0, r.InPlace));
        Assert.All(placed, r => Assert.True(r.InPlace > 0, $"rank {r.Rank}: nothing in place"));
        // Rank 0 sends every bucket and receives destination 0's: with one destination every tensor is whole, so all of
        // them go in place both ways; with several, the cut ones are packed through staging.
        int sent = plan.Transfers.Sum(t => t.Buckets.Buckets.Count), received = plan.Transfers.Where(t => t.Destinations.Contains(0)).Sum(t => t.Buckets.Buckets.Count);
        if (destinations == 1)
            Assert.Equal(sent + received, placed[0].InPlace);
        else
            Assert.True(placed[0].InPlace < sent + received, "every bucket in place: the staged path was not taken");
    }

    [Fact]
    public void Without_the_search_for_unchanged_buckets_every_bucket_moves_every_run()
    {
        int seed = TestData.NewSeed();
        TransferPlan plan = TransferPlan.Create(new ModelLayout("mixed", TransferPlanTests.MixedTensors), 1, 2, bucketBytes: 1024);
        byte[] model = TestData.Random((int)plan.SourceLayout().Length, seed);
        byte[][] start = Enumerable.Range(0, 2).Select(d => TestData.Random((int)plan.DestinationLayout(d).Length, seed + 1 + d)).ToArray();
        var (held, first) = RunShared(plan, model, start, null, skip: false);
        Assert.Null(first[0].Tensors);
        var (again, second) = RunShared(plan, model, held, first, skip: false);
        int all = plan.Transfers.Sum(t => t.Buckets.Buckets.Count * t.Destinations.Count);
        Assert.Equal(all, second[0].Buckets);
        Assert.Equal(0, second[0].Skipped);
        AssertHolds(plan, model, new Outcome([model, .. again], [], []), seed);
    }

    [Fact]
    public void A_destination_whose_bytes_differ_from_what_it_was_sent_gets_exactly_those_buckets_again()
    {
        // The source changed nothing, but destination 1's copy of one tensor was overwritten since (a failed run, a
        // stray write): skipping trusts the bytes a destination holds, not what it was told last time.
        int seed = TestData.NewSeed();
        TransferPlan plan = TransferPlan.Create(new ModelLayout("mixed", TransferPlanTests.MixedTensors), 1, 2, bucketBytes: 1024);
        byte[] model = TestData.Random((int)plan.SourceLayout().Length, seed);
        Outcome first = RunAll(plan, model);
        Assert.All(first.Failures, f => Assert.Null(f));

        TensorPlacement o = plan.DestinationLayout(1)["c.o_proj"];
        byte[][] regions = first.Regions.Select(r => (byte[])r.Clone()).ToArray();
        TestData.Random((int)o.Bytes, seed + 7).CopyTo(regions[2], o.Offset);
        Outcome second = RunAll(plan, model, regions, first.Reports);
        Assert.All(second.Failures, f => Assert.Null(f));
        AssertHolds(plan, model, second, seed);
        int holding = plan.Transfers.Where(t => t.Destinations.Contains(1))
            .Sum(t => t.Buckets.Buckets.Count(b => b.Pieces.Any(p => t.ByKey[p.Tensor].Tensor == "c.o_proj")));
        Assert.True(holding > 0);
        Assert.Equal(holding, second.Reports[2]!.Buckets);
        Assert.Equal(0, second.Reports[1]!.Buckets);
    }

    [Fact]
    public void A_rank_with_another_plan_is_named_and_nothing_moves()
    {
        ModelLayout layout = new("mixed", TransferPlanTests.MixedTensors);
        TransferPlan plan = TransferPlan.Create(layout, 1, 1, bucketBytes: 1024), other = TransferPlan.Create(layout, 1, 1, bucketBytes: 2048);
        byte[] model = TestData.Random((int)plan.SourceLayout().Length, 5);
        byte[] start = TestData.Random((int)plan.DestinationLayout(0).Length, 6);
        string id = HostCollective.CreateId();
        byte[] after = [];
        Exception?[] failures = Threads.Run(2, rank =>
        {
            using var backend = new HostBackend();
            using ICollective collective = backend.JoinCollective(id, rank, 2, Generous);
            byte[] bytes = rank == 0 ? model : start;
            using IDeviceBuffer region = backend.Allocate(bytes.Length);
            backend.Upload(bytes, region);
            try
            {
                using var executor = new PlanExecutor(rank == 0 ? plan : other, backend, collective);
                executor.Run(region);
            }
            finally
            {
                if (rank == 1)
                    backend.Download(region, 0, after = new byte[bytes.Length]);
            }
        });
        Assert.Contains("rank 1 runs another transfer plan", Assert.IsType<InvalidOperationException>(failures[0]).Message);
        Assert.Contains("rank 0 runs another transfer plan", Assert.IsType<InvalidOperationException>(failures[1]).Message);
        Assert.Equal(start, after);
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

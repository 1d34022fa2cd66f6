using NcclSwap.DataPlane;
using NcclSwap.Testing;

namespace NcclSwap.WeightSets.Tests;

/// <summary>Swap groups formed from configuration, on the host backend: members as threads or as separate processes.</summary>
public class SwapGroupTests
{
    private static readonly TimeSpan Generous = TimeSpan.FromSeconds(60);

    /// <summary>alpha drives one device, beta two, gamma one: ranks 0 | 1, 2 | 3.</summary>
    private static string WriteConfig(string folder, double timeoutSeconds, string name = "job-7", string? betaDevices = null)
    {
        string path = Path.Combine(folder, $"group-{Guid.NewGuid():n}.json");
        File.WriteAllText(path, $$"""
            {"format": "nccl-swap-group/1", "name": "{{name}}", "root": "127.0.0.1:{{Ports.Free()}}", "timeout_seconds": {{timeoutSeconds}},
             "members": [{"host": "alpha", "devices": [0]}, {"host": "beta", "devices": {{betaDevices ?? "[0, 1]"}}}, {"host": "gamma", "devices": [3]}]}
            """);
        return path;
    }

    private static void AssertHolds(TransferPlan plan, byte[] model, string folder, int seed)
    {
        RegionLayout source = plan.SourceLayout();
        for (int d = 0; d < plan.Destinations; d++)
        {
            byte[] held = File.ReadAllBytes(Path.Combine(folder, $"rank{plan.Sources + d}"));
            RegionLayout layout = plan.DestinationLayout(d);
            foreach (LayoutTensor t in plan.Layout.Tensors)
                Assert.True(TransferPlanTests.Expected(t, model.AsSpan((int)source[t.Name].Offset, (int)t.Bytes).ToArray(), d, plan.Destinations)
                    .AsSpan().SequenceEqual(held.AsSpan((int)layout[t.Name].Offset, (int)layout[t.Name].Bytes)), $"destination {d}: {t.Name} (seed {seed})");
        }
    }

    [Fact]
    public void Three_members_in_separate_processes_form_a_group_of_four_ranks_and_every_destination_ends_with_its_parts()
    {
        int seed = TestData.NewSeed();
        string folder = Directory.CreateTempSubdirectory("nccl-swap-group-").FullName;
        var peers = new List<PeerProcess>();
        try
        {
            string config = WriteConfig(folder, 60);
            // Started in reverse, so members report before the root listens: they wait for it.
            DeliverAll(peers, config, seed, folder, [2, 1, 0]);
        }
        finally
        {
            peers.ForEach(p => p.Dispose());
            Directory.Delete(folder, recursive: true);
        }
    }

    [Fact]
    public void Three_processes_driving_nine_ranks_deliver_eight_tensor_parallel_destinations_their_parts()
    {
        // One source and TP8: a trainer process with one rank, two engine processes with four ranks each (an agent
        // that drives several GPUs, a thread per rank).
        int seed = TestData.NewSeed();
        string folder = Directory.CreateTempSubdirectory("nccl-swap-group-").FullName;
        var peers = new List<PeerProcess>();
        try
        {
            string config = Path.Combine(folder, "group.json");
            File.WriteAllText(config, $$"""
                {"format": "nccl-swap-group/1", "name": "tp8", "root": "127.0.0.1:{{Ports.Free()}}", "timeout_seconds": 60,
                 "members": [{"host": "trainer", "devices": [0]}, {"host": "engine-a", "devices": [0, 1, 2, 3]}, {"host": "engine-b", "devices": [4, 5, 6, 7]}]}
                """);
            for (int member = 0; member < 3; member++)
                peers.Add(GroupPeer.Start(config, member, 1, 8, seed, folder));
            foreach (PeerProcess peer in peers)
                Assert.True(peer.WaitForExit(Generous) == 0, peer.ToString());
            TransferPlan plan = PlanPeer.Plan(1, 8);
            AssertHolds(plan, PlanPeer.Model(plan, seed), folder, seed);
        }
        finally
        {
            peers.ForEach(p => p.Dispose());
            Directory.Delete(folder, recursive: true);
        }
    }

    [Fact]
    public void A_member_that_never_reports_is_named_with_its_host_and_ranks_at_the_deadline()
    {
        string folder = Directory.CreateTempSubdirectory("nccl-swap-group-").FullName;
        try
        {
            SwapGroupConfig config = SwapGroupConfig.Load(WriteConfig(folder, 3));
            var clock = System.Diagnostics.Stopwatch.StartNew();
            Exception?[] failures = Threads.Run(2, m => SwapGroup.Form(config, m, _ => new HostBackend()).Dispose());
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"took {clock.Elapsed}");
            foreach (Exception? failure in failures)
                Assert.Contains("member 2 (gamma, ranks 3..3) did not report within 3 s", Assert.IsType<CollectiveException>(failure).Message);
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    [Fact]
    public void A_member_whose_devices_or_group_differ_from_the_configuration_is_refused_with_the_reason()
    {
        string folder = Directory.CreateTempSubdirectory("nccl-swap-group-").FullName;
        try
        {
            string path = WriteConfig(folder, 3);
            SwapGroupConfig config = SwapGroupConfig.Load(path);
            var other = new SwapGroupConfig(config.Name, config.Root, [config.Members[0], new SwapGroupMember("beta", [0]), config.Members[2]], config.Timeout);
            var renamed = new SwapGroupConfig("job-8", config.Root, config.Members, config.Timeout);
            SwapGroupConfig[] configs = [config, other, renamed];
            Exception?[] failures = Threads.Run(3, m =>
            {
                if (m > 0)
                    Thread.Sleep(300); // the root listens first, so that these two are answered, not left to time out
                SwapGroup.Form(configs[m], m, _ => new HostBackend()).Dispose();
            });
            Assert.Contains("member 1 (beta;", Assert.IsType<CollectiveException>(failures[1]).Message);
            Assert.Contains("drives devices [0]; the configuration says [0, 1]", failures[1]!.Message);
            Assert.Contains("reports for group 'job-8', this is 'job-7'", Assert.IsType<CollectiveException>(failures[2]).Message);
            Assert.Contains("did not report within 3 s", Assert.IsType<CollectiveException>(failures[0]).Message);
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    /// <summary>Starts the three members in <paramref name="order"/>; every one exits 0 and every destination holds its parts.</summary>
    private static void DeliverAll(List<PeerProcess> peers, string config, int seed, string folder, int[] order)
    {
        foreach (int member in order)
            peers.Add(GroupPeer.Start(config, member, 2, 2, seed, folder));
        foreach (PeerProcess peer in peers)
            Assert.True(peer.WaitForExit(Generous) == 0, peer.ToString());
        AssertHolds(PlanPeer.Plan(2, 2), PlanPeer.Model(PlanPeer.Plan(2, 2), seed), folder, seed);
    }

    /// <summary>Starts the three members (member 2 slow) and sends member 2 <paramref name="signal"/> once it has received two buckets.</summary>
    private static void SignalMidTransfer(List<PeerProcess> peers, string config, int seed, string folder, string signal)
    {
        for (int member = 0; member < 3; member++)
            peers.Add(GroupPeer.Start(config, member, 2, 2, seed, folder, slow: member == 2));
        peers[2].WaitForLine("received 2", Generous);
        using var kill = System.Diagnostics.Process.Start("kill", [signal, $"{peers[2].Process.Id}"])!;
        kill.WaitForExit();
    }

    [Fact]
    public void A_member_killed_mid_transfer_ends_the_update_naming_its_rank_and_host_and_the_group_forms_again()
    {
        int seed = TestData.NewSeed();
        string folder = Directory.CreateTempSubdirectory("nccl-swap-group-").FullName;
        var peers = new List<PeerProcess>();
        try
        {
            string config = WriteConfig(folder, 5);
            SignalMidTransfer(peers, config, seed, folder, "-KILL");
            var clock = System.Diagnostics.Stopwatch.StartNew();
            Assert.Equal(3, peers[0].WaitForExit(Generous));
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"the source took {clock.Elapsed} to give up");
            string failed = peers[0].WaitForLine("failed: ", Generous);
            Assert.Contains("swap group 'job-7', rank 0 (member 0 on alpha", failed); // a source, waiting on destination 1
            Assert.Contains("rank 3 (member 2 on gamma", failed);
            Assert.Equal(3, peers[1].WaitForExit(Generous));

            // The next update forms the group again, from the same configuration, and delivers everything.
            peers.ForEach(p => p.Dispose());
            peers.Clear();
            DeliverAll(peers, config, seed, folder, [0, 1, 2]);
        }
        finally
        {
            peers.ForEach(p => p.Dispose());
            Directory.Delete(folder, recursive: true);
        }
    }

    [Fact]
    public void A_member_stopped_mid_transfer_is_named_by_every_other_member_before_the_deadline()
    {
        int seed = TestData.NewSeed();
        string folder = Directory.CreateTempSubdirectory("nccl-swap-group-").FullName;
        var peers = new List<PeerProcess>();
        try
        {
            // A 16 s deadline: the group's watch declares a member silent after 8 s, long before a wait gives up.
            string config = WriteConfig(folder, 16);
            SignalMidTransfer(peers, config, seed, folder, "-STOP");
            var clock = System.Diagnostics.Stopwatch.StartNew();
            foreach (int member in new[] { 0, 1 })
            {
                Assert.Equal(3, peers[member].WaitForExit(Generous));
                string failed = peers[member].WaitForLine("failed: ", Generous);
                Assert.Contains("rank 3 (member 2 on gamma", failed);
                Assert.Contains("sent nothing for", failed);
            }
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(14), $"the members took {clock.Elapsed} to name the stopped one; the deadline is 16 s");
        }
        finally
        {
            peers.ForEach(p => p.Dispose());
            Directory.Delete(folder, recursive: true);
        }
    }

    [Fact]
    public void A_group_aborted_after_a_failure_refuses_work_until_it_is_formed_again()
    {
        string folder = Directory.CreateTempSubdirectory("nccl-swap-group-").FullName;
        try
        {
            SwapGroupConfig config = SwapGroupConfig.Load(WriteConfig(folder, 10));
            var groups = new SwapGroup?[3];
            Assert.All(Threads.Run(3, m => groups[m] = SwapGroup.Form(config, m, _ => new HostBackend())), f => Assert.Null(f));
            Assert.All(groups, g => Assert.NotNull(g));
            Assert.Equal([1, 2], groups[1]!.Ranks.Select(r => r.Rank));
            Assert.Equal([0, 1], groups[1]!.Ranks.Select(r => r.Device));
            Assert.Equal(4, groups[1]!.Ranks[0].Collective.Size);

            var boom = Assert.Throws<InvalidOperationException>(() => groups[1]!.RunOnEachRank<int>(r => r.Rank == 2 ? throw new InvalidOperationException("boom") : 0));
            Assert.Contains("swap group 'job-7', rank 2 (member 1 on beta", boom.Message);
            Assert.Contains("boom", boom.Message);
            Assert.True(groups[1]!.IsBroken);
            Assert.Contains("form it again", Assert.Throws<InvalidOperationException>(() => groups[1]!.RunOnEachRank(r => 0)).Message);
            foreach (SwapGroup? g in groups)
                g!.Dispose();
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    [Theory]
    [InlineData("""{"format": "nccl-swap-group/1", "name": "a", "root": "nowhere", "members": [{"host": "x", "devices": [0]}]}""", "root 'nowhere' is not ADDRESS:PORT")]
    [InlineData("""{"format": "nccl-swap-group/1", "name": "a", "root": "127.0.0.1:9", "members": [{"host": "x", "devices": [0, 0]}]}""", "member 0 (x) lists devices [0, 0]")]
    [InlineData("""{"format": "nccl-swap-group/1", "name": "a", "root": "127.0.0.1:9", "members": [{"host": "x"}]}""", "member 0 (x): 'devices' must be a list")]
    [InlineData("""{"format": "nccl-swap-group/2", "name": "a", "root": "127.0.0.1:9", "members": []}""", "format is 'nccl-swap-group/2'")]
    [InlineData("""{"format": "nccl-swap-group/1", "name": "a", "root": "127.0.0.1:9", "members": []}""", "swap group 'a' has no members")]
    public void Bad_configurations_are_refused_naming_the_file_and_field(string json, string expected)
    {
        string path = Path.Combine(Path.GetTempPath(), $"group-{Guid.NewGuid():n}.json");
        File.WriteAllText(path, json);
        try
        {
            var e = Assert.Throws<FormatException>(() => SwapGroupConfig.Load(path));
            Assert.Contains(path, e.Message);
            Assert.Contains(expected, e.Message);
        }
        finally
        {
            File.Delete(path);
        }
    }
}

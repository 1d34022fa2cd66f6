using System.Text.RegularExpressions;
using NcclSwap.ControlPlane;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.DataPlane;
using NcclSwap.Testing;
using NcclSwap.WeightSets;

namespace NcclSwap.Agent.Tests;

/// <summary><c>nccl-swap transfer</c>: three members as processes (a trainer and two engine GPUs of TP2), on the host backend.</summary>
public sealed class TransferTests : IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-transfer-").FullName;

    private const string LayoutJson = """
        {"format": "nccl-swap-layout/1", "model": "tp-test", "tensors": [
          {"name": "embed", "dtype": "BF16", "shape": [128, 64], "split": 0},
          {"name": "layers.{0..1}.norm", "dtype": "BF16", "shape": [64]},
          {"name": "layers.{0..1}.q_proj", "dtype": "BF16", "shape": [128, 64], "split": 0},
          {"name": "layers.{0..1}.o_proj", "dtype": "BF16", "shape": [64, 128], "split": 1},
          {"name": "norm", "dtype": "F32", "shape": [64]}]}
        """;

    private (string Layout, string Group, TransferPlan Plan) Files(int timeoutSeconds = 20)
    {
        string layout = Path.Combine(_folder, "layout.json");
        File.WriteAllText(layout, LayoutJson);
        int port = Ports.Free();
        string group = Path.Combine(_folder, "group.json");
        File.WriteAllText(group, $$"""
            {"format": "nccl-swap-group/1", "name": "cli", "root": "127.0.0.1:{{port}}", "timeout_seconds": {{timeoutSeconds}},
             "members": [{"host": "trainer", "devices": [0]}, {"host": "engine-0", "devices": [0]}, {"host": "engine-1", "devices": [0]}]}
            """);
        return (layout, group, TransferPlan.Create(ModelLayout.Load(layout), 1, 2, 256L << 20));
    }

    /// <summary>Destination d's share of synthetic version v.</summary>
    private static unsafe byte[] Share(TransferPlan plan, ulong version, int d)
    {
        byte[] model = new byte[plan.SourceLayout().Length];
        fixed (byte* m = model)
            SyntheticModel.Fill(version, plan.SourceLayout(), (nint)m);
        return Shares.Of(plan, model, d);
    }

    private static unsafe ulong HashOf(TransferPlan plan, byte[] share, int d)
    {
        fixed (byte* p = share)
            return SyntheticModel.Hash(plan.DestinationLayout(d), (nint)p);
    }

    [Fact]
    public void Three_members_move_two_versions_and_each_destination_holds_exactly_its_share()
    {
        var (layout, group, plan) = Files();
        var members = Enumerable.Range(0, 3).Select(m => PeerHost.Start("agent", "transfer", "--group", group, "--member", $"{m}", "--layout", layout,
            "--tp", "2", "--versions", "2", "--backend", "host")).ToList();
        try
        {
            foreach (PeerProcess member in members)
                Assert.True(member.WaitForExit(TimeSpan.FromSeconds(60)) == 0, member.ToString());
            for (int d = 0; d < 2; d++)
                for (ulong v = 1; v <= 2; v++)
                {
                    Match line = Regex.Match(members[1 + d].Output, $@"version {v}: rank {1 + d} destination {d}: holds hash ([0-9a-f]{{16}}), received ([0-9.]+) GB");
                    Assert.True(line.Success, members[1 + d].Output);
                    Assert.Equal($"{HashOf(plan, Share(plan, v, d), d):x16}", line.Groups[1].Value);
                }
            Assert.Contains("version 2: rank 0 source 0: sent", members[0].Output);
            Assert.Contains("member 1 of 'cli' joined with rank(s) 1 (host:", members[1].Output);
        }
        finally
        {
            members.ForEach(m => m.Dispose());
        }
    }

    [Fact]
    public void Destinations_publish_each_version_to_their_agent_and_its_consumers_serve_their_share()
    {
        var (layout, group, plan) = Files();
        var agents = new List<PeerProcess>();
        var consumers = new List<ConsumerClient>();
        var members = new List<PeerProcess>();
        try
        {
            string[] sockets = new string[2];
            for (int d = 0; d < 2; d++)
            {
                string home = Path.Combine(_folder, $"agent{d}");
                sockets[d] = Path.Combine(home, "agent.sock");
                agents.Add(PeerHost.StartWith("agent", new Dictionary<string, string>
                {
                    ["NCCL_SWAP_Agent__SocketPath"] = sockets[d],
                    ["NCCL_SWAP_Agent__StateDirectory"] = Path.Combine(home, "state"),
                    ["NCCL_SWAP_Agent__StagingDirectory"] = Path.Combine(home, "staging"),
                    ["NCCL_SWAP_Agent__Backend"] = "host",
                    [$"NCCL_SWAP_Agent__Roles__Users__{PeerIdentity.OfThisProcess().Uid}"] = "publisher,consumer",
                }, "serve"));
            }
            for (int d = 0; d < 2; d++)
            {
                var clock = System.Diagnostics.Stopwatch.StartNew();
                while (!File.Exists(sockets[d]) && clock.Elapsed < TimeSpan.FromSeconds(30))
                    Thread.Sleep(20);
                consumers.Add(ConsumerClient.Connect(sockets[d], "moe", plan.DestinationLayout(d), ConsumerMode.Flip));
            }
            members.Add(PeerHost.Start("agent", "transfer", "--group", group, "--member", "0", "--layout", layout, "--tp", "2", "--versions", "2", "--backend", "host"));
            for (int d = 0; d < 2; d++)
                members.Add(PeerHost.Start("agent", "transfer", "--group", group, "--member", $"{1 + d}", "--layout", layout, "--tp", "2", "--versions", "2",
                    "--backend", "host", "--agent", sockets[d], "--weight-set", "moe"));
            int[] codes = members.Select(m => m.WaitForExit(TimeSpan.FromSeconds(60))).ToArray();
            Assert.True(codes.All(c => c == 0), string.Join(Environment.NewLine, members.Select(m => m.ToString())));
            for (int d = 0; d < 2; d++)
            {
                Assert.Contains($"version 2: rank {1 + d} destination {d}: published to {sockets[d]} (ok", members[1 + d].Output);
                var clock = System.Diagnostics.Stopwatch.StartNew();
                while (consumers[d].Version != 2 && clock.Elapsed < TimeSpan.FromSeconds(30))
                {
                    consumers[d].Step();
                    Thread.Sleep(1);
                }
                Assert.Equal(2UL, consumers[d].Version);
                byte[] share = Share(plan, 2, d);
                foreach (TensorPlacement t in plan.DestinationLayout(d).Tensors)
                    Assert.True(consumers[d].Weights.Tensor(t.Name).SequenceEqual(share.AsSpan((int)t.Offset, (int)t.Bytes)), $"destination {d}: '{t.Name}'");
            }
        }
        finally
        {
            consumers.ForEach(c => c.Dispose());
            members.ForEach(m => m.Dispose());
            agents.ForEach(a => a.Dispose());
        }
    }

    [Fact]
    public void A_member_that_never_comes_fails_the_update_naming_it_and_the_others_exit_3()
    {
        var (layout, group, _) = Files(timeoutSeconds: 3);
        var members = Enumerable.Range(0, 2).Select(m => PeerHost.Start("agent", "transfer", "--group", group, "--member", $"{m}", "--layout", layout,
            "--tp", "2", "--backend", "host")).ToList();
        try
        {
            foreach (PeerProcess member in members)
            {
                Assert.Equal(3, member.WaitForExit(TimeSpan.FromSeconds(60)));
                Assert.Contains("version 1 failed: swap group 'cli', member", member.Errors);
                Assert.Contains("member 2 (engine-1, ranks 2..2) did not report within 3 s", member.Errors);
            }
        }
        finally
        {
            members.ForEach(m => m.Dispose());
        }
    }

    [Fact]
    public void A_group_whose_ranks_do_not_match_the_plan_is_refused_before_anything_starts()
    {
        var (layout, group, _) = Files();
        var output = new StringWriter();
        var error = new StringWriter();
        int code = Program.BuildCommandLine(output, error).Parse(["transfer", "--group", group, "--member", "0", "--layout", layout, "--tp", "4"])
            .Invoke(new() { Output = output, Error = error });
        Assert.Equal(2, code);
        Assert.Contains("the group 'cli' has 3 ranks; 1 source(s) and TP4 need 5", error.ToString());
    }

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}

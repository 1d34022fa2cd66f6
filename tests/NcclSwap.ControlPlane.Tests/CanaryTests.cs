using System.Text.Json;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Audit;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Tests;

/// <summary>
/// Canary rollout: a new version goes to a share of the consumers first; their reports against the others' decide,
/// by the policy, whether it is promoted to all or the canaries go back; both with their audit entries.
/// </summary>
public sealed class CanaryTests
{
    private static readonly SyntheticModel Model = SyntheticModel.Tiny;

    private static readonly CanaryPolicy Policy = new(Fraction: 0.5, MinDuration: TimeSpan.FromMilliseconds(300), MinSamples: 50,
        MaxErrorRate: 0.05, MaxP99Ratio: 1.5, MinQuality: null, MaxDuration: TimeSpan.FromSeconds(60));

    private static TestAgent Start() => TestAgent.Start(configure: (o, _) => o with
    {
        WeightSets = new Dictionary<string, WeightSetPolicy> { ["llama"] = new() { Canary = Policy } },
    });

    /// <summary>Each consumer steps and reports a batch of requests, as an engine between steps, until <paramref name="done"/>.</summary>
    private static void Serve(TestAgent agent, ConsumerClient[] consumers, Func<ConsumerClient, (double Ms, bool Error)> request, Func<bool> done, string what)
    {
        var counters = consumers.ToDictionary(c => c, _ => new ServingCounters());
        agent.WaitFor(() =>
        {
            foreach (ConsumerClient consumer in consumers)
            {
                consumer.Step();
                for (int i = 0; i < 20; i++)
                {
                    (double ms, bool error) = request(consumer);
                    counters[consumer].Served(ms, error);
                }
                Assert.Equal(Status.Ok, consumer.Report(counters[consumer]).Status);
            }
            return done();
        }, TimeSpan.FromSeconds(60), what);
    }

    [Fact]
    public async Task Canaries_reporting_errors_are_rolled_back_alone_and_healthy_canaries_are_promoted_to_all_with_the_figures_audited()
    {
        await using TestAgent agent = Start();
        RegionLayout layout = Model.Layout();
        using var flipA = ConsumerClient.Connect(agent.SocketPath, "llama", layout, ConsumerMode.Flip);
        using var copyB = ConsumerClient.Connect(agent.SocketPath, "llama", layout, ConsumerMode.CopyIn);
        using var flipC = ConsumerClient.Connect(agent.SocketPath, "llama", layout, ConsumerMode.Flip);
        using var copyD = ConsumerClient.Connect(agent.SocketPath, "llama", layout, ConsumerMode.CopyIn);
        ConsumerClient[] all = [flipA, copyB, flipC, copyD];
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", layout);
        void Publish(ulong version) => Assert.True(Served.Publish(publisher, version, wait: false).Ok);

        // Version 1: the first version goes to all (there is nothing to compare a canary with).
        Publish(1);
        Assert.Equal(UpdateResult.Activated, agent.WaitForOutcome("llama", 1).Result);
        foreach (ConsumerClient c in all)
            Served.StepUntil(agent, c, 1);

        // Version 2: half the consumers (lanes 0 and 1: A and B) take it first; they report errors.
        Publish(2);
        agent.WaitFor(() => agent.Outcome("llama", 2)?.Result == UpdateResult.Canary, TimeSpan.FromSeconds(30), "version 2 on its canaries");
        ConsumerClient[] canaries = [flipA, copyB], others = [flipC, copyD];
        foreach (ConsumerClient c in canaries)
            Served.StepUntil(agent, c, 2);
        foreach (ConsumerClient c in canaries)
            Served.AssertHolds(c, 2);
        foreach (ConsumerClient c in others)
        {
            c.Step();
            Served.AssertHolds(c, 1); // the others never see it
        }
        Assert.Equal(1UL, VersionEntry.UnpackState(agent.Core!.Table.ReadState(0)).Version);
        var random = new Random(7);
        Serve(agent, all, c => (5 + random.NextDouble() * 5, c.Version == 2 && random.NextDouble() < 0.3),
            () => agent.Outcome("llama", 2)!.IsFinal, "the policy's decision on version 2");
        UpdateOutcome rolledBack = agent.Outcome("llama", 2)!;
        Assert.Equal(UpdateResult.RolledBack, rolledBack.Result);
        Assert.Contains("error rate", rolledBack.Detail);
        // Every consumer is back on version 1, byte for byte; the active version never changed.
        foreach (ConsumerClient c in all)
            Served.StepUntil(agent, c, 1);
        foreach (ConsumerClient c in all)
            Served.AssertHolds(c, 1);
        Assert.Equal(1UL, VersionEntry.UnpackState(agent.Core.Table.ReadState(0)).Version);

        // Version 3: healthy canaries (same latency as the others, no errors) are promoted to every consumer.
        Publish(3);
        agent.WaitFor(() => agent.Outcome("llama", 3)?.Result == UpdateResult.Canary, TimeSpan.FromSeconds(30), "version 3 on its canaries");
        Serve(agent, all, _ => (5 + random.NextDouble() * 5, false), () => agent.Outcome("llama", 3)!.IsFinal, "the policy's decision on version 3");
        Assert.Equal(UpdateResult.Activated, agent.Outcome("llama", 3)!.Result);
        foreach (ConsumerClient c in all)
            Served.StepUntil(agent, c, 3);
        foreach (ConsumerClient c in all)
            Served.AssertHolds(c, 3);
        Assert.Equal(1UL, agent.Core.Table.ReadEntry(0).LastGood);

        // The audit log holds both decisions with the figures behind them.
        List<JsonElement> canary = [.. AuditLog.Read(agent.Core.Options.AuditLogPath).Where(e => e.GetProperty("action").GetString() == "canary")];
        Assert.Equal(["started", "rolled-back", "started", "promoted"], canary.Select(e => e.GetProperty("outcome").GetString()));
        Assert.Matches(@"error rate 0\.\d+ above 0\.05; after [\d.]+ s: canaries \d+ requests, \d+ errors", canary[1].GetProperty("detail").GetString());
        Assert.Contains("healthy", canary[3].GetProperty("detail").GetString());
        Assert.Contains("on 2 of 4 consumers", canary[0].GetProperty("detail").GetString());
        Assert.True(AuditLog.Verify(agent.Core.Options.AuditLogPath).Intact);
    }

    [Fact]
    public async Task A_slow_canary_is_rolled_back_on_its_p99_and_an_operator_can_promote_one_the_policy_has_not_decided()
    {
        await using TestAgent agent = Start();
        RegionLayout layout = Model.Layout();
        using var a = ConsumerClient.Connect(agent.SocketPath, "llama", layout, ConsumerMode.Flip);
        using var b = ConsumerClient.Connect(agent.SocketPath, "llama", layout, ConsumerMode.Flip);
        using var publisher = PublisherClient.Connect(agent.SocketPath, "llama", layout);
        void Publish(ulong version) => Assert.True(Served.Publish(publisher, version, wait: false).Ok);
        Publish(1);
        agent.WaitForOutcome("llama", 1);
        Publish(2);
        agent.WaitFor(() => agent.Outcome("llama", 2)?.Result == UpdateResult.Canary, TimeSpan.FromSeconds(30), "version 2 on its canary");
        Serve(agent, [a, b], c => (c.Version == 2 ? 40 : 10, false), () => agent.Outcome("llama", 2)!.IsFinal, "the decision on version 2");
        Assert.Equal(UpdateResult.RolledBack, agent.Outcome("llama", 2)!.Result);
        Assert.Contains("p99 ≤45.3 ms is above 1.5 × the others' ≤11.3 ms", agent.Outcome("llama", 2)!.Detail);

        // An operator promotes version 3 before the canary reported anything.
        Publish(3);
        agent.WaitFor(() => agent.Outcome("llama", 3)?.Result == UpdateResult.Canary, TimeSpan.FromSeconds(30), "version 3 on its canary");
        var versions = agent.Core!.Versions;
        using JsonDocument hello = JsonDocument.Parse("""{"role": "operator", "weight_set": "llama", "command": "promote"}""");
        CommandReply reply = versions.Run(PeerIdentity.OfThisProcess(), "llama", hello.RootElement);
        Assert.True(reply.Ok, reply.Message);
        Assert.Equal(UpdateResult.Activated, agent.Outcome("llama", 3)!.Result);
        foreach (ConsumerClient c in new[] { a, b })
            Served.StepUntil(agent, c, 3);
        Assert.Contains("by the operator", agent.Outcome("llama", 3)!.Detail);
        Assert.False(versions.Run(PeerIdentity.OfThisProcess(), "llama", hello.RootElement).Ok); // nothing to promote now
    }
}

using System.Text.RegularExpressions;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.Testing;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Tests;

/// <summary>The version life cycle with a publisher and consumers in processes of their own, on the host backend.</summary>
public sealed partial class LifecycleTests
{
    private static readonly SyntheticModel Model = SyntheticModel.Tiny;

    private static List<ulong> Switches(PeerProcess consumer) =>
        SwitchPattern().Matches(consumer.Output).Select(m => ulong.Parse(m.Groups[1].Value)).ToList();

    private static string Summary(PeerProcess consumer) => consumer.WaitForLine("summary ", TimeSpan.FromSeconds(30));

    private static string Stop(PeerProcess consumer)
    {
        consumer.Process.StandardInput.WriteLine("stop");
        string summary = Summary(consumer);
        Assert.True(consumer.WaitForExit(TimeSpan.FromSeconds(30)) == 0, $"{consumer}");
        return summary;
    }

    [Fact]
    public async Task A_thousand_back_to_back_versions_reach_every_consumer_untorn_and_every_acknowledgement_is_counted()
    {
        const ulong last = 1000;
        await using TestAgent agent = TestAgent.Start(UpdatePolicy.Queue);
        using PeerProcess flip = agent.Consumer("llama", Model, ConsumerMode.Flip, until: last);
        using PeerProcess copyIn = agent.Consumer("llama", Model, ConsumerMode.CopyIn, until: last);
        using PeerProcess publisher = agent.Publisher("llama", Model, 1, last, wait: false, paceMilliseconds: 0);

        Assert.Equal(0, publisher.WaitForExit(TimeSpan.FromMinutes(5)));
        flip.WaitForLine("reached", TimeSpan.FromMinutes(2));
        copyIn.WaitForLine("reached", TimeSpan.FromMinutes(2));

        // Every version was activated, in order, and the flip consumer acknowledged each one.
        IReadOnlyList<UpdateOutcome> history = agent.Core!.Versions.History("llama");
        Assert.Equal(Enumerable.Range(1, (int)last).Select(v => (ulong)v), history.Select(o => o.Version));
        Assert.All(history, o => Assert.Equal(UpdateResult.Activated, o.Result));
        Assert.Equal(Enumerable.Range(1, (int)last).Select(v => (ulong)v), Switches(flip));
        long Acknowledged() => agent.Core.Versions.Consumers("llama").Single(c => c.Mode == ConsumerMode.Flip).Acknowledgements;
        agent.WaitFor(() => Acknowledged() >= (long)last, TimeSpan.FromSeconds(10), "the last acknowledgement"); // it follows the switch by a moment
        Assert.Equal((long)last, Acknowledged());
        Assert.Equal(2, agent.Core.Versions.Consumers("llama").Count);
        Assert.Equal(VersionEntry.PackState(last, (int)((last - 1) % 2)), agent.Core.Table.ReadState(0));

        // The copy-in consumer took versions at its own pace, always newer, ending on the last.
        List<ulong> taken = Switches(copyIn);
        Assert.Equal(taken.Order(), taken);
        Assert.Equal(taken.Distinct(), taken);
        Assert.Equal(last, taken[^1]);

        string flipSummary = Stop(flip), copySummary = Stop(copyIn);
        Assert.Contains("torn=0", flipSummary);
        Assert.Contains("torn=0", copySummary);
        Assert.Contains($"switches={last}", flipSummary);
        Assert.DoesNotContain("torn ", flip.Output + copyIn.Output);
    }

    [GeneratedRegex(@"^switch (\d+) ", RegexOptions.Multiline)]
    private static partial Regex SwitchPattern();
}

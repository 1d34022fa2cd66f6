using System.Text.RegularExpressions;
using NcclSwap.Agent.Demo;

namespace NcclSwap.Agent.Tests;

/// <summary>Demo runs in this process share its staging folder (named after the pid): they run one at a time.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class DemoRuns
{
    public const string Name = "demo runs";
}

[Collection(DemoRuns.Name)]
public sealed partial class DemoTests : IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-demo-test-").FullName;

    public DemoTests() => SelfProcess.Prefix = ["--peer", "agent"]; // this test executable runs the demo's peers as the agent would

    [Fact]
    public void The_demo_publishes_to_two_consumer_processes_rolls_back_and_reports_every_version_verified_and_untorn()
    {
        var output = new StringWriter();
        var error = new StringWriter();
        string state = Path.Combine(_folder, "state");
        int code = Program.BuildCommandLine(output, error).Parse(["demo", "--state-dir", state, "--model", "tiny", "--versions", "5", "--backend", "host"]).Invoke(new() { Output = output, Error = error });
        string text = output.ToString();
        Assert.True(code == 0, $"exit {code}: {text} {error}");
        Assert.Contains("host: CPU memory", text);
        for (int version = 1; version <= 5; version++)
            Assert.Matches(new Regex($@"^{version} +0\.2 MB .* activated\s*$", RegexOptions.Multiline), text);
        Assert.Matches(new Regex(@"^rollback to 4 .* activated\s*$", RegexOptions.Multiline), text);
        // The canary act: 6 fails on its canary (A) and is rolled back from A alone; 7 is promoted to both.
        Assert.Matches(new Regex(@"^6 +0\.2 MB .* rolledback \(rolled back from its canaries: error rate [\d.]+ above 0\.05", RegexOptions.Multiline), text);
        Assert.Matches(new Regex(@"^7 +0\.2 MB .* activated \(promoted from 1 canaries: healthy", RegexOptions.Multiline), text);
        Assert.Matches(new Regex(@"^consumer A \(flip\): served versions 1 → 2 → 3 → 4 → 5 → 4 → 6 → 4 → 7; \d+ reads of all its weights, 0 torn; exit 0", RegexOptions.Multiline), text);
        Assert.Matches(new Regex(@"^consumer B \(copy-in\): served versions [\d →]+ → 4 → 7; \d+ reads of all its weights, 0 torn; exit 0", RegexOptions.Multiline), text);
        Assert.DoesNotMatch(new Regex(@"^consumer B .*→ 6", RegexOptions.Multiline), text);
        Assert.Contains("no read was torn", text);
        Assert.Contains($"state and log kept in {state}", text);

        // What the demo leaves: the agent's persisted state (rolled back to 4, nothing to roll back to) and its log.
        var saved = new NcclSwap.ControlPlane.State.StateStore(Path.Combine(state, "state.json")).Load();
        var set = Assert.Single(saved.WeightSets);
        Assert.Equal(7UL, set.Active!.Version);
        Assert.Equal(4UL, set.LastGood);
        Assert.Equal(7UL, set.HighestPublished);
        Assert.Contains("llama-demo rollback to version 4: activated", File.ReadAllText(Path.Combine(state, "agent.log")));
    }

    [Fact]
    public void Bad_demo_options_exit_2_with_the_reason()
    {
        var output = new StringWriter();
        var error = new StringWriter();
        int code = Program.BuildCommandLine(output, error).Parse(["demo", "--versions", "1"]).Invoke(new() { Output = output, Error = error });
        Assert.Equal(2, code);
        Assert.Contains("--versions 1: publish 2 to 10000 versions", error.ToString());
        code = Program.BuildCommandLine(output, error).Parse(["demo", "--model", "2:64"]).Invoke(new() { Output = output, Error = error });
        Assert.Equal(2, code);
        Assert.Contains("'2:64' is not layers:hidden:intermediate:vocabulary:heads:kv-heads", error.ToString());
    }

    public void Dispose()
    {
        SelfProcess.Prefix = [];
        Directory.Delete(_folder, recursive: true);
    }
}

using System.Diagnostics;
using System.Text.Json;
using System.Text.RegularExpressions;
using NcclSwap.ControlPlane;
using NcclSwap.ControlPlane.Audit;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.Testing;
using NcclSwap.WeightSets;

namespace NcclSwap.Agent.Tests;

/// <summary>
/// The operator's command line against a served agent: its verbs and exit codes, the socket's group, per-weight-set
/// publishers, a client of another uid refused (and audited), and the Prometheus endpoint.
/// </summary>
public sealed partial class OperatorTests : IDisposable
{
    private const uint OtherUid = 4242, OtherGid = 4243;
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-operator-").FullName;

    private static (int Code, string Output, string Error) Run(params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        int code = Program.BuildCommandLine(output, error).Parse(args).Invoke(new() { Output = output, Error = error });
        return (code, output.ToString(), error.ToString());
    }

    /// <summary>This test executable, copied where any user can run it, run as <see cref="OtherUid"/> with the CLI's arguments.</summary>
    private (int Code, string Output) RunAsOtherUser(params string[] args)
    {
        string copy = Path.Combine(Path.GetTempPath(), $"nccl-swap-other-user-{Environment.ProcessId}");
        if (!Directory.Exists(copy))
        {
            Directory.CreateDirectory(copy);
            foreach (string file in Directory.EnumerateFiles(AppContext.BaseDirectory, "*", SearchOption.AllDirectories))
            {
                string to = Path.Combine(copy, Path.GetRelativePath(AppContext.BaseDirectory, file));
                Directory.CreateDirectory(Path.GetDirectoryName(to)!);
                File.Copy(file, to);
            }
            foreach (string entry in Directory.EnumerateFileSystemEntries(copy, "*", SearchOption.AllDirectories).Append(copy))
                File.SetUnixFileMode(entry, (UnixFileMode)0b111_101_101);
        }
        var start = new ProcessStartInfo("setpriv", [$"--reuid={OtherUid}", $"--regid={OtherGid}", "--clear-groups", "--",
            Path.Combine(copy, "NcclSwap.Agent.Tests"), "--peer", "agent", .. args])
        { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        start.Environment["HOME"] = copy;
        start.Environment["DOTNET_CLI_HOME"] = copy;
        using Process process = Process.Start(start)!;
        Task<string> output = process.StandardOutput.ReadToEndAsync(), error = process.StandardError.ReadToEndAsync();
        Assert.True(process.WaitForExit(60_000), "the other user's client did not end");
        return (process.ExitCode, output.Result + error.Result);
    }

    [Fact]
    public async Task Operator_verbs_answer_with_reliable_exit_codes_other_users_are_refused_and_audited_and_metrics_are_served()
    {
        string socketPath = Path.Combine(_folder, "agent.sock");
        string state = Path.Combine(_folder, "state");
        int port = Ports.Free();
        uint me = PeerIdentity.OfThisProcess().Uid;
        Directory.CreateDirectory(_folder);
        File.SetUnixFileMode(_folder, (UnixFileMode)0b111_101_101); // the other user reaches the socket through it
        using PeerProcess agent = PeerHost.StartWith("agent", new Dictionary<string, string>
        {
            ["NCCL_SWAP_Agent__SocketPath"] = socketPath,
            ["NCCL_SWAP_Agent__StateDirectory"] = state,
            ["NCCL_SWAP_Agent__StagingDirectory"] = Path.Combine(_folder, "staging"),
            ["NCCL_SWAP_Agent__Backend"] = "host",
            ["NCCL_SWAP_Agent__SocketGroup"] = $"{OtherGid}",
            ["NCCL_SWAP_Agent__MetricsPort"] = $"{port}",
            [$"NCCL_SWAP_Agent__Roles__Users__{me}"] = "publisher,consumer,operator",
            [$"NCCL_SWAP_Agent__Roles__Users__{OtherUid}"] = "consumer",
            ["NCCL_SWAP_Agent__WeightSets__llama__Publishers__Users__0"] = $"{me}",
            ["NCCL_SWAP_Agent__WeightSets__qwen__Publishers__Users__0"] = $"{OtherUid}",
        }, "serve");
        agent.WaitForLine("info: NcclSwap.Agent.Serve.AgentService[0] metrics at", TimeSpan.FromSeconds(30)); // the last line of its start

        // The socket belongs to the configured group, 0660.
        using (Process stat = Process.Start(new ProcessStartInfo("stat", ["-c", "%g %a", socketPath]) { RedirectStandardOutput = true })!)
        {
            Assert.Equal($"{OtherGid} 660", stat.StandardOutput.ReadToEnd().Trim());
            stat.WaitForExit();
        }

        SyntheticModel model = SyntheticModel.Tiny;
        RegionLayout layout = model.Layout();
        using var consumer = ConsumerClient.Connect(socketPath, "llama", layout, ConsumerMode.Flip);
        using var publisher = PublisherClient.Connect(socketPath, "llama", layout);
        for (ulong version = 1; version <= 2; version++)
        {
            SyntheticModel.Fill(version, publisher.Tensors.Layout, publisher.Tensors.Pointer);
            Assert.True(publisher.Publish(version, wait: true).Ok);
        }
        var clock = Stopwatch.StartNew();
        while (consumer.Version != 2 && clock.Elapsed < TimeSpan.FromSeconds(30))
            consumer.Step();
        Assert.Equal(2UL, consumer.Version);

        // Only the uids named may publish a weight set: this one may not publish qwen.
        Assert.Contains($"may not publish 'qwen' (its publishers: uid {OtherUid})",
            Assert.Throws<ChannelRefusedException>(() => PublisherClient.Connect(socketPath, "qwen", layout)).Message);

        // status, human and JSON.
        var (code, output, error) = Run("status", "--socket", socketPath);
        Assert.True(code == 0, error);
        Assert.Contains("llama: active v2, last good v1", output);
        Assert.Matches(@"consumer session \d+ pid \d+ uid \d+ flip +serves v2", output);
        (code, output, _) = Run("status", "--socket", socketPath, "--json", "-w", "llama");
        Assert.Equal(0, code);
        using (JsonDocument status = JsonDocument.Parse(output))
        {
            JsonElement set = status.RootElement.GetProperty("weight_sets")[0];
            Assert.Equal(2UL, set.GetProperty("active").GetUInt64());
            Assert.Equal(2UL, set.GetProperty("consumers")[0].GetProperty("serving").GetUInt64());
        }
        // verify digests the active version again, in staging and in the consumer's slot.
        (code, output, error) = Run("verify", "-w", "llama", "--socket", socketPath);
        Assert.True(code == 0, error);
        Assert.Matches(@"version 2: 2 copies digested in [\d.]+ ms, every tensor matches the manifest", output);
        // Exit codes: 1 for what the agent cannot do, 2 for bad arguments, 3 with no agent there.
        Assert.Equal(1, Run("promote", "-w", "llama", "--socket", socketPath).Code); // no canary in flight
        Assert.Equal(1, Run("activate", "-w", "llama", "99", "--socket", socketPath).Code);
        Assert.Equal(1, Run("status", "-w", "nothing", "--socket", socketPath).Code);
        Assert.Equal(1, Run("verify", "-w", "llama", "7", "--socket", socketPath).Code);
        Assert.Equal(2, Run("pause", "-w", "llama", "--socket", socketPath, "--timeout", "0").Code);
        Assert.Equal(3, Run("status", "--socket", Path.Combine(_folder, "none.sock")).Code);
        // pause, resume; activate the last good version (a rollback).
        Assert.Equal(0, Run("pause", "-w", "llama", "--socket", socketPath).Code);
        Assert.Contains("PAUSED", Run("status", "--socket", socketPath).Output);
        Assert.Equal(0, Run("resume", "-w", "llama", "--socket", socketPath).Code);
        (code, output, error) = Run("activate", "-w", "llama", "1", "--socket", socketPath);
        Assert.True(code == 0, error);
        Assert.Contains("rollback to version 1: activated", output);
        clock.Restart();
        while (consumer.Version != 1 && clock.Elapsed < TimeSpan.FromSeconds(30))
            consumer.Step();
        Assert.Equal(1UL, consumer.Version);
        Assert.Equal(1, Run("rollback", "-w", "llama", "--socket", socketPath).Code); // no last good version left

        // A client of another uid, which may only consume, is refused the operator's verbs (exit 4).
        (code, output) = RunAsOtherUser("rollback", "-w", "llama", "--socket", socketPath);
        Assert.True(code == 4, output);
        Assert.Contains($"uid {OtherUid} gid {OtherGid}", output);
        Assert.Contains("may not act as operator", output);

        // Metrics: Prometheus text with the agent's series.
        string metrics;
        using (var http = new HttpClient())
            metrics = await http.GetStringAsync($"http://127.0.0.1:{port}/metrics", TestContext.Current.CancellationToken);
        Assert.Matches(UpdatesActivated(), metrics);
        Assert.Matches(@"(?m)^nccl_swap_active_version\{weight_set=""llama""\} 1$", metrics);
        Assert.Matches(@"(?m)^nccl_swap_phase_duration_seconds_count\{.*phase=""snapshot"".*\} 2$", metrics);
        Assert.Matches(@"(?m)^nccl_swap_rollbacks_total\{.*kind=""operator"".*\} 1$", metrics);
        Assert.Matches(@"(?m)^nccl_swap_consumer_version\{.*weight_set=""llama"".*\} 1$", metrics);
        foreach (string line in metrics.Split('\n').Where(l => l.Length > 0 && !l.StartsWith('#')))
            Assert.Matches(@"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? -?[0-9.eE+\-]+|NaN|\+Inf$", line);

        agent.Process.Kill();
        agent.WaitForExit(TimeSpan.FromSeconds(30));
        // The audit log: the other user's refusal, the operator's verbs.
        List<JsonElement> entries = [.. AuditLog.Read(Path.Combine(state, "audit.jsonl"))];
        Assert.Contains(entries, e => e.GetProperty("action").GetString() == "connect" && e.GetProperty("outcome").GetString() == "denied"
            && e.GetProperty("who").GetProperty("uid").GetUInt32() == OtherUid);
        Assert.Contains(entries, e => e.GetProperty("action").GetString() == "connect" && e.GetProperty("outcome").GetString() == "denied"
            && e.GetProperty("detail").GetString()!.Contains("may not publish 'qwen'", StringComparison.Ordinal));
        Assert.Equal(["verify", "pause", "resume", "activate"], entries.Where(e => e.GetProperty("outcome").GetString() == "done").Select(e => e.GetProperty("action").GetString()));
        Assert.Contains(entries, e => e.GetProperty("action").GetString() == "promote" && e.GetProperty("outcome").GetString() == "failed");
        Assert.True(AuditLog.Verify(Path.Combine(state, "audit.jsonl")).Intact);
    }

    [GeneratedRegex(@"(?m)^nccl_swap_updates_total\{.*result=""activated"".*\} 3$")]
    private static partial Regex UpdatesActivated();

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}

namespace NcclSwap.Agent.Tests;

[Collection(DemoRuns.Name)]
public sealed class AuditTests : IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-audit-").FullName;

    public AuditTests() => SelfProcess.Prefix = ["--peer", "agent"]; // this test executable runs the demo's peers as the agent would

    private static (int Code, string Output, string Error) Run(params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        int code = Program.BuildCommandLine(output, error).Parse(args).Invoke(new() { Output = output, Error = error });
        return (code, output.ToString(), error.ToString());
    }

    [Fact]
    public void The_demos_audit_log_verifies_shows_each_update_and_an_edited_entry_fails_verify_naming_it()
    {
        string state = Path.Combine(_folder, "state");
        var demo = Run("demo", "--state-dir", state, "--model", "tiny", "--versions", "3", "--backend", "host");
        Assert.True(demo.Code == 0, $"exit {demo.Code}: {demo.Output} {demo.Error}");
        string log = Path.Combine(state, "audit.jsonl");

        var (code, output, error) = Run("audit", "verify", "--log", log);
        Assert.True(code == 0, error);
        Assert.Matches(@"audit\.jsonl: \d+ entries, chain intact", output);

        (code, output, error) = Run("audit", "show", "--log", log);
        Assert.True(code == 0, error);
        Assert.Contains("publish llama-demo v1 requested", output);
        Assert.Contains("publish llama-demo v3 activated", output);
        Assert.Contains("rollback llama-demo", output);
        (code, output, _) = Run("audit", "show", "--log", log, "--json");
        Assert.Equal(0, code);
        Assert.All(output.Split('\n', StringSplitOptions.RemoveEmptyEntries), line => Assert.StartsWith("{\"seq\":", line));

        string[] lines = File.ReadAllLines(log);
        lines[1] = lines[1].Replace("\"outcome\":\"activated\"", "\"outcome\":\"failed\"", StringComparison.Ordinal).Replace("\"outcome\":\"requested\"", "\"outcome\":\"denied\"", StringComparison.Ordinal);
        File.WriteAllLines(log, lines);
        (code, _, error) = Run("audit", "verify", "--log", log);
        Assert.Equal(1, code);
        Assert.Contains("audit.jsonl line 2: entry 2: its hash does not match its contents (it was edited)", error);
        Assert.Contains("(1 entries before it are intact)", error);

        Assert.Equal(2, Run("audit", "verify", "--log", Path.Combine(_folder, "none.jsonl")).Code);
    }

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}

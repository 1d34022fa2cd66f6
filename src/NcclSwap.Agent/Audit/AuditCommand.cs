using System.CommandLine;
using System.Text.Json;
using NcclSwap.ControlPlane.Audit;

namespace NcclSwap.Agent.Audit;

/// <summary>
/// <c>nccl-swap audit verify [--log PATH]</c>: checks the audit log's chain (exit 0 intact, 1 with the first bad entry
/// named, 2 when there is no log); <c>nccl-swap audit show [--log PATH] [--json]</c>: its entries.
/// The default log is the agent's: <c>audit.jsonl</c> in its state directory (<c>NCCL_SWAP_Agent__StateDirectory</c>,
/// else /var/lib/nccl-swap); <c>demo --state-dir DIR</c> keeps its agent's in DIR.
/// </summary>
internal static class AuditCommand
{
    public static Command Create(TextWriter output, TextWriter error)
    {
        var verifyLog = LogOption();
        var verify = new Command("verify", "Check that no entry of the audit log was edited, removed or reordered.") { verifyLog };
        verify.SetAction(result => Verify(result.GetValue(verifyLog) ?? DefaultLog(), output, error));
        var showLog = LogOption();
        var json = new Option<bool>("--json") { Description = "One JSON object per entry, as the log holds it." };
        var show = new Command("show", "Print the audit log's entries, oldest first.") { showLog, json };
        show.SetAction(result => Show(result.GetValue(showLog) ?? DefaultLog(), result.GetValue(json), output, error));
        return new Command("audit", "Read and check the agent's tamper-evident audit log.") { verify, show };
    }

    private static Option<string?> LogOption() =>
        new("--log") { Description = "The log (default: audit.jsonl in the agent's state directory)." };

    internal static string DefaultLog() =>
        Path.Combine(Environment.GetEnvironmentVariable("NCCL_SWAP_Agent__StateDirectory") is { Length: > 0 } state ? state : "/var/lib/nccl-swap", "audit.jsonl");

    internal static int Verify(string path, TextWriter output, TextWriter error)
    {
        if (!File.Exists(path) && !File.Exists(path + ".1"))
        {
            error.WriteLine($"nccl-swap audit verify: {path}: no audit log there");
            return 2;
        }
        AuditVerification result = AuditLog.Verify(path);
        if (!result.Intact)
        {
            error.WriteLine($"nccl-swap audit verify: {result.FirstBad} ({result.Entries} entries before it are intact)");
            return 1;
        }
        output.WriteLine($"{path}: {result.Entries} entries, chain intact");
        return 0;
    }

    internal static int Show(string path, bool json, TextWriter output, TextWriter error)
    {
        if (!File.Exists(path) && !File.Exists(path + ".1"))
        {
            error.WriteLine($"nccl-swap audit show: {path}: no audit log there");
            return 2;
        }
        try
        {
            foreach (JsonElement entry in AuditLog.Read(path))
            {
                if (json)
                {
                    output.WriteLine(entry.GetRawText());
                    continue;
                }
                JsonElement who = entry.GetProperty("who");
                string version = entry.GetProperty("version").ValueKind == JsonValueKind.Number ? $" v{entry.GetProperty("version").GetUInt64()}" : "";
                string set = entry.GetProperty("weight_set").GetString() is { } name ? $" {name}" : "";
                string detail = entry.GetProperty("detail").GetString() is { } d ? $": {d}" : "";
                output.WriteLine($"{entry.GetProperty("seq").GetInt64(),6} {entry.GetProperty("time").GetString()} uid {who.GetProperty("uid").GetUInt32()} pid {who.GetProperty("pid").GetInt32()} " +
                    $"({who.GetProperty("exe").GetString() ?? "?"}) {entry.GetProperty("action").GetString()}{set}{version} {entry.GetProperty("outcome").GetString()}{detail}");
            }
        }
        catch (JsonException e)
        {
            error.WriteLine($"nccl-swap audit show: {path}: an entry is not JSON ({e.Message}); run 'nccl-swap audit verify --log {path}'");
            return 1;
        }
        return 0;
    }
}

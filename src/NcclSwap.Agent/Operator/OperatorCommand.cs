using System.CommandLine;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;

namespace NcclSwap.Agent.Operator;

/// <summary>
/// The operator's verbs against a running agent, over its socket (the peer's uid and gid decide: the operator role):
/// <c>status</c>, <c>activate</c>, <c>promote</c>, <c>rollback</c>, <c>pause</c>, <c>resume</c>, <c>verify</c>. Each
/// takes <c>--socket</c> (default: <c>NCCL_SWAP_Agent__SocketPath</c>, else /run/nccl-swap/agent.sock) and <c>--json</c>
/// (the agent's answer as it is). Exit codes: 0 done; 1 the agent refused or the action failed (no such version or
/// canary, bytes that do not match, an update that failed or timed out); 2 bad arguments; 3 no agent answers at the
/// socket; 4 the agent refused this user (the role policy).
/// </summary>
internal static class OperatorCommand
{
    public const int Done = 0, Failed = 1, Usage = 2, Unreachable = 3, Denied = 4;

    public static IEnumerable<Command> Create(TextWriter output, TextWriter error)
    {
        yield return Verb("status", "Weight sets, their versions, canaries, updates in progress and what each consumer serves.", output, error, setRequired: false);
        yield return Verb("promote", "Promote the canary version in flight to every consumer.", output, error);
        yield return Verb("rollback", "Roll the canaries back, or (with no canary in flight) return every consumer to the last good version.", output, error);
        yield return Verb("pause", "Start no new version and let a canary wait for its operator.", output, error);
        yield return Verb("resume", "Undo pause.", output, error);
        yield return Verb("activate", "Activate VERSION: the canary version (promote) or the last good one (rollback).", output, error, version: true);
        yield return Verb("verify", "Digest a staged version (default: the active one) and the consumers' copies of it again against its manifest.", output, error, version: true, versionOptional: true);
    }

    private static Command Verb(string name, string description, TextWriter output, TextWriter error, bool setRequired = true, bool version = false, bool versionOptional = false)
    {
        var set = new Option<string?>("--weight-set", "-w") { Description = setRequired ? "The weight set." : "One weight set (default: all).", Required = setRequired };
        var socket = new Option<string?>("--socket") { Description = "The agent's socket (default: NCCL_SWAP_Agent__SocketPath, else /run/nccl-swap/agent.sock)." };
        var json = new Option<bool>("--json") { Description = "Print the agent's answer as one JSON object." };
        var timeout = new Option<double>("--timeout") { Description = "Seconds to wait for the outcome.", DefaultValueFactory = _ => 60 };
        var command = new Command(name, description) { set, socket, json, timeout };
        Argument<ulong>? number = null;
        if (version)
        {
            number = new Argument<ulong>("VERSION") { Description = "The version.", Arity = versionOptional ? ArgumentArity.ZeroOrOne : ArgumentArity.ExactlyOne };
            command.Arguments.Add(number);
        }
        command.SetAction(result =>
        {
            double seconds = result.GetValue(timeout);
            if (seconds <= 0)
            {
                error.WriteLine($"nccl-swap {name}: --timeout must be above 0");
                return Usage;
            }
            return Run(name, result.GetValue(set) ?? "*", number is null ? 0 : result.GetValue(number), result.GetValue(socket) ?? DefaultSocket(),
                seconds, result.GetValue(json), output, error);
        });
        return command;
    }

    internal static string DefaultSocket() =>
        Environment.GetEnvironmentVariable("NCCL_SWAP_Agent__SocketPath") is { Length: > 0 } path ? path : "/run/nccl-swap/agent.sock";

    internal static int Run(string verb, string weightSet, ulong version, string socketPath, double timeoutSeconds, bool json, TextWriter output, TextWriter error)
    {
        var hello = new MemoryStream();
        using (var writer = new Utf8JsonWriter(hello))
        {
            writer.WriteStartObject();
            writer.WriteString("role", "operator");
            writer.WriteString("weight_set", weightSet);
            writer.WriteString("command", verb);
            if (version != 0)
                writer.WriteNumber("version", version);
            writer.WriteNumber("timeout_seconds", timeoutSeconds);
            writer.WriteEndObject();
        }
        string line;
        try
        {
            line = Exchange(socketPath, [.. hello.ToArray(), (byte)'\n'], TimeSpan.FromSeconds(timeoutSeconds + 10));
        }
        catch (Exception e) when (e is SocketException or IOException)
        {
            error.WriteLine($"nccl-swap {verb}: no agent answers at {socketPath}: {e.Message}");
            return Unreachable;
        }
        using JsonDocument reply = JsonDocument.Parse(line);
        JsonElement root = reply.RootElement;
        bool ok = root.GetProperty("ok").GetBoolean();
        if (json)
            output.WriteLine(root.GetRawText());
        if (!ok)
        {
            string why = root.GetProperty("error").GetString() ?? "";
            if (!root.TryGetProperty("code", out JsonElement code))
            {
                error.WriteLine($"nccl-swap {verb}: the agent refused: {why}");
                return Denied;
            }
            error.WriteLine($"nccl-swap {verb}: {why}");
            return code.GetString() == "invalid" ? Usage : Failed;
        }
        if (!json)
        {
            if (root.TryGetProperty("weight_sets", out JsonElement sets))
                PrintStatus(sets, output);
            else
                output.WriteLine(root.GetProperty("message").GetString());
        }
        return Done;
    }

    private static string Exchange(string socketPath, byte[] hello, TimeSpan timeout)
    {
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        socket.Connect(new UnixDomainSocketEndPoint(socketPath));
        socket.ReceiveTimeout = (int)Math.Min(int.MaxValue, timeout.TotalMilliseconds);
        socket.Send(hello);
        var received = new MemoryStream();
        byte[] buffer = new byte[64 << 10];
        while (true)
        {
            int read = socket.Receive(buffer);
            if (read == 0)
                break;
            received.Write(buffer, 0, read);
            if (Array.IndexOf(buffer, (byte)'\n', 0, read) >= 0)
                break;
        }
        string text = Encoding.UTF8.GetString(received.ToArray()).Trim();
        return text.Length > 0 ? text : throw new IOException("the agent closed the connection without an answer");
    }

    private static void PrintStatus(JsonElement sets, TextWriter output)
    {
        if (sets.GetArrayLength() == 0)
            output.WriteLine("no weight sets");
        foreach (JsonElement s in sets.EnumerateArray())
        {
            string keys = string.Join(", ", s.GetProperty("trusted_keys").EnumerateArray().Select(k => k.GetString()));
            output.WriteLine($"{s.GetProperty("name").GetString()}: active v{s.GetProperty("active").GetUInt64()}, last good v{s.GetProperty("last_good").GetUInt64()}"
                + $"{(s.GetProperty("paused").GetBoolean() ? ", PAUSED" : "")}, {s.GetProperty("queued").GetInt32()} queued, {s.GetProperty("placement").GetString()}"
                + $"{(s.GetProperty("signature_required").GetBoolean() ? $", signed versions only (keys {keys})" : "")}");
            if (s.TryGetProperty("canary_policy", out JsonElement p))
                output.WriteLine($"  canary policy: {p.GetProperty("fraction").GetDouble():P0} of the consumers first, at least {p.GetProperty("min_seconds").GetDouble()} s and {p.GetProperty("min_samples").GetInt64()} requests; "
                    + $"roll back above {p.GetProperty("max_error_rate").GetDouble()} errors per request or {p.GetProperty("max_p99_ratio").GetDouble()} × the others' p99");
            if (s.TryGetProperty("canary", out JsonElement c))
                output.WriteLine($"  canary v{c.GetProperty("version").GetUInt64()}: {c.GetProperty("figures").GetString()}");
            if (s.TryGetProperty("update", out JsonElement u))
            {
                double progress = u.GetProperty("progress").GetDouble();
                int filled = (int)Math.Round(progress * 30);
                output.WriteLine($"  update {(u.GetProperty("rollback").GetBoolean() ? "rollback to " : "")}v{u.GetProperty("version").GetUInt64()} [{new string('#', filled)}{new string('-', 30 - filled)}] {progress,4:P0} {u.GetProperty("phase").GetString()} ({u.GetProperty("bytes").GetInt64()} bytes)");
            }
            foreach (JsonElement consumer in s.GetProperty("consumers").EnumerateArray())
                output.WriteLine($"  consumer session {consumer.GetProperty("session").GetInt64()} pid {consumer.GetProperty("pid").GetInt32()} uid {consumer.GetProperty("uid").GetUInt32()} "
                    + $"{consumer.GetProperty("mode").GetString(),-7} serves v{consumer.GetProperty("serving").GetUInt64()}{(consumer.GetProperty("canary").GetBoolean() ? " (canary)" : "")}, "
                    + $"{consumer.GetProperty("requests").GetInt64()} requests, {consumer.GetProperty("errors").GetInt64()} errors"
                    + (consumer.TryGetProperty("p99_ms", out JsonElement p99) ? $", p99 ≤{p99.GetDouble():0.#} ms" : ""));
        }
    }
}

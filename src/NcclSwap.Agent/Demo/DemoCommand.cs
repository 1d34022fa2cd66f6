using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using Microsoft.Extensions.Logging;
using NcclSwap.ControlPlane;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.Agent.Demo;

/// <summary>
/// <c>nccl-swap demo [--state-dir DIR]</c>: an agent (in this process), a publisher and two consumers (processes of
/// their own, one flip, one copy-in) that keep serving while versions of a generated Llama-shaped model are
/// published, then a rollback; a table per version; exit 1 if any consumer served a version torn or unverified.
/// </summary>
internal static class DemoCommand
{
    private const string WeightSet = "llama-demo";

    public static Command Create(TextWriter output, TextWriter error)
    {
        var stateDir = new Option<string?>("--state-dir") { Description = "Keep the agent's persisted state and log here (default: a fresh temporary folder, printed at the end)." };
        var versions = new Option<int>("--versions") { Description = "How many versions to publish before the rollback.", DefaultValueFactory = _ => 8 };
        var model = new Option<string>("--model") { Description = "small (about 38 MB in BF16), tiny (0.2 MB), or layers:hidden:intermediate:vocabulary:heads:kv-heads[:dtype].", DefaultValueFactory = _ => "small" };
        var backend = new Option<string>("--backend") { Description = "auto (CUDA when a GPU is usable), cuda or host.", DefaultValueFactory = _ => "auto" };
        var command = new Command("demo", "Publish versions of a generated model to two consumer processes through an agent, and show each update.") { stateDir, versions, model, backend };
        command.SetAction(result =>
        {
            try
            {
                SyntheticModel chosen = result.GetValue(model) switch
                {
                    "small" => SyntheticModel.Small,
                    "tiny" => SyntheticModel.Tiny,
                    var text => SyntheticModel.Parse(text!),
                };
                int count = result.GetValue(versions);
                if (count is < 2 or > 10_000)
                    throw new ArgumentException($"--versions {count}: publish 2 to 10000 versions (the rollback needs two)");
                return Run(result.GetValue(stateDir), count, chosen, result.GetValue(backend)!, output);
            }
            catch (Exception e) when (e is ArgumentException or FormatException or IOException or DemoException or CudaUnavailable)
            {
                error.WriteLine($"nccl-swap demo: {e.Message}");
                return 2;
            }
        });
        return command;
    }

    private sealed class DemoException(string message) : Exception(message);

    private sealed class CudaUnavailable(string message) : Exception(message);

    internal static int Run(string? stateDir, int versions, SyntheticModel model, string backendKind, TextWriter output)
    {
        string folder = stateDir is null ? Directory.CreateTempSubdirectory("nccl-swap-demo-").FullName : Path.GetFullPath(stateDir);
        Directory.CreateDirectory(folder);
        string socketPath = Path.Combine(folder, "agent.sock");
        if (Encoding.UTF8.GetByteCount(socketPath) > 107)
            throw new DemoException($"--state-dir {folder}: the socket path {socketPath} is longer than a Unix socket path may be (107 bytes); choose a shorter folder");
        string staging = Directory.Exists("/dev/shm") ? Path.Combine("/dev/shm", $"nccl-swap-demo-{Environment.ProcessId}") : Path.Combine(folder, "staging");
        RegionLayout layout = model.Layout();
        var roles = new RolePolicy();
        roles.Users[PeerIdentity.OfThisProcess().Uid] = Role.Publisher | Role.Consumer | Role.Operator;
        // The canary act turns a canary policy on for the weight set (the acts before it activate on every consumer at once).
        var policies = new System.Collections.Concurrent.ConcurrentDictionary<string, WeightSetPolicy>();
        var options = new AgentOptions(socketPath, folder, staging, 8, roles, UpdatePolicy.Queue, TimeSpan.FromSeconds(30)) { WeightSets = policies };
        ulong bad = (ulong)versions + 1, good = (ulong)versions + 2;

        using var log = new FileLog(Path.Combine(folder, "agent.log"));
        IBackend backend;
        try
        {
            backend = Backend.Create(backendKind);
        }
        catch (Exception e) when (e is NcclSwap.Cuda.CudaException or DllNotFoundException or InvalidOperationException)
        {
            throw new CudaUnavailable($"--backend {backendKind}: {e.Message}");
        }
        var outcomes = new System.Collections.Concurrent.BlockingCollection<UpdateOutcome>();
        var peers = new List<Process>();
        int exit = 0;
        try
        {
            AgentCore agent = AgentCore.Start(options, backend, log);
            agent.Versions.Updated += outcomes.Add;
            output.WriteLine($"nccl-swap demo: {backend.Description}");
            output.WriteLine($"  model: Llama-shaped, {model.Layers} layers, {layout.Tensors.Count} tensors, {Megabytes(layout.TotalBytes)} in {model.Dtype}; {versions} versions, then a rollback");
            output.WriteLine($"  agent in this process (pid {Environment.ProcessId}); publisher and two consumers (A: flip, B: copy-in) in processes of their own");
            output.WriteLine($"  state and log in {folder}; staging in {staging}");
            output.WriteLine();
            try
            {
                // The engines report their requests every few steps; on version `bad` every fifth of theirs fails.
                Peer a = Peer.Start("consumer", socketPath, model, $"flip,bad={bad}", peers);
                Peer b = Peer.Start("consumer", socketPath, model, $"copy-in,bad={bad}", peers);
                Peer publisher = Peer.Start("publisher", socketPath, model, $"{versions}", peers);
                output.WriteLine($"{"version",-18} {"bytes",9} {"snapshot",10} {"stage",10} {"verify",10} {"activate",10}   {"pause A (flip)",15} {"pause B (copy-in)",18}   outcome");
                var rows = new List<UpdateOutcome>();
                for (int i = 0; i < versions; i++)
                    rows.Add(Row(Next(outcomes, publisher), a, b, output));

                using (var operatorClient = ChannelClient.Connect(socketPath, Role.Operator, WeightSet))
                {
                    Response rollback = operatorClient.Call(operatorClient.NewRequest(RequestKind.Rollback), TimeSpan.FromMinutes(2));
                    if (rollback.Status != Status.Ok)
                        throw new DemoException($"rollback: {Status.Name(rollback.Status)}: {ChannelClient.Detail(rollback)}");
                }
                rows.Add(Row(Next(outcomes, publisher), a, b, output));

                // Canary act: half the consumers (A) take each new version first; the policy compares what A reports
                // with what B reports on the version before. Version `bad` makes A's requests fail: rolled back
                // from A alone. Version `good` is healthy: promoted to both.
                policies[WeightSet] = new WeightSetPolicy { Canary = new CanaryPolicy(0.5, TimeSpan.FromSeconds(1), 200, 0.05, 2.0, null, TimeSpan.FromSeconds(60)) };
                output.WriteLine($"canary act: versions {bad} (its requests fail on the canary) and {good}, each first on consumer A, then promoted to B or rolled back");
                publisher.WaitForExit(TimeSpan.FromMinutes(1));
                publisher = Peer.Start("publisher", socketPath, model, $"{bad}:{good}", peers);
                rows.Add(Row(Next(outcomes, publisher), a, b, output));
                rows.Add(Row(Next(outcomes, publisher), a, b, output));
                output.WriteLine();

                exit = Verify(rows, a, b, publisher, output);
                if (rows[^2].Result != UpdateResult.RolledBack || rows[^1].Result != UpdateResult.Activated)
                {
                    output.WriteLine($"FAILED: the canary act should roll version {bad} back and promote version {good}");
                    exit = 1;
                }
                output.WriteLine();
                output.WriteLine(exit == 0
                    ? "every version the consumers served was verified by the agent before activation, and no read was torn"
                    : "FAILED: a consumer served a version the agent had not activated, or read torn weights (see above)");
            }
            finally
            {
                agent.DisposeAsync().AsTask().GetAwaiter().GetResult();
            }
        }
        finally
        {
            foreach (Process peer in peers)
            {
                if (!peer.HasExited)
                    peer.Kill();
                peer.Dispose();
            }
            backend.Dispose();
            if (Directory.Exists(staging))
                Directory.Delete(staging, recursive: true);
        }
        output.WriteLine($"state and log kept in {folder}");
        return exit;
    }

    /// <summary>The next update that ended, or a clear error if the publisher died or nothing came.</summary>
    private static UpdateOutcome Next(System.Collections.Concurrent.BlockingCollection<UpdateOutcome> outcomes, Peer publisher)
    {
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < TimeSpan.FromMinutes(5))
        {
            if (outcomes.TryTake(out UpdateOutcome? outcome, TimeSpan.FromMilliseconds(200)))
                return outcome;
            if (publisher.Process.HasExited && publisher.Process.ExitCode != 0)
                throw new DemoException($"the publisher exited {publisher.Process.ExitCode}: {publisher.Errors}");
        }
        throw new DemoException("no update ended within 5 minutes");
    }

    /// <summary>Prints one update's row once both consumers have switched to it (or it was not activated).</summary>
    private static UpdateOutcome Row(UpdateOutcome outcome, Peer a, Peer b, TextWriter output)
    {
        string pauseA = "", pauseB = "";
        if (outcome.Result == UpdateResult.Activated)
        {
            pauseA = a.PauseFor(outcome.Version) is { } pa ? $"{pa:0} µs" : "(skipped)";
            pauseB = b.PauseFor(outcome.Version) is { } pb ? $"{pb / 1000:0.0} ms" : "(skipped)";
        }
        string name = outcome.IsRollback ? $"rollback to {outcome.Version}" : $"{outcome.Version}";
        output.WriteLine($"{name,-18} {Megabytes(outcome.Bytes),9} {Ms(outcome.Snapshot),10} {Ms(outcome.Stage),10} {Ms(outcome.Verify),10} {Ms(outcome.Activate),10}   {pauseA,15} {pauseB,18}   {outcome.Result.ToString().ToLowerInvariant()}{(outcome.Detail.Length > 0 ? $" ({outcome.Detail})" : "")}");
        return outcome;
    }

    /// <summary>Stops the consumers and checks their reports: nothing torn, and every version served was activated.</summary>
    private static int Verify(List<UpdateOutcome> rows, Peer a, Peer b, Peer publisher, TextWriter output)
    {
        // Rolled-back versions were verified too before their canaries saw them.
        var activated = rows.Where(r => r.Result is UpdateResult.Activated or UpdateResult.RolledBack).Select(r => r.Version).ToHashSet();
        int exit = 0;
        publisher.WaitForExit(TimeSpan.FromMinutes(1));
        foreach ((string name, Peer peer) in new[] { ("A (flip)", a), ("B (copy-in)", b) })
        {
            string summary = peer.Stop();
            var fields = summary.Split(' ').Select(f => f.Split('=', 2)).Where(f => f.Length == 2).ToDictionary(f => f[0], f => f[1]);
            ulong[] served = fields.GetValueOrDefault("served", "").Split(',', StringSplitOptions.RemoveEmptyEntries).Select(v => ulong.Parse(v, CultureInfo.InvariantCulture)).ToArray();
            ulong[] unverified = served.Where(v => !activated.Contains(v)).ToArray();
            long torn = long.Parse(fields.GetValueOrDefault("torn", "-1"), CultureInfo.InvariantCulture);
            output.WriteLine($"consumer {name}: served versions {string.Join(" → ", served)}; {fields.GetValueOrDefault("reads")} reads of all its weights, {torn} torn{(unverified.Length > 0 ? $"; NOT ACTIVATED: {string.Join(", ", unverified)}" : "")}; exit {peer.Process.ExitCode}");
            if (torn != 0 || unverified.Length > 0 || peer.Process.ExitCode != 0 || served.Length == 0)
                exit = 1;
        }
        return exit;
    }

    private static string Ms(TimeSpan time) => $"{time.TotalMilliseconds:0.0} ms";

    private static string Megabytes(long bytes) => $"{bytes / 1e6:0.0} MB";

    /// <summary>A peer process; its output is collected as it comes.</summary>
    private sealed class Peer
    {
        private readonly StringBuilder _output = new();
        private readonly StringBuilder _errors = new();
        private int _switchesSeen;

        private Peer(Process process) => Process = process;

        public Process Process { get; }

        public string Errors
        {
            get
            {
                lock (_errors)
                    return _errors.ToString();
            }
        }

        public static Peer Start(string role, string socket, SyntheticModel model, string extra, List<Process> all)
        {
            var peer = new Peer(Process.Start(SelfProcess.StartInfo(DemoPeers.Verb, role, socket, WeightSet, model.ToString(), extra))!);
            all.Add(peer.Process);
            peer.Process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (peer._output) peer._output.AppendLine(e.Data); };
            peer.Process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (peer._errors) peer._errors.AppendLine(e.Data); };
            peer.Process.BeginOutputReadLine();
            peer.Process.BeginErrorReadLine();
            peer.WaitForLine("ready", TimeSpan.FromMinutes(1));
            return peer;
        }

        private string[] Lines()
        {
            lock (_output)
                return _output.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => l.TrimEnd('\r')).ToArray();
        }

        public string WaitForLine(string prefix, TimeSpan timeout)
        {
            var clock = Stopwatch.StartNew();
            while (clock.Elapsed < timeout)
            {
                if (Lines().FirstOrDefault(l => l.StartsWith(prefix, StringComparison.Ordinal)) is { } line)
                    return line[prefix.Length..];
                if (Process.HasExited)
                    break;
                Thread.Sleep(5);
            }
            throw new DemoException($"a demo peer printed no '{prefix}' line (exited: {Process.HasExited}); {Errors}");
        }

        /// <summary>
        /// The pause (µs) of the consumer's next switch, if it is to <paramref name="version"/>; null if it went to
        /// another (a copy-in consumer takes whatever is active at its step: it may skip one). Waits up to 30 s.
        /// </summary>
        public double? PauseFor(ulong version)
        {
            var clock = Stopwatch.StartNew();
            while (clock.Elapsed < TimeSpan.FromSeconds(30))
            {
                string[] switches = Lines().Where(l => l.StartsWith("switch ", StringComparison.Ordinal)).ToArray();
                if (switches.Length > _switchesSeen)
                {
                    string[] next = switches[_switchesSeen].Split(' ');
                    if (ulong.Parse(next[1], CultureInfo.InvariantCulture) != version)
                        return null; // skipped: leave that switch for the row of its own version
                    _switchesSeen++;
                    return double.Parse(next[3], CultureInfo.InvariantCulture);
                }
                if (Process.HasExited)
                    return null;
                Thread.Sleep(5);
            }
            return null;
        }

        public string Stop()
        {
            Process.StandardInput.WriteLine("stop");
            string summary = WaitForLine("summary ", TimeSpan.FromMinutes(1));
            WaitForExit(TimeSpan.FromMinutes(1));
            return summary;
        }

        public void WaitForExit(TimeSpan timeout)
        {
            if (!Process.WaitForExit(timeout))
                Process.Kill();
            Process.WaitForExit();
        }
    }

    /// <summary>The agent's log, one line per entry, in the state folder.</summary>
    private sealed class FileLog(string path) : ILogger, IDisposable
    {
        private readonly StreamWriter _writer = new(path, append: true) { AutoFlush = true };
        private readonly Lock _lock = new();

        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Information;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            if (!IsEnabled(logLevel))
                return;
            lock (_lock)
                _writer.WriteLine($"{DateTime.UtcNow:yyyy-MM-ddTHH:mm:ss.fffZ} {logLevel.ToString().ToLowerInvariant()}: {formatter(state, exception)}{(exception is null ? "" : " " + exception)}");
        }

        public void Dispose() => _writer.Dispose();
    }
}

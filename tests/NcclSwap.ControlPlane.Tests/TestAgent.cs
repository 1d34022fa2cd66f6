using System.Globalization;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.DataPlane;
using NcclSwap.Testing;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Tests;

/// <summary>
/// An agent for the life-cycle tests: the real <see cref="AgentCore"/> on the host backend (behind a
/// <see cref="FlakyBackend"/> that spoils bytes when a test says so), in this process or as a process of its
/// own that a test can kill, with its state, staging and socket in a fresh folder; and the peers that talk to it.
/// </summary>
internal sealed class TestAgent : IAsyncDisposable
{
    public const string AgentPeer = "agent";

    private readonly AgentOptions? _options;

    private TestAgent(string folder, AgentCore? core, FlakyBackend? backend, TestLog log, AgentOptions? options = null)
    {
        Folder = folder;
        Core = core;
        Backend = backend;
        Log = log;
        _options = options;
    }

    public string Folder { get; }

    public string SocketPath => Path.Combine(Folder, "agent.sock");

    public string StagingDirectory => StagingFor(Folder);

    /// <summary>Waits until the agent has logged a line containing <paramref name="text"/>.</summary>
    public void WaitForLog(string text, TimeSpan? timeout = null)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (!Log.Lines.Any(l => l.Contains(text, StringComparison.Ordinal)))
        {
            if (clock.Elapsed > (timeout ?? TimeSpan.FromSeconds(30)))
                Assert.Fail($"the agent did not log '{text}'; its log:{Environment.NewLine}{Log}");
            Thread.Sleep(5);
        }
    }

    /// <summary>The agent when it runs in this process.</summary>
    public AgentCore? Core { get; private set; }

    public FlakyBackend? Backend { get; }

    public TestLog Log { get; }

    public static AgentOptions Options(string folder, UpdatePolicy policy, TimeSpan ackTimeout)
    {
        var roles = new RolePolicy();
        roles.Users[MyUid()] = Role.Publisher | Role.Consumer | Role.Operator;
        return new AgentOptions(Path.Combine(folder, "agent.sock"), Path.Combine(folder, "state"), StagingFor(folder), 8, roles, policy, ackTimeout);
    }

    /// <summary>Staging on a tmpfs, as in production (/dev/shm where there is one), named after the test's folder.</summary>
    private static string StagingFor(string folder) =>
        Directory.Exists("/dev/shm") ? Path.Combine("/dev/shm", Path.GetFileName(folder) + "-staging") : Path.Combine(folder, "staging");

    /// <summary>An agent in this process; <paramref name="unmappable"/>: host memory its backend refuses to map from the start (<see cref="FlakyBackend.RefuseMapHost"/>).</summary>
    /// <param name="configure">Changes the options before the agent starts (weight-set policies, roles); it gets the agent's folder.</param>
    public static TestAgent Start(UpdatePolicy policy = UpdatePolicy.Queue, TimeSpan? ackTimeout = null, StagingPlacement placement = StagingPlacement.Auto, string? unmappable = null,
        Func<AgentOptions, string, AgentOptions>? configure = null)
    {
        string folder = Directory.CreateTempSubdirectory("nccl-swap-agent-").FullName;
        var log = new TestLog();
        var backend = new FlakyBackend(new HostBackend());
        backend.RefuseMapHost(unmappable);
        AgentOptions options = Options(folder, policy, ackTimeout ?? TimeSpan.FromSeconds(30)) with { Placement = placement };
        if (configure is not null)
            options = configure(options, folder);
        return new TestAgent(folder, AgentCore.Start(options, backend, log), backend, log, options);
    }

    /// <summary>Stops the in-process agent cleanly (as on SIGTERM).</summary>
    public async Task StopAsync()
    {
        if (Core is not null)
            await Core.DisposeAsync();
        Core = null;
    }

    /// <summary>Starts the in-process agent again on the same folder, state and staging.</summary>
    public void Restart()
    {
        if (Core is not null)
            throw new InvalidOperationException("stop the agent first");
        Core = AgentCore.Start(_options!, Backend!, Log);
    }

    /// <summary>A folder for an agent that runs as its own process (<see cref="StartProcess"/>).</summary>
    public static TestAgent ForProcess() => new(Directory.CreateTempSubdirectory("nccl-swap-agent-").FullName, null, null, new TestLog());

    /// <summary>Starts the agent as a process of its own on this folder and waits until it listens.</summary>
    public PeerProcess StartProcess(UpdatePolicy policy, TimeSpan ackTimeout)
    {
        PeerProcess agent = PeerHost.Start(AgentPeer, Folder, policy.ToString(), ackTimeout.TotalSeconds.ToString(CultureInfo.InvariantCulture));
        agent.WaitForLine("listening", TimeSpan.FromSeconds(30));
        return agent;
    }

    /// <summary>The peer role: <c>agent FOLDER POLICY ACK_SECONDS</c> runs an agent until killed (or stdin closes).</summary>
    public static int RunPeer(string[] args)
    {
        var log = new ConsoleLog();
        using var backend = new HostBackend();
        AgentCore core = AgentCore.Start(Options(args[0], Enum.Parse<UpdatePolicy>(args[1]),
            TimeSpan.FromSeconds(double.Parse(args[2], CultureInfo.InvariantCulture))), backend, log);
        Console.WriteLine("listening");
        Console.In.ReadToEnd();
        core.DisposeAsync().AsTask().GetAwaiter().GetResult();
        return 0;
    }

    public PeerProcess Publisher(string set, SyntheticModel model, ulong first, ulong last, bool wait, int paceMilliseconds)
    {
        PeerProcess peer = PeerHost.Start(LifecyclePeers.Publisher, SocketPath, set, model.ToString(),
            $"{first}", $"{last}", wait ? "1" : "0", paceMilliseconds.ToString(CultureInfo.InvariantCulture));
        peer.WaitForLine("ready", TimeSpan.FromSeconds(30));
        return peer;
    }

    public PeerProcess Consumer(string set, SyntheticModel model, ConsumerMode mode, ulong until = 0)
    {
        PeerProcess peer = PeerHost.Start(LifecyclePeers.Consumer, SocketPath, set, model.ToString(), mode == ConsumerMode.Flip ? "flip" : "copy-in", $"{until}");
        peer.WaitForLine("ready", TimeSpan.FromSeconds(30));
        return peer;
    }

    /// <summary>Waits until <paramref name="condition"/> holds, or fails with <paramref name="what"/> and the agent's log.</summary>
    public void WaitFor(Func<bool> condition, TimeSpan timeout, string what)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (!condition())
        {
            if (clock.Elapsed > timeout)
                Assert.Fail($"{what} did not happen within {timeout.TotalSeconds} s; agent log:{Environment.NewLine}{Log}");
            Thread.Sleep(10);
        }
    }

    /// <summary>The outcome of the latest update of <paramref name="version"/> (in-process agent).</summary>
    public UpdateOutcome? Outcome(string set, ulong version, bool rollback = false) =>
        Core!.Versions.History(set).LastOrDefault(o => o.Version == version && o.IsRollback == rollback);

    public UpdateOutcome WaitForOutcome(string set, ulong version, bool rollback = false, TimeSpan? timeout = null)
    {
        WaitFor(() => Outcome(set, version, rollback) is { IsFinal: true }, timeout ?? TimeSpan.FromSeconds(60), $"the end of the update to version {version}");
        return Outcome(set, version, rollback)!;
    }

    public static uint MyUid() => PeerIdentity.OfThisProcess().Uid;

    public async ValueTask DisposeAsync()
    {
        if (Core is not null)
            await Core.DisposeAsync();
        Backend?.Dispose();
        Directory.Delete(Folder, recursive: true);
        if (Directory.Exists(StagingFor(Folder)))
            Directory.Delete(StagingFor(Folder), recursive: true);
    }

    /// <summary>The agent process's log, on its stdout.</summary>
    private sealed class ConsoleLog : Microsoft.Extensions.Logging.ILogger
    {
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

        public bool IsEnabled(Microsoft.Extensions.Logging.LogLevel logLevel) => logLevel >= Microsoft.Extensions.Logging.LogLevel.Information;

        public void Log<TState>(Microsoft.Extensions.Logging.LogLevel logLevel, Microsoft.Extensions.Logging.EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            if (IsEnabled(logLevel))
                Console.WriteLine($"{logLevel}: {formatter(state, exception)}");
        }
    }
}

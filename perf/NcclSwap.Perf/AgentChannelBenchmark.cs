using System.Diagnostics;
using System.Globalization;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Running;
using Microsoft.Extensions.Logging.Abstractions;
using NcclSwap.ControlPlane;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.Perf;

/// <summary>
/// Round trips through the real agent: this process is a client of an agent running as a second process (the
/// front door, the request dispatcher, the handler), pinging back to back, then after idle pauses (the dispatcher
/// backs off to sleeps when nothing comes).
/// </summary>
internal static class AgentChannelBenchmark
{
    public const string AgentVerb = "agent-host";

    public static int Run(string[] args)
    {
        int count = int.Parse(args.FirstOrDefault() ?? "200000", CultureInfo.InvariantCulture);
        string folder = Directory.CreateTempSubdirectory("nccl-swap-bench-agent-").FullName;
        var start = new ProcessStartInfo(Environment.ProcessPath!) { UseShellExecute = false, RedirectStandardInput = true, RedirectStandardOutput = true };
        if (Path.GetFileNameWithoutExtension(Environment.ProcessPath!) == "dotnet")
            start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "NcclSwap.Perf.dll"));
        start.ArgumentList.Add(AgentVerb);
        start.ArgumentList.Add(folder);
        using Process agent = Process.Start(start)!;
        try
        {
            if (agent.StandardOutput.ReadLine() != "listening")
                throw new InvalidOperationException("the agent did not start");
            using ChannelClient client = ChannelClient.Connect(Path.Combine(folder, "agent.sock"), Role.Consumer, "bench");
            int warmup = Math.Min(20_000, count / 5);
            double[] busy = Time(client, warmup, count, idle: TimeSpan.Zero);
            double[] idle = Time(client, 10, 200, idle: TimeSpan.FromMilliseconds(20));
            Console.WriteLine($"agent round trip (ping: client → request ring → dispatcher → response ring → client), agent in another process, {Environment.ProcessorCount} cores:");
            Console.WriteLine($"  back to back, {count} after {warmup} warm-up: {Percentiles(busy)} (aim: p50 < 10 µs)");
            Console.WriteLine($"  after 20 ms idle, 200 pings: {Percentiles(idle)}");
            return 0;
        }
        finally
        {
            agent.StandardInput.Close();
            agent.WaitForExit(10_000);
            Directory.Delete(folder, recursive: true);
        }
    }

    private static double[] Time(ChannelClient client, int warmup, int count, TimeSpan idle)
    {
        var times = new double[count];
        for (int i = 0; i < warmup + count; i++)
        {
            if (idle > TimeSpan.Zero)
                Thread.Sleep(idle);
            Request ping = client.NewRequest(RequestKind.Ping);
            long t0 = Stopwatch.GetTimestamp();
            Response response = client.Call(ping, TimeSpan.FromSeconds(10));
            long t1 = Stopwatch.GetTimestamp();
            if (response.Status != Status.Ok)
                throw new InvalidDataException($"ping {i}: {Status.Name(response.Status)}");
            if (i >= warmup)
                times[i - warmup] = (t1 - t0) * 1e6 / Stopwatch.Frequency;
        }
        Array.Sort(times);
        return times;
    }

    private static string Percentiles(double[] sorted) =>
        $"p50 {sorted[sorted.Length / 2]:0.00} µs, p99 {sorted[(int)(sorted.Length * 0.99)]:0.00} µs, max {sorted[^1]:0.0} µs";

    /// <summary>The agent process: host backend, every role for this uid, until stdin closes.</summary>
    public static int Host(string[] args)
    {
        var roles = new RolePolicy();
        roles.Users[Uid()] = Role.Publisher | Role.Consumer | Role.Operator;
        string folder = args[0];
        using var backend = new HostBackend();
        AgentCore agent = AgentCore.Start(new AgentOptions(Path.Combine(folder, "agent.sock"), folder, Path.Combine(folder, "staging"), 8, roles, UpdatePolicy.Supersede, TimeSpan.FromSeconds(30)),
            backend, NullLogger.Instance);
        Console.WriteLine("listening");
        Console.In.ReadToEnd();
        agent.DisposeAsync().AsTask().GetAwaiter().GetResult();
        return 0;
    }

    internal static uint Uid() => PeerIdentity.OfThisProcess().Uid;
}

/// <summary>The engine's per-step call, <see cref="ConsumerClient.Step"/>, when no new version is active (the common case).</summary>
public class ConsumerStep
{
    private string _folder = "";
    private HostBackend? _backend;
    private AgentCore? _agent;
    private PublisherClient? _publisher;
    private ConsumerClient? _consumer;

    [GlobalSetup]
    public void Setup()
    {
        _folder = Directory.CreateTempSubdirectory("nccl-swap-bench-step-").FullName;
        var roles = new RolePolicy();
        roles.Users[AgentChannelBenchmark.Uid()] = Role.Publisher | Role.Consumer;
        _backend = new HostBackend();
        _agent = AgentCore.Start(new AgentOptions(Path.Combine(_folder, "agent.sock"), _folder, Path.Combine(_folder, "staging"), 8, roles, UpdatePolicy.Supersede, TimeSpan.FromSeconds(30)),
            _backend, NullLogger.Instance);
        RegionLayout layout = SyntheticModel.Tiny.Layout();
        _publisher = PublisherClient.Connect(_agent.Options.SocketPath, "bench", layout);
        _consumer = ConsumerClient.Connect(_agent.Options.SocketPath, "bench", layout, ConsumerMode.Flip);
        SyntheticModel.Fill(1, layout, _publisher.Tensors.Pointer);
        if (!_publisher.Publish(1, wait: true).Ok || !_consumer.Step())
            throw new InvalidOperationException("the consumer did not take version 1");
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _consumer?.Dispose();
        _publisher?.Dispose();
        _agent?.DisposeAsync().AsTask().GetAwaiter().GetResult();
        _backend?.Dispose();
        Directory.Delete(_folder, recursive: true);
    }

    [Benchmark]
    public bool Step() => _consumer!.Step();

    public static int Run(string[] args)
    {
        BenchmarkRunner.Run<ConsumerStep>(args: args);
        return 0;
    }
}

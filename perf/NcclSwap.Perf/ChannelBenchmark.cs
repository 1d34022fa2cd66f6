using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Running;
using NcclSwap.ControlPlane;
using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.Perf;

/// <summary>
/// Round trips through the shared-memory channel: this process writes a request into one ring, a second
/// process answers in another, this process reads the answer. Latency per round trip, after a warm-up.
/// </summary>
internal static class ChannelBenchmark
{
    public const string ResponderVerb = "channel-responder";

    public static int Run(string[] args)
    {
        int count = int.Parse(args.FirstOrDefault() ?? "200000", CultureInfo.InvariantCulture);
        string folder = Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath();
        string requestsPath = Path.Combine(folder, $"nccl-swap-bench-{Environment.ProcessId}-requests");
        string responsesPath = Path.Combine(folder, $"nccl-swap-bench-{Environment.ProcessId}-responses");
        int entry = Marshal.SizeOf<Request>();
        using var requests = SharedRing.Create(requestsPath, 64, entry);
        using var responses = SharedRing.Create(responsesPath, 64, entry);
        int warmup = Math.Min(20_000, count / 5);
        var start = new ProcessStartInfo(Environment.ProcessPath!) { UseShellExecute = false };
        if (Path.GetFileNameWithoutExtension(Environment.ProcessPath!) == "dotnet")
            start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "NcclSwap.Perf.dll"));
        foreach (string arg in new[] { ResponderVerb, requestsPath, responsesPath, $"{count + warmup}" })
            start.ArgumentList.Add(arg);
        using Process responder = Process.Start(start)!;
        try
        {
            var times = new double[count];
            for (int i = 0; i < count + warmup; i++)
            {
                Request request = Messages.NewRequest(RequestKind.Ping, (ulong)i);
                long t0 = Stopwatch.GetTimestamp();
                if (!requests.Write(request, TimeSpan.FromSeconds(10)) || !responses.Read(out Response response, TimeSpan.FromSeconds(10)))
                    throw new TimeoutException($"round trip {i} did not complete within 10 s");
                long t1 = Stopwatch.GetTimestamp();
                if (response.Id != (ulong)i)
                    throw new InvalidDataException($"response {response.Id} for request {i}");
                if (i >= warmup)
                    times[i - warmup] = (t1 - t0) * 1e6 / Stopwatch.Frequency;
            }
            responder.WaitForExit();
            Array.Sort(times);
            Console.WriteLine($"control-channel round trip, {count} requests after {warmup} warm-up, {Environment.ProcessorCount} cores:");
            Console.WriteLine($"  p50 {times[count / 2]:0.00} µs, p99 {times[(int)(count * 0.99)]:0.00} µs, p99.9 {times[(int)(count * 0.999)]:0.00} µs, max {times[^1]:0.0} µs (aim: p50 < 10 µs)");
            return 0;
        }
        finally
        {
            if (!responder.HasExited)
                responder.Kill();
            File.Delete(requestsPath);
            File.Delete(responsesPath);
        }
    }

    public static int Respond(string[] args)
    {
        using var requests = SharedRing.Open(args[0]);
        using var responses = SharedRing.Open(args[1]);
        long count = long.Parse(args[2], CultureInfo.InvariantCulture);
        for (long i = 0; i < count; i++)
        {
            if (!requests.Read(out Request request, TimeSpan.FromSeconds(10)))
                return 3;
            if (!responses.Write(Messages.NewResponse(request, 0), TimeSpan.FromSeconds(10)))
                return 4;
        }
        return 0;
    }
}

/// <summary>The consumer's per-step check: one load of its row's state word.</summary>
public class VersionCheck
{
    private VersionTable? _table;
    private string _path = "";

    [GlobalSetup]
    public void Setup()
    {
        _path = Path.Combine(Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath(), $"nccl-swap-bench-table-{Environment.ProcessId}");
        _table = VersionTable.Create(_path, 8);
        int row = _table.Add("llama");
        _table.Activate(row, 3, 1, 0);
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _table?.Dispose();
        File.Delete(_path);
    }

    [Benchmark]
    public ulong ReadState() => _table!.ReadState(0);

    public static int Run(string[] args)
    {
        BenchmarkRunner.Run<VersionCheck>(args: args);
        return 0;
    }
}

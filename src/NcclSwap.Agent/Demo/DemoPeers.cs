using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using NcclSwap.ControlPlane;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.WeightSets;

namespace NcclSwap.Agent.Demo;

/// <summary>
/// The demo's trainer and engines, each a process of its own that reaches the agent only through the channel.
/// They print one line per event on stdout for the demo to read.
/// </summary>
internal static class DemoPeers
{
    public const string Verb = "demo-peer";

    public static Command Create(TextWriter output)
    {
        var role = new Argument<string>("role");
        var socket = new Argument<string>("socket");
        var weightSet = new Argument<string>("weight-set");
        var model = new Argument<string>("model") { Description = "layers:hidden:intermediate:vocabulary:heads:kv-heads[:dtype], or layout:FILE for a layout file's model whole (a TP1 engine's share)" };
        var extra = new Argument<string>("extra") { Description = "publisher: versions to publish; consumer: flip or copy-in" };
        var command = new Command(Verb, "Internal: a publisher or consumer process of nccl-swap demo.") { role, socket, weightSet, model, extra };
        command.Hidden = true;
        command.SetAction(result =>
        {
            string text = result.GetValue(model)!;
            RegionLayout parsed = text.StartsWith("layout:", StringComparison.Ordinal)
                ? TransferPlan.Create(ModelLayout.Load(text["layout:".Length..]), 1, 1).DestinationLayout(0)
                : SyntheticModel.Parse(text).Layout();
            return result.GetValue(role) switch
            {
                "publisher" => Publish(result.GetValue(socket)!, result.GetValue(weightSet)!, parsed, result.GetValue(extra)!, output),
                "consumer" => Consume(result.GetValue(socket)!, result.GetValue(weightSet)!, parsed, result.GetValue(extra)!, output),
                var other => throw new ArgumentException($"unknown demo role '{other}'"),
            };
        });
        return command;
    }

    /// <summary>Writes versions 1..N of the model and publishes each, waiting for its outcome; prints "published V STATUS DETAIL".</summary>
    private static int Publish(string socket, string weightSet, RegionLayout layout, string versions, TextWriter output)
    {
        string[] range = versions.Split(':'); // N (1..N) or FIRST:LAST
        ulong first = range.Length == 2 ? ulong.Parse(range[0], CultureInfo.InvariantCulture) : 1, last = ulong.Parse(range[^1], CultureInfo.InvariantCulture);
        using PublisherClient publisher = PublisherClient.Connect(socket, weightSet, layout);
        output.WriteLine("ready");
        for (ulong version = first; version <= last; version++)
        {
            SyntheticModel.Fill(version, layout, publisher.Tensors.Pointer); // the "training step"
            PublishResult result = publisher.Publish(version, wait: true, TimeSpan.FromMinutes(5));
            output.WriteLine($"published {version} {Status.Name(result.Status)} {result.Detail}");
        }
        output.WriteLine("done");
        return 0;
    }

    /// <summary>
    /// An engine: every step it checks for a new version, then "generates" by reading all of its weights and
    /// checking them against what the version it serves must hold, then sleeps a millisecond. Prints
    /// "switch V SLOT PAUSE_US" per switch, "torn V" per read that was not exactly version V, and a summary when
    /// stdin says "stop". Exits 3 if any read was torn.
    /// </summary>
    /// <remarks>
    /// <paramref name="how"/>: <c>flip</c> or <c>copy-in</c>, then optionally <c>,bad=V</c>: every 50 steps it reports
    /// what it served (a request per step, its latency the step's, and on version V one request in five failed).
    /// </remarks>
    private static int Consume(string socket, string weightSet, RegionLayout layout, string how, TextWriter output)
    {
        string[] parts = how.Split(',');
        ConsumerMode mode = parts[0] == "flip" ? ConsumerMode.Flip : ConsumerMode.CopyIn;
        ulong bad = parts.Skip(1).FirstOrDefault(p => p.StartsWith("bad=", StringComparison.Ordinal)) is { } b ? ulong.Parse(b[4..], CultureInfo.InvariantCulture) : 0;
        var counters = new ServingCounters();
        var step = Stopwatch.StartNew();
        using ConsumerClient consumer = ConsumerClient.Connect(socket, weightSet, layout, mode);
        var stop = new ManualResetEventSlim();
        new Thread(() => { while (Console.ReadLine() is { } line && line != "stop") { } stop.Set(); }) { IsBackground = true }.Start();
        output.WriteLine("ready");
        var expected = new Dictionary<ulong, ulong>();
        var served = new List<ulong>();
        long reads = 0, torn = 0;
        var clock = Stopwatch.StartNew();
        while (!stop.IsSet)
        {
            if (consumer.Step())
            {
                served.Add(consumer.Version);
                output.WriteLine($"switch {consumer.Version} {VersionEntry.UnpackState(consumer.Serving).Slot} {consumer.LastPause.TotalMicroseconds:0}");
            }
            ulong version = consumer.Version;
            if (version != 0)
            {
                if (!expected.TryGetValue(version, out ulong want))
                    expected[version] = want = SyntheticModel.Expected(version, layout);
                reads++;
                if (SyntheticModel.Hash(layout, consumer.Weights.Pointer) != want)
                {
                    torn++;
                    output.WriteLine($"torn {version}");
                }
            }
            Thread.Sleep(1);
            if (version != 0)
            {
                counters.Served(step.Elapsed.TotalMilliseconds, error: version == bad && reads % 5 == 0);
                step.Restart();
                if (counters.Requests >= 50)
                    consumer.Report(counters);
            }
        }
        output.WriteLine($"summary reads={reads} torn={torn} served={string.Join(',', served)} seconds={clock.Elapsed.TotalSeconds:0.0}");
        return torn == 0 ? 0 : 3;
    }
}

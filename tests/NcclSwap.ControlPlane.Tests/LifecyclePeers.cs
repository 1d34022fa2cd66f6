using System.Diagnostics;
using System.Globalization;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Tests;

/// <summary>
/// The trainer and engine processes of the life-cycle tests, speaking to the agent only through the channel.
/// Both write what they did on stdout, one line per event, for the test to check.
/// </summary>
internal static class LifecyclePeers
{
    public const string Publisher = "publisher";
    public const string Consumer = "consumer";

    /// <summary>
    /// <c>publisher SOCKET SET MODEL FIRST LAST WAIT PACE_MS</c>: publishes versions FIRST..LAST of the synthetic
    /// model, each written into its region just before. WAIT 1 waits for each version's outcome. PACE_MS -1 reads a
    /// line from stdin before each version (the test paces it). If the agent goes away it reconnects and publishes
    /// the same version again. Prints "published V STATUS DETAIL" per version and "done" at the end.
    /// </summary>
    public static int Publish(string[] args)
    {
        (string socket, string set, SyntheticModel model) = (args[0], args[1], SyntheticModel.Parse(args[2]));
        ulong first = ulong.Parse(args[3], CultureInfo.InvariantCulture), last = ulong.Parse(args[4], CultureInfo.InvariantCulture);
        bool wait = args[5] == "1";
        int pace = int.Parse(args[6], CultureInfo.InvariantCulture);
        RegionLayout layout = model.Layout();
        using PublisherClient publisher = Retry(() => PublisherClient.Connect(socket, set, layout), TimeSpan.FromSeconds(30));
        Console.WriteLine("ready");
        for (ulong version = first; version <= last; version++)
        {
            if (pace < 0 && Console.ReadLine() is null)
                return 0;
            SyntheticModel.Fill(version, layout, publisher.Tensors.Pointer);
            PublishResult result;
            while (true)
            {
                try
                {
                    result = publisher.Publish(version, wait, TimeSpan.FromSeconds(60));
                    break;
                }
                catch (ChannelClosedException e)
                {
                    Console.WriteLine($"agent gone at {version}: {e.Message}");
                    Retry(() => { publisher.Reconnect(); return 0; }, TimeSpan.FromSeconds(60));
                    Console.WriteLine("reconnected");
                }
            }
            Console.WriteLine($"published {version} {Status.Name(result.Status)} {result.Detail}");
            if (pace > 0)
                Thread.Sleep(pace);
        }
        Console.WriteLine("done");
        return 0;
    }

    /// <summary>
    /// <c>consumer SOCKET SET MODEL MODE UNTIL</c>: an engine that steps without pause, checking at every step that
    /// the weights it reads are exactly the version it serves. UNTIL 0 runs until stdin says "stop"; otherwise it
    /// runs until it serves version UNTIL, prints "reached", and waits for "stop". Prints "switch V SLOT PAUSE_US"
    /// per switch, "torn V …" for every read that is not exactly version V, and a summary line.
    /// </summary>
    public static int Consume(string[] args)
    {
        (string socket, string set, SyntheticModel model) = (args[0], args[1], SyntheticModel.Parse(args[2]));
        ConsumerMode mode = args[3] == "flip" ? ConsumerMode.Flip : ConsumerMode.CopyIn;
        ulong until = ulong.Parse(args[4], CultureInfo.InvariantCulture);
        RegionLayout layout = model.Layout();
        using ConsumerClient consumer = Retry(() => ConsumerClient.Connect(socket, set, layout, mode), TimeSpan.FromSeconds(30));
        var stop = new ManualResetEventSlim();
        new Thread(() => { while (Console.ReadLine() is { } line && line != "stop") { } stop.Set(); }) { IsBackground = true }.Start();
        Console.WriteLine("ready");
        var expected = new Dictionary<ulong, ulong>();
        long reads = 0, torn = 0;
        bool reached = false;
        var clock = Stopwatch.StartNew();
        while (!stop.IsSet)
        {
            if (consumer.Step())
                Console.WriteLine($"switch {consumer.Version} {VersionEntry.UnpackState(consumer.Serving).Slot} {consumer.LastPause.TotalMicroseconds:0}");
            ulong version = consumer.Version;
            if (version != 0)
            {
                if (!expected.TryGetValue(version, out ulong want))
                    expected[version] = want = SyntheticModel.Expected(version, layout);
                ulong seen = SyntheticModel.Hash(layout, consumer.Weights.Pointer);
                reads++;
                if (seen != want)
                {
                    torn++;
                    Console.WriteLine($"torn {version}: read hash {seen:x16}, version {version} has {want:x16}");
                }
            }
            if (!reached && until != 0 && version == until)
            {
                reached = true;
                Console.WriteLine("reached");
            }
        }
        Console.WriteLine($"summary reads={reads} torn={torn} switches={consumer.Switches} sessions={consumer.Sessions} serving={consumer.Version} seconds={clock.Elapsed.TotalSeconds:0.0} error={consumer.LastError}");
        return torn == 0 ? 0 : 3;
    }

    private static T Retry<T>(Func<T> attempt, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            try
            {
                return attempt();
            }
            catch (Exception e) when ((e is IOException or System.Net.Sockets.SocketException) && clock.Elapsed < timeout)
            {
                Thread.Sleep(100);
            }
        }
    }
}

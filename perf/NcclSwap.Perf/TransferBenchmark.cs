using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using NcclSwap.Cuda;
using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.Perf;

/// <summary>
/// One destination's share of a transfer plan, run on one rank through the executor (on a GPU: NCCL, the rank sending
/// to itself), against raw collective sends of the same buckets and a plain device-to-device copy of the same bytes,
/// all in the same run. The first lines give the whole plan's figures: what each destination receives against a
/// broadcast of the whole model to every destination.
/// </summary>
internal static partial class TransferBenchmark
{
    public static int Run(string[] args)
    {
        if (args.Length == 0 || args[0].StartsWith('-'))
            return Usage();
        string path = args[0];
        int tp = Option(args, "--tp", 8), destination = Option(args, "--destination", 0), layers = Option(args, "--layers", int.MaxValue);
        int runs = Option(args, "--runs", 3);
        long bucketBytes = Option(args, "--bucket-mib", 256) * (1L << 20);
        bool host = args.Contains("--host") || !CudaDriver.IsSupported || !NcclLibrary.IsSupported;

        ModelLayout full = ModelLayout.Load(path);
        var clock = Stopwatch.StartNew();
        TransferPlan whole = TransferPlan.Create(full, 1, tp, bucketBytes);
        Console.WriteLine($"{full.Model}: {full.Tensors.Count} tensors, {full.TotalBytes:N0} bytes; plan for TP{tp} in {clock.Elapsed.TotalSeconds:0.0} s");
        long[] received = whole.ReceivedBytes();
        Console.WriteLine($"  each destination receives {received.Min():N0}..{received.Max():N0} bytes = {received.Max() / (double)full.TotalBytes:0.000} of the model;" +
            $" a broadcast of everything sends each {full.TotalBytes:N0} ({full.TotalBytes / (double)received.Max():0.0}x more)");
        Console.WriteLine($"  {whole.Transfers.Count(t => t.IsBroadcast)} broadcasts and {whole.Transfers.Count(t => !t.IsBroadcast)} sends, {whole.Transfers.Sum(t => t.Buckets.Buckets.Count)} buckets of {bucketBytes >> 20} MiB");

        ModelLayout layout = layers == int.MaxValue ? full
            : new ModelLayout($"{full.Model}, layers 0..{layers - 1}", full.Tensors.Where(t => LayerOf(t.Name) is not int l || l < layers).ToList());
        TransferPlan plan = TransferPlan.Create(layout, 1, tp, bucketBytes).ForDestination(destination);
        long bytes = plan.ReceivedBytes()[0];
        Console.WriteLine($"run: destination {destination} of TP{tp} for {layout.Model}: {layout.TotalBytes:N0} bytes at the source, " +
            $"{bytes:N0} bytes in {plan.Transfers.Sum(t => t.Buckets.Buckets.Count)} buckets to the destination");

        using IBackend backend = host ? new HostBackend() : new CudaBackend(0);
        Console.WriteLine($"backend: {backend.Description}{(host ? "" : $", NCCL {NcclLibrary.Version}")}");
        using ICollective collective = backend.JoinCollective(backend.CreateCollectiveId(), 0, 1, TimeSpan.FromSeconds(120));
        using IDeviceBuffer source = backend.Allocate(plan.SourceLayout().Length);
        using IDeviceBuffer target = backend.Allocate(plan.DestinationLayout(0).Length);
        Fill(backend, source, seed: 1);
        Fill(backend, target, seed: 2);

        using var executor = new PlanExecutor(plan, backend, collective, new PlanRanks([0], [0]));
        clock.Restart();
        TransferReport report = executor.Run(source, target);
        Console.WriteLine($"first run (makes the links): {clock.Elapsed.TotalMilliseconds:0.0} ms, {report.Buckets} buckets, every digest matched");

        // Every bucket moves (the destination holds other bytes): with the search for unchanged buckets, and without it
        // (as for full fine-tuning, where every tensor changes every version).
        using var everything = new PlanExecutor(plan, backend, collective, new PlanRanks([0], [0])) { SkipUnchanged = false };
        everything.Run(source, target);
        double best = double.MaxValue, bestSearching = double.MaxValue;
        for (int run = 0; run < runs; run++)
        {
            foreach (PlanExecutor how in new[] { executor, everything })
            {
                Fill(backend, target, seed: 3 + run);
                clock.Restart();
                report = how.Run(source, target, how == executor ? report : null);
                double seconds = clock.Elapsed.TotalSeconds;
                if (how == executor)
                    bestSearching = Math.Min(bestSearching, seconds);
                else
                    best = Math.Min(best, seconds);
                Console.WriteLine($"  full update {run + 1}{(how == executor ? ", looking for unchanged buckets" : "")}: {seconds * 1e3:0.0} ms, {report.Buckets} buckets, {report.Bytes / seconds / 1e9:0.0} GB/s" +
                    $" ({string.Join(", ", report.Phases.Select(p => $"{p.Key} {p.Value:0.0} ms"))})");
            }
        }
        Fill(backend, target, seed: 99);
        report = executor.Run(source, target);

        clock.Restart();
        TransferReport same = executor.Run(source, target, report);
        double unchanged = clock.Elapsed.TotalSeconds;
        Console.WriteLine($"  nothing changed: {unchanged * 1e3:0.0} ms, {same.Buckets} buckets moved, {same.Skipped} skipped");

        // Raw: the same buckets as collective sends to this rank itself, and as device-to-device copies.
        long largest = plan.Transfers.SelectMany(t => t.Buckets.Buckets).Max(b => b.Bytes);
        var sizes = plan.Transfers.SelectMany(t => t.Buckets.Buckets).Select(b => b.Bytes).ToList();
        double raw = double.MaxValue, copy = double.MaxValue;
        using (IDeviceBuffer from = backend.Allocate(largest * 2))
        using (IDeviceBuffer to = backend.Allocate(largest * 2))
        using (ICopyStream stream = backend.CreateStream())
        using (IDeviceEvent done = backend.CreateEvent())
        {
            Fill(backend, from, seed: 9);
            for (int run = 0; run < runs + 1; run++)
            {
                clock.Restart();
                for (int i = 0; i < sizes.Count; i++)
                    using (collective.Group())
                    {
                        collective.Send(from, i % 2 * largest, sizes[i], 0, stream);
                        collective.Receive(to, i % 2 * largest, sizes[i], 0, stream);
                    }
                stream.Record(done);
                collective.Wait(done, null, "raw sends");
                if (run > 0)
                    raw = Math.Min(raw, clock.Elapsed.TotalSeconds);
                clock.Restart();
                for (int i = 0; i < sizes.Count; i++)
                    stream.CopyAsync(to, i % 2 * largest, from, i % 2 * largest, sizes[i]);
                stream.Synchronize();
                if (run > 0)
                    copy = Math.Min(copy, clock.Elapsed.TotalSeconds);
            }
        }

        Console.WriteLine($"raw collective send+receive of the same {sizes.Count} buckets: {raw * 1e3:0.0} ms, {bytes / raw / 1e9:0.0} GB/s");
        Console.WriteLine($"device-to-device copy of the same buckets: {copy * 1e3:0.0} ms, {bytes / copy / 1e9:0.0} GB/s");
        Console.WriteLine($"update (best of {runs}): {best * 1e3:0.0} ms, {bytes / best / 1e9:0.0} GB/s = {raw / best:0.00} of the raw collective rate, {copy / best:0.00} of the copy rate");
        Console.WriteLine($"update looking for unchanged buckets (best of {runs}): {bestSearching * 1e3:0.0} ms = {raw / bestSearching:0.00} of the raw collective rate; " +
            $"an unchanged model {unchanged * 1e3:0.0} ms");
        return 0;
    }

    /// <summary>Random bytes: 64 MiB made on the host, copied over the buffer with a different start each time.</summary>
    private static void Fill(IBackend backend, IDeviceBuffer buffer, int seed)
    {
        const int Chunk = 64 << 20;
        byte[] random = new byte[Chunk];
        new Random(seed).NextBytes(random);
        using IDeviceBuffer staged = backend.Allocate(Chunk);
        backend.Upload(random, staged);
        using ICopyStream stream = backend.CreateStream();
        for (long at = 0, i = 0; at < buffer.Length; i++)
        {
            long skew = i * 4099 % 4096;
            long take = Math.Min(Chunk - skew, buffer.Length - at);
            stream.CopyAsync(buffer, at, staged, skew, take);
            at += take;
        }
        stream.Synchronize();
    }

    private static int? LayerOf(string tensor) =>
        LayerName().Match(tensor) is { Success: true } m ? int.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture) : null;

    [GeneratedRegex(@"\.layers\.(\d+)\.")]
    private static partial Regex LayerName();

    private static int Option(string[] args, string name, int fallback)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? int.Parse(args[i + 1], CultureInfo.InvariantCulture) : fallback;
    }

    private static int Usage()
    {
        Console.Error.WriteLine("usage: NcclSwap.Perf transfer LAYOUT [--tp M] [--destination D] [--layers N] [--bucket-mib B] [--runs R] [--host]");
        return 2;
    }
}

using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using NcclSwap.Cuda;
using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.Perf;

/// <summary>
/// A transfer plan through the executor on the local GPUs, against raw collectives of the same buckets (and, on one
/// GPU, device-to-device copies of them), all in the same run. With one GPU (<c>--gpus 1</c>), destination D's share
/// on one rank that sends to itself; with G GPUs, rank 0 on GPU 0 is the source and ranks 1..G-1 are destinations
/// D..D+G-2 of the plan, as a trainer and the GPUs of an engine. The first lines give the whole plan's figures: what
/// each destination receives against a broadcast of the whole model to every destination.
/// </summary>
internal static partial class TransferBenchmark
{
    public static int Run(string[] args)
    {
        if (args.Length == 0 || args[0].StartsWith('-'))
            return Usage();
        string path = args[0];
        int tp = Option(args, "--tp", 8), first = Option(args, "--destination", 0), layers = Option(args, "--layers", int.MaxValue);
        int runs = Option(args, "--runs", 3), gpus = Option(args, "--gpus", 1);
        long bucketBytes = Option(args, "--bucket-mib", 256) * (1L << 20);
        bool host = args.Contains("--host") || !CudaDriver.IsSupported || !NcclLibrary.IsSupported;
        int[] chosen = Enumerable.Range(first, Math.Max(1, gpus - 1)).ToArray();
        if (gpus < 1 || chosen[^1] >= tp)
        {
            Console.Error.WriteLine($"NcclSwap.Perf transfer: {gpus} GPU(s) from destination {first} need destinations {first}..{chosen[^1]}, but TP{tp} has 0..{tp - 1}");
            return 2;
        }

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
        TransferPlan plan = TransferPlan.Create(layout, 1, tp, bucketBytes).ForDestinations(chosen);
        PlanRanks ranks = gpus == 1 ? new PlanRanks([0], [0]) : PlanRanks.Separate(plan);
        long bytes = plan.ReceivedBytes().Max();
        Console.WriteLine($"run: destination(s) {string.Join(", ", chosen)} of TP{tp} for {layout.Model}: {layout.TotalBytes:N0} bytes at the source, " +
            $"{bytes:N0} bytes to each destination at most, {plan.Transfers.Count(t => t.IsBroadcast)} broadcasts and {plan.Transfers.Count(t => !t.IsBroadcast)} sends in " +
            $"{plan.Transfers.Sum(t => t.Buckets.Buckets.Count)} buckets, {(gpus == 1 ? "one rank sending to itself" : $"source on rank 0, destinations on ranks 1..{gpus - 1}")}");

        using SwapGroup group = LocalGroup.Form(gpus, host);
        Console.WriteLine($"ranks: {string.Join("; ", group.Ranks.Select(r => $"{r.Rank} {r.Backend.Description}"))}{(host ? "" : $", NCCL {NcclLibrary.Version}")}");
        RankState[] state = group.RunOnEachRank(local => new RankState(plan, ranks, local));
        try
        {
            // Times work on every rank at once: from before the first rank starts until the last has finished.
            (double Seconds, TransferReport[] Reports) Timed(Func<RankState, TransferReport?> work)
            {
                var timer = Stopwatch.StartNew();
                TransferReport?[] reports = group.RunOnEachRank(local => work(state[local.Rank]));
                return (timer.Elapsed.TotalSeconds, reports.Select(r => r!).ToArray());
            }
            string Phases(TransferReport report) => string.Join(", ", report.Phases.Select(p => $"{p.Key} {p.Value:0.0} ms"));

            var (firstRun, _) = Timed(s => s.Last = s.Searching.Run(s.Source, s.Destination));
            Console.WriteLine($"first run (makes the links): {firstRun * 1e3:0.0} ms, every digest matched");
            Timed(s => s.Everything.Run(s.Source, s.Destination));

            // Every bucket moves (the destinations hold other bytes): with the search for unchanged buckets, and without
            // it (as for full fine-tuning, where every tensor changes every version).
            double best = double.MaxValue, bestSearching = double.MaxValue;
            for (int run = 0; run < runs; run++)
                foreach (bool searching in new[] { true, false })
                {
                    Timed(s => s.FillDestination(3 + run));
                    var (seconds, reports) = Timed(s => searching ? s.Last = s.Searching.Run(s.Source, s.Destination, s.Last) : s.Everything.Run(s.Source, s.Destination));
                    if (searching)
                        bestSearching = Math.Min(bestSearching, seconds);
                    else
                        best = Math.Min(best, seconds);
                    TransferReport source = reports[ranks.Sources[0]];
                    Console.WriteLine($"  full update {run + 1}{(searching ? ", looking for unchanged buckets" : "")}: {seconds * 1e3:0.0} ms, {source.Buckets} bucket deliveries, " +
                        $"{bytes / seconds / 1e9:0.0} GB/s to each destination (source: {Phases(source)})" +
                        (gpus > 1 ? $" (rank {ranks.Destinations[0]}: {Phases(reports[ranks.Destinations[0]])})" : ""));
                }
            Timed(s => s.FillDestination(99));
            Timed(s => s.Last = s.Searching.Run(s.Source, s.Destination));
            var (unchanged, same) = Timed(s => s.Searching.Run(s.Source, s.Destination, s.Last));
            Console.WriteLine($"  nothing changed: {unchanged * 1e3:0.0} ms, {same[ranks.Sources[0]].Buckets} buckets moved, {same[ranks.Destinations[0]].Skipped} skipped at rank {ranks.Destinations[0]}");

            // Raw: the same buckets as bare collectives (broadcasts on the same rank subsets, sends), and on one GPU as
            // device-to-device copies.
            double raw = double.MaxValue, copy = double.MaxValue;
            Timed(s => s.MakeRaw());
            for (int run = 0; run < runs + 1; run++)
            {
                var (seconds, _) = Timed(s => s.RawRun());
                if (run > 0)
                    raw = Math.Min(raw, seconds);
                if (gpus == 1)
                {
                    var timer = Stopwatch.StartNew();
                    state[0].CopyRun();
                    if (run > 0)
                        copy = Math.Min(copy, timer.Elapsed.TotalSeconds);
                }
            }

            (double Pack, double Digest) alone = (double.MaxValue, double.MaxValue);
            for (int run = 0; run < runs + 1; run++)
            {
                var (pack, digest) = state[ranks.Sources[0]].PackAndDigestRun();
                if (run > 0)
                    alone = (Math.Min(alone.Pack, pack), Math.Min(alone.Digest, digest));
            }

            int buckets = plan.Transfers.Sum(t => t.Buckets.Buckets.Count);
            Console.WriteLine($"at the source alone, every bucket: packed into staging {alone.Pack * 1e3:0.0} ms ({plan.Transfers.Sum(t => t.Bytes) / alone.Pack / 1e9:0.0} GB/s), " +
                $"digested {alone.Digest * 1e3:0.0} ms (each bucket waited for)");
            Console.WriteLine($"raw collectives of the same {buckets} buckets: {raw * 1e3:0.0} ms, {bytes / raw / 1e9:0.0} GB/s to each destination");
            if (gpus == 1)
                Console.WriteLine($"device-to-device copy of the same buckets: {copy * 1e3:0.0} ms, {bytes / copy / 1e9:0.0} GB/s");
            Console.WriteLine($"update (best of {runs}): {best * 1e3:0.0} ms, {bytes / best / 1e9:0.0} GB/s = {raw / best:0.00} of the raw collective rate" +
                (gpus == 1 ? $", {copy / best:0.00} of the copy rate" : ""));
            Console.WriteLine($"update looking for unchanged buckets (best of {runs}): {bestSearching * 1e3:0.0} ms = {raw / bestSearching:0.00} of the raw collective rate; " +
                $"an unchanged model {unchanged * 1e3:0.0} ms");
        }
        finally
        {
            foreach (RankState s in state)
                s.Dispose();
        }
        return 0;
    }

    /// <summary>One rank's regions, executors and raw-collective buffers.</summary>
    private sealed class RankState : IDisposable
    {
        private readonly TransferPlan _plan;
        private readonly PlanRanks _ranks;
        private readonly SwapGroup.LocalRank _local;
        private readonly Dictionary<string, ICollective?> _subsets = [];
        private IDeviceBuffer? _from, _to;
        private ICopyStream? _stream;
        private IDeviceEvent? _done;
        private long _largest;

        public RankState(TransferPlan plan, PlanRanks ranks, SwapGroup.LocalRank local)
        {
            _plan = plan;
            _ranks = ranks;
            _local = local;
            int source = ranks.Sources.ToList().IndexOf(local.Rank), destination = ranks.Destinations.ToList().IndexOf(local.Rank);
            if (source >= 0)
            {
                Source = local.Backend.Allocate(plan.SourceLayout().Length);
                RandomBytes.Fill(local.Backend, Source, seed: 1);
            }
            if (destination >= 0)
            {
                Destination = local.Backend.Allocate(plan.DestinationLayout(destination).Length);
                FillDestination(2);
            }
            Searching = new PlanExecutor(plan, local.Backend, local.Collective, ranks);
            Everything = new PlanExecutor(plan, local.Backend, local.Collective, ranks) { SkipUnchanged = false };
        }

        public IDeviceBuffer? Source { get; }

        public IDeviceBuffer? Destination { get; }

        public PlanExecutor Searching { get; }

        public PlanExecutor Everything { get; }

        public TransferReport? Last { get; set; }

        public TransferReport? FillDestination(int seed)
        {
            if (Destination is not null)
                RandomBytes.Fill(_local.Backend, Destination, seed);
            return null;
        }

        /// <summary>Buffers for two buckets each way, and the subsets the plan broadcasts on (a collective call: every rank at once).</summary>
        public TransferReport? MakeRaw()
        {
            _largest = _plan.Transfers.SelectMany(t => t.Buckets.Buckets).Max(b => b.Bytes);
            _from = _local.Backend.Allocate(_largest * 2);
            _to = _local.Backend.Allocate(_largest * 2);
            RandomBytes.Fill(_local.Backend, _from, seed: 9);
            _stream = _local.Backend.CreateStream();
            _done = _local.Backend.CreateEvent();
            foreach (Transfer t in _plan.Transfers.Where(t => t.IsBroadcast))
            {
                string key = string.Join(",", Members(t));
                if (!_subsets.ContainsKey(key))
                    _subsets[key] = _local.Collective.Subset(Members(t));
            }
            return null;
        }

        private int[] Members(Transfer t) => [_ranks.Sources[t.Source], .. t.Destinations.Select(d => _ranks.Destinations[d])];

        public TransferReport? RawRun()
        {
            int me = _local.Rank;
            foreach (Transfer t in _plan.Transfers)
            {
                int[] members = Members(t);
                for (int i = 0; i < t.Buckets.Buckets.Count; i++)
                {
                    long size = t.Buckets.Buckets[i].Bytes, at = i % 2 * _largest;
                    if (t.IsBroadcast)
                    {
                        if (_subsets[string.Join(",", members)] is { } subset)
                            subset.Broadcast(me == members[0] ? _from! : _to!, at, size, 0, _stream!);
                    }
                    else if (members[0] == members[1])
                    {
                        if (me == members[0])
                            using (_local.Collective.Group())
                            {
                                _local.Collective.Send(_from!, at, size, me, _stream!);
                                _local.Collective.Receive(_to!, at, size, me, _stream!);
                            }
                    }
                    else if (me == members[0])
                        _local.Collective.Send(_from!, at, size, members[1], _stream!);
                    else if (me == members[1])
                        _local.Collective.Receive(_to!, at, size, members[0], _stream!);
                }
            }
            _stream!.Record(_done!);
            _local.Collective.Wait(_done!, null, "raw collectives");
            return null;
        }

        /// <summary>
        /// A source's packing of its buckets into staging alone (no wire), as the executor packs those not sent in
        /// place, and the digests of the packed buckets alone (each batch waited for, as the executor does); seconds of each.
        /// </summary>
        public (double Pack, double Digest) PackAndDigestRun()
        {
            RegionLayout layout = _plan.SourceLayout();
            var clock = Stopwatch.StartNew();
            int i = 0;
            foreach (Transfer t in _plan.Transfers)
                for (int b = 0; b < t.Buckets.Buckets.Count; b++, i++)
                {
                    long at = i % 2 * _largest;
                    _stream!.CopyAsync(_to!, Source!, TransferPlan.PackCopies(t, b, layout).Select(c => c with { To = c.To + at }).ToList());
                }
            _stream!.Synchronize();
            double pack = clock.Elapsed.TotalSeconds;
            clock.Restart();
            i = 0;
            foreach (Transfer t in _plan.Transfers)
                for (int b = 0; b < t.Buckets.Buckets.Count; b++, i++)
                {
                    long at = i % 2 * _largest;
                    _local.Backend.Digests(_to!, TransferPlan.Pieces(t, b).Select(p => (p.Offset + at, p.Length)).ToList());
                }
            return (pack, clock.Elapsed.TotalSeconds);
        }

        /// <summary>The same buckets as device-to-device copies on this rank's GPU.</summary>
        public void CopyRun()
        {
            int i = 0;
            foreach (long size in _plan.Transfers.SelectMany(t => t.Buckets.Buckets).Select(b => b.Bytes))
            {
                _stream!.CopyAsync(_to!, i % 2 * _largest, _from!, i % 2 * _largest, size);
                i++;
            }
            _stream!.Synchronize();
        }

        public void Dispose()
        {
            foreach (ICollective? subset in _subsets.Values)
                subset?.Dispose();
            _done?.Dispose();
            _stream?.Dispose();
            _from?.Dispose();
            _to?.Dispose();
            Searching.Dispose();
            Everything.Dispose();
            Source?.Dispose();
            Destination?.Dispose();
        }
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
        Console.Error.WriteLine("usage: NcclSwap.Perf transfer LAYOUT [--tp M] [--destination D] [--gpus G] [--layers N] [--bucket-mib B] [--runs R] [--host]");
        return 2;
    }
}

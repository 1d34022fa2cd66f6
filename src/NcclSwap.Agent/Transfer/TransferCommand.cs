using System.CommandLine;
using System.Diagnostics;
using System.Runtime.InteropServices;
using NcclSwap.ControlPlane;
using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.Agent.Transfer;

/// <summary>
/// <c>nccl-swap transfer --group FILE --member M --layout FILE --tp N [--sources S] [--versions K] [--agent SOCKET --weight-set NAME]</c>:
/// this member's part of a swap group moving versions of a model by its transfer plan. Source ranks send synthetic
/// versions 1..K of the layout's tensors; destination ranks receive their share and either publish it to the local
/// agent (with <c>--agent</c>) or report a hash of what they hold. After a failed update the group forms again for the
/// next one; the exit code is 3 when any update failed.
/// </summary>
internal static class TransferCommand
{
    public static Command Create(TextWriter output, TextWriter error)
    {
        var group = new Option<string>("--group") { Description = "The swap group's configuration (nccl-swap-group/1): root address, members and their devices.", Required = true };
        var member = new Option<int>("--member") { Description = "Which member of the group this process is (0 runs the rendezvous).", Required = true };
        var layout = new Option<string>("--layout") { Description = "The model's layout file (perf/layouts/*.json).", Required = true };
        var tp = new Option<int>("--tp") { Description = "Destination ranks: the tensor-parallel degree of the engine they form.", Required = true };
        var sources = new Option<int>("--sources") { Description = "Source ranks: the group's first S ranks.", DefaultValueFactory = _ => 1 };
        var bucket = new Option<int>("--bucket-mib") { Description = "Bucket size in MiB.", DefaultValueFactory = _ => 256 };
        var versions = new Option<int>("--versions") { Description = "Updates to run: versions 1..K.", DefaultValueFactory = _ => 1 };
        var backend = new Option<string>("--backend") { Description = "auto (CUDA when a GPU is usable), cuda or host.", DefaultValueFactory = _ => "auto" };
        var agent = new Option<string?>("--agent") { Description = "Destinations publish each version to the agent listening on this socket." };
        var weightSet = new Option<string?>("--weight-set") { Description = "With --agent: the weight set the destinations publish." };
        var command = new Command("transfer", "Run this member's ranks of a swap group: send or receive versions of a model by its transfer plan.")
            { group, member, layout, tp, sources, bucket, versions, backend, agent, weightSet };
        command.SetAction(result => Run(new Arguments(result.GetValue(group)!, result.GetValue(member), result.GetValue(layout)!, result.GetValue(tp),
            result.GetValue(sources), result.GetValue(bucket), result.GetValue(versions), result.GetValue(backend)!, result.GetValue(agent), result.GetValue(weightSet)), output, error));
        return command;
    }

    internal sealed record Arguments(string Group, int Member, string Layout, int Tp, int Sources, int BucketMiB, int Versions, string Backend, string? Agent, string? WeightSet);

    internal static int Run(Arguments args, TextWriter output, TextWriter error)
    {
        if (args.Tp < 1 || args.Sources < 1 || args.BucketMiB < 1 || args.Versions < 1)
        {
            error.WriteLine($"nccl-swap transfer: --tp ({args.Tp}), --sources ({args.Sources}), --bucket-mib ({args.BucketMiB}) and --versions ({args.Versions}) must be at least 1");
            return 2;
        }
        if ((args.Agent is null) != (args.WeightSet is null))
        {
            error.WriteLine("nccl-swap transfer: --agent and --weight-set go together");
            return 2;
        }
        SwapGroupConfig config;
        TransferPlan plan;
        try
        {
            config = SwapGroupConfig.Load(args.Group);
            plan = TransferPlan.Create(ModelLayout.Load(args.Layout), args.Sources, args.Tp, args.BucketMiB * (1L << 20));
        }
        catch (Exception e) when (e is FormatException or LayoutException or IOException)
        {
            error.WriteLine($"nccl-swap transfer: {e.Message}");
            return 1;
        }
        if (config.Size != args.Sources + args.Tp)
        {
            error.WriteLine($"nccl-swap transfer: the group '{config.Name}' has {config.Size} ranks; {args.Sources} source(s) and TP{args.Tp} need {args.Sources + args.Tp}");
            return 2;
        }
        if ((uint)args.Member >= (uint)config.Members.Count)
        {
            error.WriteLine($"nccl-swap transfer: the group '{config.Name}' has members 0..{config.Members.Count - 1}, not {args.Member}");
            return 2;
        }

        var ranks = PlanRanks.Separate(plan);
        int failed = 0;
        SwapGroup? group = null;
        List<RankWork> work = [];
        var reports = new Dictionary<int, TransferReport>();
        // A destination's registration with its agent outlives the groups: one publisher for every version.
        var publishers = new Dictionary<int, ReceivingPublisher.Registration>();
        void Disband()
        {
            work.ForEach(w => w.Dispose());
            work.Clear();
            group?.Dispose();
            group = null;
        }
        try
        {
            for (ulong version = 1; version <= (ulong)args.Versions; version++)
            {
                try
                {
                    if (group is null || group.IsBroken)
                    {
                        Disband();
                        group = SwapGroup.Form(config, args.Member, device => Backend.Create(args.Backend, device));
                        output.WriteLine($"nccl-swap transfer: member {args.Member} of '{config.Name}' joined with rank(s) {string.Join(", ", group.Ranks.Select(r => r.Rank))} ({group.Ranks[0].Backend.Description})");
                        // Kept while the group lives: staging, split communicators, and a destination's registration with its agent.
                        work = group.Ranks.Select(local => new RankWork(local, plan, ranks, args, publishers)).ToList();
                    }
                    ulong v = version;
                    TransferReport[] done = group.RunOnEachRank(local => work.Single(w => w.Local == local).Run(v, reports.GetValueOrDefault(local.Rank), output));
                    foreach (TransferReport report in done)
                        reports[report.Rank] = report;
                }
                catch (Exception e) when (e is CollectiveException or InvalidDataException or InvalidOperationException or ChannelClosedException)
                {
                    failed++;
                    error.WriteLine($"nccl-swap transfer: version {version} failed: {e.Message}");
                    reports.Clear(); // what destinations hold is not known now: nothing is skipped next time on a source's word
                    group?.Abort("the update failed");
                }
            }
        }
        finally
        {
            Disband();
            foreach (ReceivingPublisher.Registration publisher in publishers.Values)
                publisher.Dispose();
        }
        return failed == 0 ? 0 : 3;
    }

    /// <summary>One local rank's part of every update while the group lives: its region and executor, or its receiving publisher.</summary>
    private sealed class RankWork : IDisposable
    {
        private readonly TransferPlan _plan;
        private readonly int _source, _destination;
        private readonly RegionLayout? _layout;
        private readonly IDeviceBuffer? _region;
        private readonly PlanExecutor? _executor;
        private readonly ReceivingPublisher? _receiver;
        private readonly string? _agent;

        public RankWork(SwapGroup.LocalRank local, TransferPlan plan, PlanRanks ranks, Arguments args, Dictionary<int, ReceivingPublisher.Registration> publishers)
        {
            Local = local;
            _plan = plan;
            _source = ranks.Sources.ToList().IndexOf(local.Rank);
            _destination = ranks.Destinations.ToList().IndexOf(local.Rank);
            if (_source < 0 && args.Agent is not null)
            {
                _agent = args.Agent;
                // On a GPU the share is received into device memory of the rank's own, which the agent opens through CUDA IPC.
                if (!publishers.TryGetValue(local.Rank, out ReceivingPublisher.Registration? publisher))
                    publishers[local.Rank] = publisher = ReceivingPublisher.Register(args.Agent, args.WeightSet!, plan, _destination, Backend.Create(local.Backend.Kind, local.Device));
                _receiver = ReceivingPublisher.Over(publisher, plan, ranks, _destination, local.Backend, local.Collective);
                return;
            }
            _layout = _source >= 0 ? plan.SourceLayout() : plan.DestinationLayout(_destination);
            _region = local.Backend.Allocate(_layout.Length);
            _executor = new PlanExecutor(plan, local.Backend, local.Collective, ranks);
        }

        public SwapGroup.LocalRank Local { get; }

        /// <summary>One update; prints a line with what this rank moved.</summary>
        public TransferReport Run(ulong version, TransferReport? previous, TextWriter output)
        {
            var clock = Stopwatch.StartNew();
            TransferReport report;
            string detail;
            if (_source >= 0)
            {
                Fill(Local.Backend, _region!, _layout!, version);
                clock.Restart();
                report = _executor!.Run(_region!, previous, version);
                detail = $"source {_source}: sent";
            }
            else if (_receiver is not null)
            {
                report = _receiver.Receive();
                detail = $"destination {_destination}: published to {_agent} ({_receiver.LastPublish}), received";
            }
            else
            {
                report = _executor!.Run(_region!);
                detail = $"destination {_destination}: holds hash {Hash(Local.Backend, _region!, _layout!):x16}, received";
            }
            // The first exchange waits for every rank to start (a destination still checking its last version, a source
            // still writing this one): that wait is reported apart, and the rate is over the rest.
            double waited = report.Phases.GetValueOrDefault("meet") / 1e3;
            double seconds = clock.Elapsed.TotalSeconds - waited;
            lock (output)
                output.WriteLine($"version {report.Version}: rank {Local.Rank} {detail} {report.Bytes / 1e9:0.000} GB in {report.Buckets} bucket(s), " +
                    $"{report.Skipped} skipped, {report.Resent} re-sent, {seconds * 1e3:0.0} ms ({report.Bytes / Math.Max(seconds, 1e-9) / 1e9:0.0} GB/s) " +
                    $"after {waited * 1e3:0.0} ms waiting for the group; {string.Join(", ", report.Phases.Where(p => p.Key != "meet" && !p.Key.Contains(':')).Select(p => $"{p.Key} {p.Value:0.0} ms"))}");
            return report;
        }

        public void Dispose()
        {
            _receiver?.Dispose();
            _executor?.Dispose();
            _region?.Dispose();
        }
    }

    /// <summary>Version <paramref name="version"/> of every tensor (<see cref="SyntheticModel.Fill(ulong, RegionLayout, nint)"/>), made in host memory and uploaded.</summary>
    private static unsafe void Fill(IBackend backend, IDeviceBuffer region, RegionLayout layout, ulong version)
    {
        nint host = (nint)NativeMemory.AllocZeroed((nuint)layout.Length);
        try
        {
            SyntheticModel.Fill(version, layout, host);
            for (long at = 0; at < layout.Length; at += 1L << 30)
                backend.Upload(new ReadOnlySpan<byte>((byte*)host + at, (int)Math.Min(1L << 30, layout.Length - at)), region, at);
        }
        finally
        {
            NativeMemory.Free((void*)host);
        }
    }

    /// <summary><see cref="SyntheticModel.Hash"/> of what a destination holds.</summary>
    internal static unsafe ulong Hash(IBackend backend, IDeviceBuffer region, RegionLayout layout)
    {
        nint host = (nint)NativeMemory.Alloc((nuint)Math.Max(layout.Length, 1));
        try
        {
            for (long at = 0; at < layout.Length; at += 1L << 30)
                backend.Download(region, at, new Span<byte>((byte*)host + at, (int)Math.Min(1L << 30, layout.Length - at)));
            return SyntheticModel.Hash(layout, host);
        }
        finally
        {
            NativeMemory.Free((void*)host);
        }
    }
}

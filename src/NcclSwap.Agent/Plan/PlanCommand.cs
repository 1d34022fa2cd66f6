using System.CommandLine;
using NcclSwap.WeightSets;

namespace NcclSwap.Agent.Plan;

/// <summary><c>nccl-swap plan --layout FILE --sources N --tp M [--bucket-mib B] [--json [--parts]]</c>: the transfer plan of a layout.</summary>
internal static class PlanCommand
{
    public static Command Create(TextWriter output, TextWriter error)
    {
        var layout = new Option<string>("--layout") { Description = "A layout file: the model's tensors and how tensor-parallel engines split them (perf/layouts/*.json).", Required = true };
        var sources = new Option<int>("--sources") { Description = "Source ranks (trainers that can send every tensor).", DefaultValueFactory = _ => 1 };
        var tp = new Option<int>("--tp") { Description = "Destination ranks: one tensor-parallel engine of M GPUs.", Required = true };
        var bucket = new Option<int>("--bucket-mib") { Description = "Bucket size in MiB.", DefaultValueFactory = _ => 256 };
        var json = new Option<bool>("--json") { Description = "Print the plan as JSON: destinations (each with bytes), sources, broadcast_bytes, transfers." };
        var parts = new Option<bool>("--parts") { Description = "With --json: every transfer's tensor parts too." };
        var command = new Command("plan", "Compute which bytes each source sends to which destinations for a model's layout, and compare with a broadcast of everything.")
            { layout, sources, tp, bucket, json, parts };
        command.SetAction(result => Run(result.GetValue(layout)!, result.GetValue(sources), result.GetValue(tp), result.GetValue(bucket),
            result.GetValue(json), result.GetValue(parts), output, error));
        return command;
    }

    internal static int Run(string path, int sources, int tp, int bucketMiB, bool json, bool parts, TextWriter output, TextWriter error)
    {
        if (sources < 1 || tp < 1 || bucketMiB < 1)
        {
            error.WriteLine($"nccl-swap plan: --sources ({sources}), --tp ({tp}) and --bucket-mib ({bucketMiB}) must be at least 1");
            return 2;
        }
        TransferPlan plan;
        try
        {
            plan = TransferPlan.Create(ModelLayout.Load(path), sources, tp, bucketMiB * (1L << 20));
        }
        catch (LayoutException e)
        {
            error.WriteLine($"nccl-swap plan: {e.Message}");
            return 1;
        }
        if (json)
        {
            output.WriteLine(plan.ToJson(parts));
            return 0;
        }
        long[] received = plan.ReceivedBytes(), needed = plan.NeededBytes(), sent = plan.SentBytes();
        long model = plan.Layout.TotalBytes;
        output.WriteLine($"{plan.Layout.Model}: {plan.Layout.Tensors.Count} tensors, {Gb(model)}; {sources} source(s) → TP{tp}, buckets of {bucketMiB} MiB");
        output.WriteLine($"transfers: {plan.Transfers.Count(t => t.IsBroadcast)} broadcast(s), {plan.Transfers.Count(t => !t.IsBroadcast)} send(s); {plan.Transfers.Sum(t => t.Buckets.Buckets.Count)} buckets");
        for (int r = 0; r < tp; r++)
            output.WriteLine($"  destination {r}: receives {Gb(received[r])} (needs {Gb(needed[r])}) = {received[r] / (double)model:0.000} of the model");
        for (int s = 0; s < sources; s++)
            output.WriteLine($"  source {s}: sends {Gb(sent[s])}");
        output.WriteLine($"a broadcast of everything to every destination: {Gb(model)} per destination, {Gb(plan.BroadcastBytes)} in all; " +
            $"this plan: {Gb(received.Max())} at most per destination ({received.Max() / (double)model:0.000} of that)");
        return 0;
    }

    private static string Gb(long bytes) => $"{bytes / 1e9:0.00} GB";
}

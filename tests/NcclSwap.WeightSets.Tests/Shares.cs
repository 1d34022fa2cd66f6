using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.Testing;

/// <summary>What a destination must hold after a transfer, made on the CPU with the plan's own pack and unpack runs (linked into the agent and control-plane tests).</summary>
internal static class Shares
{
    public static byte[] Of(TransferPlan plan, byte[] model, int destination)
    {
        RegionLayout source = plan.SourceLayout(), layout = plan.DestinationLayout(destination);
        byte[] held = new byte[layout.Length];
        foreach (Transfer t in plan.Transfers.Where(t => t.Destinations.Contains(destination)))
            for (int b = 0; b < t.Buckets.Buckets.Count; b++)
            {
                byte[] bucket = new byte[t.Buckets.Buckets[b].Bytes];
                foreach (CopyRun run in TransferPlan.PackRuns(t, b, source))
                    model.AsSpan((int)run.From, (int)run.Bytes).CopyTo(bucket.AsSpan((int)run.To));
                foreach (CopyRun run in TransferPlan.UnpackRuns(t, b, layout))
                    bucket.AsSpan((int)run.From, (int)run.Bytes).CopyTo(held.AsSpan((int)run.To));
            }
        return held;
    }
}

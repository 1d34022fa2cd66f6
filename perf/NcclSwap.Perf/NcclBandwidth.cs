using System.Diagnostics;
using System.Globalization;
using NcclSwap.Cuda;
using NcclSwap.DataPlane;

namespace NcclSwap.Perf;

/// <summary>
/// Raw collective bandwidth between the local GPUs through the project's own bindings, one rank per GPU in one
/// process: a broadcast from rank 0, a send/receive ring (each rank sends to the next and receives from the one
/// before), and rank 0 sending to every other rank at once (a trainer feeding its engines). Buffers of random bytes,
/// two warm-ups, then the median of the runs; a run's time is the slowest rank's, each rank timing from a common
/// start to its own completion. Bus bandwidth as nccl-tests defines it (for these three, the algorithm bandwidth).
/// </summary>
internal static class NcclBandwidth
{
    public static int Run(string[] args)
    {
        bool host = args.Contains("--host") || !CudaDriver.IsSupported || !NcclLibrary.IsSupported;
        int gpus = Option(args, "--gpus", host ? 2 : CudaDriver.DeviceCount), runs = Option(args, "--runs", 10);
        long bytes = (long)(double.Parse(OptionText(args, "--gib") ?? "1", CultureInfo.InvariantCulture) * (1L << 30));
        if (gpus < 2)
        {
            Console.Error.WriteLine($"NcclSwap.Perf nccl: needs 2 or more ranks (--gpus {gpus}); this machine has {(host ? "no GPU" : $"{CudaDriver.DeviceCount} GPU(s)")}");
            return 2;
        }
        using SwapGroup group = LocalGroup.Form(gpus, host);
        Console.WriteLine($"{gpus} ranks: {string.Join("; ", group.Ranks.Select(r => $"rank {r.Rank} {r.Backend.Description}"))}{(host ? "" : $", NCCL {NcclLibrary.Version}")}");
        var pieces = group.Ranks.Select(r => new Piece(r.Backend, bytes)).ToArray();
        try
        {
            var barrier = new Barrier(gpus);
            Report("broadcast from rank 0", bytes, Time(group, barrier, runs, pieces, (local, piece) =>
                local.Collective.Broadcast(piece.Send, 0, bytes, 0, piece.Stream)));
            Report("send/receive ring (rank r to r+1)", bytes, Time(group, barrier, runs, pieces, (local, piece) =>
            {
                using (local.Collective.Group())
                {
                    local.Collective.Send(piece.Send, 0, bytes, (local.Rank + 1) % gpus, piece.Stream);
                    local.Collective.Receive(piece.Receive, 0, bytes, (local.Rank + gpus - 1) % gpus, piece.Stream);
                }
            }));
            Report($"sends from rank 0 to each of the {gpus - 1} other(s) at once", bytes, Time(group, barrier, runs, pieces, (local, piece) =>
            {
                using (local.Collective.Group())
                {
                    if (local.Rank == 0)
                        for (int peer = 1; peer < gpus; peer++)
                            local.Collective.Send(piece.Send, 0, bytes, peer, piece.Stream);
                    else
                        local.Collective.Receive(piece.Receive, 0, bytes, 0, piece.Stream);
                }
            }), fanOut: gpus - 1);
        }
        finally
        {
            foreach (Piece piece in pieces)
                piece.Dispose();
        }
        return 0;
    }

    private static void Report(string what, long bytes, double seconds, int fanOut = 1)
    {
        double algbw = bytes / seconds / 1e9;
        Console.WriteLine($"{what}, {bytes / (double)(1L << 30):0.##} GiB: {seconds * 1e3:0.00} ms, algbw {algbw:0.0} GB/s, busbw {algbw:0.0} GB/s" +
            (fanOut > 1 ? $" per receiver, {algbw * fanOut:0.0} GB/s out of rank 0" : ""));
    }

    /// <summary>Median over <paramref name="runs"/> (after two warm-ups) of the slowest rank's time for <paramref name="issue"/>.</summary>
    private static double Time(SwapGroup group, Barrier barrier, int runs, Piece[] pieces, Action<SwapGroup.LocalRank, Piece> issue)
    {
        double[][] times = group.RunOnEachRank(local =>
        {
            Piece piece = pieces[local.Rank]; // one member: rank r is local rank r
            var mine = new double[runs + 2];
            for (int run = 0; run < mine.Length; run++)
            {
                barrier.SignalAndWait();
                long start = Stopwatch.GetTimestamp();
                issue(local, piece);
                piece.Stream.Record(piece.Done);
                local.Collective.Wait(piece.Done, null, "a raw collective");
                mine[run] = Stopwatch.GetElapsedTime(start).TotalSeconds;
            }
            return mine;
        });
        return LocalGroup.Median(Enumerable.Range(2, runs).Select(run => times.Max(rank => rank[run])));
    }

    /// <summary>A rank's buffers (random bytes to send), stream and event.</summary>
    private sealed class Piece : IDisposable
    {
        public Piece(IBackend backend, long bytes)
        {
            Send = backend.Allocate(bytes);
            Receive = backend.Allocate(bytes);
            Stream = backend.CreateStream();
            Done = backend.CreateEvent();
            RandomBytes.Fill(backend, Send, seed: 7);
        }

        public IDeviceBuffer Send { get; }

        public IDeviceBuffer Receive { get; }

        public ICopyStream Stream { get; }

        public IDeviceEvent Done { get; }

        public void Dispose()
        {
            Done.Dispose();
            Stream.Dispose();
            Receive.Dispose();
            Send.Dispose();
        }
    }

    internal static string? OptionText(string[] args, string name)
    {
        int i = Array.IndexOf(args, name);
        return i >= 0 && i + 1 < args.Length ? args[i + 1] : null;
    }

    internal static int Option(string[] args, string name, int fallback) =>
        OptionText(args, name) is { } text ? int.Parse(text, CultureInfo.InvariantCulture) : fallback;
}

using System.Diagnostics;
using System.Globalization;
using NcclSwap.Cuda;
using NcclSwap.WeightSets;

namespace NcclSwap.Perf;

/// <summary>
/// Loads a sharded checkpoint into pinned memory with the parallel loader, against one thread reading the
/// same files sequentially into one reused buffer, in the same run. The checkpoint is written first (random
/// BF16 tensors), so both read from the page cache unless the machine dropped it; each is run twice and the
/// better run is reported.
/// </summary>
internal static class LoadBenchmark
{
    public static int Run(string[] args)
    {
        double gib = double.Parse(args.ElementAtOrDefault(0) ?? "4", CultureInfo.InvariantCulture);
        int shards = int.Parse(args.ElementAtOrDefault(1) ?? "8", CultureInfo.InvariantCulture);
        string folder = Directory.CreateTempSubdirectory("nccl-swap-load-").FullName;
        try
        {
            long perShard = (long)(gib * (1L << 30) / shards) / 2 * 2;
            var weightMap = new Dictionary<string, string>();
            byte[] data = new byte[checked((int)Math.Min(perShard, 1L << 30))];
            new Random(3).NextBytes(data);
            for (int s = 0; s < shards; s++)
            {
                string name = $"model-{s + 1:00000}-of-{shards:00000}.safetensors";
                var tensors = new List<TensorData>();
                for (long done = 0, i = 0; done < perShard; i++)
                {
                    long bytes = Math.Min(data.Length, perShard - done);
                    tensors.Add(new TensorData($"layer.{s}.{i}", Dtype.Parse("BF16"), [bytes / 2], data.AsMemory(0, (int)bytes)));
                    weightMap[$"layer.{s}.{i}"] = name;
                    done += bytes;
                }
                SafetensorsWriter.Write(Path.Combine(folder, name), tensors);
            }
            File.WriteAllText(Path.Combine(folder, Checkpoint.IndexFileName),
                "{\"weight_map\": {" + string.Join(", ", weightMap.Select(kv => $"\"{kv.Key}\": \"{kv.Value}\"")) + "}}");

            Checkpoint checkpoint = Checkpoint.Open(folder);
            long total = checkpoint.Files.Sum(f => f.DataLength);
            double sequential = Enumerable.Range(0, 2).Max(_ => SequentialRead(checkpoint));
            using CudaContext? context = CudaDriver.IsSupported ? CudaContext.Retain(0) : null;
            Func<long, PinnedBuffer> allocate = context is null ? PinnedBuffer.AllocatePageable : n => PinnedBuffer.Allocate(context, n);
            using var pool = new PinnedBufferPool(allocate, maxRetainedBytes: 2 * total);
            double first, pooled;
            using (LoadedCheckpoint l = CheckpointLoader.Load(checkpoint, pool))
                first = l.BytesPerSecond; // allocates (and so page-locks or faults in) every buffer
            pooled = Enumerable.Range(0, 2).Max(_ =>
            {
                using LoadedCheckpoint l = CheckpointLoader.Load(checkpoint, pool);
                return l.BytesPerSecond;
            });
            Console.WriteLine($"{total / 1e9:0.00} GB in {shards} shards, {Environment.ProcessorCount} cores, {(context is null ? "pageable (no GPU)" : "pinned by CUDA")} buffers, page cache warm:");
            Console.WriteLine($"  sequential read, one thread, one reused 16 MiB buffer: {sequential / 1e9:0.00} GB/s");
            Console.WriteLine($"  CheckpointLoader, buffers from the pool:  {pooled / 1e9:0.00} GB/s = {pooled / sequential:0.00} x the sequential read");
            Console.WriteLine($"  CheckpointLoader, first load, allocating: {first / 1e9:0.00} GB/s = {first / sequential:0.00} x the sequential read");
            return 0;
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    private static double SequentialRead(Checkpoint checkpoint)
    {
        byte[] buffer = new byte[16 << 20];
        var clock = Stopwatch.StartNew();
        long total = 0;
        foreach (SafetensorsFile file in checkpoint.Files)
        {
            using var stream = new FileStream(file.Path, FileMode.Open, FileAccess.Read, FileShare.Read, 1, FileOptions.SequentialScan);
            stream.Position = file.DataStart;
            int read;
            while ((read = stream.Read(buffer)) > 0)
                total += read;
        }
        return total / clock.Elapsed.TotalSeconds;
    }
}

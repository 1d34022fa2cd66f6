using System.Globalization;
using NcclSwap.Cuda;
using NcclSwap.DataPlane;

namespace NcclSwap.Perf;

/// <summary>
/// GPU block digest of N GiB against a device-to-device copy of the same N GiB, both timed with CUDA events
/// in the same run. A digest reads each byte once, a copy reads and writes it, so the digest's ceiling is
/// about twice the copy's rate.
/// </summary>
internal static class GpuDigestBenchmark
{
    public static int Run(string[] args)
    {
        if (!CudaDriver.IsSupported)
        {
            Console.Error.WriteLine($"gpu-digest needs a GPU: {CudaDriver.UnsupportedReason?.Split('\n')[0]}");
            return 1;
        }
        long bytes = (long)(double.Parse(args.FirstOrDefault() ?? "4", CultureInfo.InvariantCulture) * (1L << 30));
        using var context = CudaContext.Retain(0);
        using var stream = CudaStream.Create(context);
        using var source = DeviceBuffer.Allocate(context, bytes);
        using var copy = DeviceBuffer.Allocate(context, bytes);
        using (var host = PinnedBuffer.Allocate(context, 1 << 30))
        {
            new Random(7).NextBytes(host.GetSpan(0, 1 << 30));
            for (long done = 0; done < bytes; done += 1 << 30)
                stream.CopyAsync(source, done, host, 0, Math.Min(1 << 30, bytes - done));
            stream.Synchronize();
        }
        using var digest = new GpuDigest(context);

        var d2d = CopyBenchmark.Time(context, stream, "D2D copy", bytes, 10, () => stream.CopyAsync(copy, 0, source, 0, bytes));
        GpuDigest.Pending pending = default;
        var gpu = CopyBenchmark.Time(context, stream, "GPU digest", bytes, 10, () => pending = digest.Enqueue(source, 0, bytes, stream));
        Digest result = pending.Result();

        using var check = PinnedBuffer.Allocate(context, bytes);
        stream.CopyAsync(check, 0, source, 0, bytes);
        stream.Synchronize();
        Digest cpu = default;
        double cpuSeconds = double.MaxValue;
        for (int run = 0; run < 3; run++) // the first run also JIT-compiles and tiers up the hashing code
        {
            var clock = System.Diagnostics.Stopwatch.StartNew();
            cpu = BlockDigest.Compute(check.Pointer, bytes);
            cpuSeconds = Math.Min(cpuSeconds, clock.Elapsed.TotalSeconds);
        }

        Console.WriteLine($"{context.Device.Name}, {bytes / (double)(1L << 30):0.#} GiB of random bytes:");
        Console.WriteLine($"  {d2d}");
        Console.WriteLine($"  {gpu} = {gpu.BytesPerSecond / d2d.BytesPerSecond:0.00} x the D2D copy rate (aim: >= 1.6)");
        Console.WriteLine($"  CPU digest of the same bytes, {Environment.ProcessorCount} cores, best of 3: {bytes / cpuSeconds / 1e9:0.0} GB/s");
        Console.WriteLine($"  digest {result} on the GPU, {cpu} on the CPU: {(result == cpu ? "equal" : "DIFFERENT")}");
        return result == cpu ? 0 : 1;
    }
}

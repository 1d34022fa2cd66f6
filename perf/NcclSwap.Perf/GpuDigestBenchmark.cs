using System.Globalization;
using NcclSwap.Cuda;
using NcclSwap.DataPlane;

namespace NcclSwap.Perf;

/// <summary>
/// GPU block digest of N GiB against a device-to-device copy of the same N GiB, then the batched copy kernel
/// and the copy that digests what it reads, all timed with CUDA events in the same run. A digest reads each
/// byte once, a copy reads and writes it, so the digest's ceiling is about twice the copy's rate, and a copy
/// that digests can reach the copy's.
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

        // One range cut into 256 MiB pieces, as a model's tensors would be; every figure includes the wait and the download of the roots.
        const long Piece = 256L << 20;
        var pieces = new List<(ulong Destination, ulong Source, long Length)>();
        for (long at = 0; at < bytes; at += Piece)
            pieces.Add((copy.At(at, Math.Min(Piece, bytes - at)), source.At(at, Math.Min(Piece, bytes - at)), Math.Min(Piece, bytes - at)));
        var d2d = CopyBenchmark.Time(context, stream, "D2D copy (cuMemcpy)", bytes, 10, () => stream.CopyAsync(copy, 0, source, 0, bytes));
        Digest result = default;
        var gpu = CopyBenchmark.Time(context, stream, "GPU digest", bytes, 10, () => result = digest.Compute(source, 0, bytes, stream));
        var kernelCopy = CopyBenchmark.Time(context, stream, "copy kernel, 256 MiB pieces in one launch", bytes, 10, () => digest.EnqueueCopy(pieces, stream));
        Digest[] fused = [];
        var copyAndDigest = CopyBenchmark.Time(context, stream, "copy + digest of what it read, one launch", bytes, 10, () => fused = digest.CopyAndDigest(pieces, stream));

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
        Console.WriteLine($"  {kernelCopy}: {d2d.MedianMilliseconds / kernelCopy.MedianMilliseconds:0.00} x the D2D copy rate");
        Console.WriteLine($"  {copyAndDigest}: {d2d.MedianMilliseconds / copyAndDigest.MedianMilliseconds:0.00} x the D2D copy rate (aim: >= 0.9)");
        bool piecesEqual = fused.SequenceEqual(digest.Compute(pieces.Select(p => (copy, (long)(p.Destination - copy.Address), p.Length)).ToList(), stream));
        Console.WriteLine($"  the copy's digests equal those of its destination: {piecesEqual}");
        Console.WriteLine($"  CPU digest of the same bytes, {Environment.ProcessorCount} cores, best of 3: {bytes / cpuSeconds / 1e9:0.0} GB/s");
        Console.WriteLine($"  digest {result} on the GPU, {cpu} on the CPU: {(result == cpu ? "equal" : "DIFFERENT")}");
        return result == cpu && piecesEqual ? 0 : 1;
    }
}

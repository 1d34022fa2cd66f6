using NcclSwap.Cuda;

namespace NcclSwap.DataPlane;

/// <summary>Copy rates of one device, timed with CUDA events: the ceilings every transfer is compared with.</summary>
public static class CopyBenchmark
{
    /// <summary>The rate of one kind of copy: bytes moved per second (each byte counted once, not read plus write).</summary>
    public readonly record struct Rate(string Name, long Bytes, double MedianMilliseconds)
    {
        public double BytesPerSecond => Bytes / (MedianMilliseconds / 1000.0);

        public override string ToString() => $"{Name}: {BytesPerSecond / 1e9:0.0} GB/s ({Bytes / (double)(1 << 20):0} MiB in {MedianMilliseconds:0.000} ms, median)";
    }

    /// <summary>Pinned host to device, device to pinned host, and device to device copies of <paramref name="bytes"/>.</summary>
    public static IReadOnlyList<Rate> Measure(CudaContext context, long bytes, int repetitions = 10)
    {
        using var stream = CudaStream.Create(context);
        using var host = PinnedBuffer.Allocate(context, bytes);
        using var a = DeviceBuffer.Allocate(context, bytes);
        using var b = DeviceBuffer.Allocate(context, bytes);
        Random.Shared.NextBytes(host.GetSpan(0, (int)Math.Min(bytes, int.MaxValue)));
        return
        [
            Time(context, stream, "pinned H2D", bytes, repetitions, () => stream.CopyAsync(a, 0, host, 0, bytes)),
            Time(context, stream, "pinned D2H", bytes, repetitions, () => stream.CopyAsync(host, 0, a, 0, bytes)),
            Time(context, stream, "D2D", bytes, repetitions, () => stream.CopyAsync(b, 0, a, 0, bytes)),
        ];
    }

    /// <summary>Times <paramref name="enqueue"/> on <paramref name="stream"/>: two warm-up runs, then the median of <paramref name="repetitions"/>.</summary>
    public static Rate Time(CudaContext context, CudaStream stream, string name, long bytes, int repetitions, Action enqueue)
    {
        using var start = CudaEvent.CreateTiming(context);
        using var end = CudaEvent.CreateTiming(context);
        for (int i = 0; i < 2; i++)
            enqueue();
        stream.Synchronize();
        var times = new double[repetitions];
        for (int i = 0; i < repetitions; i++)
        {
            stream.Record(start);
            enqueue();
            stream.Record(end);
            end.Synchronize();
            times[i] = CudaEvent.ElapsedMilliseconds(start, end);
        }
        Array.Sort(times);
        return new Rate(name, bytes, times[repetitions / 2]);
    }
}

using System.IO.Hashing;
using BenchmarkDotNet.Attributes;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Reports;
using BenchmarkDotNet.Running;
using NcclSwap.DataPlane;

namespace NcclSwap.Perf;

/// <summary>The block digest on one core, and a plain one-shot XXH64 of the same bytes as the peer.</summary>
[MemoryDiagnoser]
public class CpuDigest
{
    private byte[] _data = [];

    [Params(64 << 20)]
    public int Bytes { get; set; }

    [GlobalSetup]
    public void Setup()
    {
        _data = new byte[Bytes];
        new Random(1).NextBytes(_data);
    }

    [Benchmark(Baseline = true)]
    public ulong PlainXxHash64() => XxHash64.HashToUInt64(_data);

    [Benchmark]
    public ulong BlockDigestOneCore() => BlockDigest.Compute(_data).Value;

    public static int Run(string[] args)
    {
        Summary summary = BenchmarkRunner.Run<CpuDigest>(DefaultConfig.Instance, args);
        foreach (BenchmarkReport report in summary.Reports)
        {
            if (report.ResultStatistics is null)
                continue;
            double seconds = report.ResultStatistics.Median / 1e9;
            int bytes = (int)report.BenchmarkCase.Parameters["Bytes"];
            Console.WriteLine($"{report.BenchmarkCase.Descriptor.WorkloadMethod.Name}: {bytes / seconds / 1e9:0.00} GB/s on one core ({Environment.ProcessorCount} cores, {System.Runtime.InteropServices.RuntimeInformation.ProcessArchitecture})");
        }
        return 0;
    }
}

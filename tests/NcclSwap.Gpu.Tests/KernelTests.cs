using System.Runtime.InteropServices;
using NcclSwap.Cuda;
using NcclSwap.Testing;

namespace NcclSwap.Gpu.Tests;

public class KernelTests
{
    [Fact]
    public void A_ptx_kernel_loads_launches_and_computes_what_the_cpu_does()
    {
        using CudaContext context = Gpu.RequireContext();
        using var module = CudaModule.LoadPtx(context, Gpu.SelfTestPtx());
        CudaKernel xor = module.GetKernel("xor_words");
        const int words = 1_000_003;
        byte[] data = TestData.Random(words * 4, seed: 41);
        uint value = 0x9E3779B9;
        using var buffer = DeviceBuffer.Allocate(context, words * 4);
        buffer.CopyFrom(data);
        using var stream = CudaStream.Create(context);
        xor.Launch((words + 255) / 256, 256, stream, new KernelArguments().Add(buffer.Address).Add(value).Add((ulong)words));
        stream.Synchronize();

        byte[] gpu = new byte[words * 4];
        buffer.CopyTo(gpu);
        uint[] expected = MemoryMarshal.Cast<byte, uint>(data).ToArray();
        for (int i = 0; i < expected.Length; i++)
            expected[i] ^= value;
        Assert.True(MemoryMarshal.AsBytes(expected.AsSpan()).SequenceEqual(gpu));
    }

    [Fact]
    public void Timing_events_measure_device_time()
    {
        using CudaContext context = Gpu.RequireContext();
        using var module = CudaModule.LoadPtx(context, Gpu.SelfTestPtx());
        CudaKernel spin = module.GetKernel("spin");
        using var stream = CudaStream.Create(context);
        using var start = CudaEvent.CreateTiming(context);
        using var end = CudaEvent.CreateTiming(context);
        stream.Record(start);
        spin.Launch(1, 1, stream, new KernelArguments().Add(Gpu.SpinCycles(100)));
        stream.Record(end);
        Assert.False(end.IsComplete); // the host did not wait for the kernel
        end.Synchronize();
        float ms = CudaEvent.ElapsedMilliseconds(start, end);
        Assert.InRange(ms, 100f, 5000f);
    }
}

using NcclSwap.Cuda;
using NcclSwap.Testing;

namespace NcclSwap.Gpu.Tests;

[Collection(GpuExclusive.Name)] // it times a running kernel: a test that pins host memory meanwhile can hold the driver past it
public class IpcTests
{
    [Fact]
    public void Another_process_waits_on_an_ipc_event_then_reads_ipc_memory_opened_twice()
    {
        using CudaContext context = Gpu.RequireContext();
        const int length = 5_000_011;
        const long offset = 4099;
        byte[] data = TestData.Random(length, seed: 51);
        using var allocation = DeviceBuffer.Allocate(context, 8 << 20);
        allocation.Fill(0xCC); // what a reader that did not wait would see
        using DeviceBuffer target = DeviceBuffer.Borrow(context, allocation.Address + offset, length);
        (CuIpcMemHandle handle, long handleOffset) = allocation.ExportIpcHandle();
        Assert.Equal(0, handleOffset);
        Assert.Equal(offset, target.ExportIpcHandle().Offset);
        using var ready = CudaEvent.CreateInterprocess(context);
        using var staging = PinnedBuffer.Allocate(context, length);
        data.CopyTo(staging.Span);
        using var module = CudaModule.LoadPtx(context, Gpu.SelfTestPtx());
        using var stream = CudaStream.Create(context);
        string output = Path.Combine(Path.GetTempPath(), $"nccl-swap-ipc-{Guid.NewGuid():N}");

        using PeerProcess reader = PeerHost.Start(IpcReader.Role, handle.ToHex(), $"{offset}", $"{length}", ready.ExportIpcHandle().ToHex(), output);
        string mappings = reader.WaitForLine("mappings ", TimeSpan.FromSeconds(60));
        Assert.Equal("1 references 2 same-address True", mappings);
        reader.WaitForLine("ready", TimeSpan.FromSeconds(60));

        // The bytes arrive only after a kernel that holds the stream for 1.5 s; the event marks their arrival.
        module.GetKernel("spin").Launch(1, 1, stream, new KernelArguments().Add(Gpu.SpinCycles(1500)));
        stream.CopyAsync(target, 0, staging, 0, length);
        stream.Record(ready);
        reader.Process.StandardInput.WriteLine("go");
        reader.Process.StandardInput.Flush();
        Assert.False(stream.IsIdle); // the reader was told to go before the bytes were there

        Assert.True(reader.WaitForExit(TimeSpan.FromSeconds(60)) == 0, reader.ToString());
        try
        {
            Assert.True(data.AsSpan().SequenceEqual(File.ReadAllBytes(output + ".first")), "first read differs");
            Assert.True(data.AsSpan().SequenceEqual(File.ReadAllBytes(output + ".second")), "read after closing one of two mappings differs");
        }
        finally
        {
            File.Delete(output + ".first");
            File.Delete(output + ".second");
        }
        Assert.Contains("after-first-close mappings 1 references 1", reader.Output);
        Assert.Contains("after-second-close mappings 0", reader.Output);
    }
}

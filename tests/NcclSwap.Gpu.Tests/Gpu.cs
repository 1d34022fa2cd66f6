using NcclSwap.Cuda;

namespace NcclSwap.Gpu.Tests;

/// <summary>Skips a test, with the reason, where there is no GPU (or no NCCL); never lets it pass there.</summary>
internal static class Gpu
{
    public static CudaContext RequireContext()
    {
        Assert.SkipUnless(CudaDriver.IsSupported, "needs a GPU: " + CudaDriver.UnsupportedReason?.Split('\n')[0]);
        return CudaContext.Retain(0);
    }

    public static CudaContext RequireNccl()
    {
        CudaContext context = RequireContext();
        if (!NcclLibrary.IsSupported)
        {
            context.Dispose();
            Assert.Skip("needs NCCL: " + NcclLibrary.UnsupportedReason?.Split('\n')[0]);
        }
        return context;
    }

    public static string SelfTestPtx()
    {
        using Stream stream = typeof(Gpu).Assembly.GetManifestResourceStream("selftest.ptx")!;
        return new StreamReader(stream).ReadToEnd();
    }

    /// <summary>Clock cycles that keep the spin kernel busy for at least <paramref name="milliseconds"/> on any current GPU (≤ 2.5 GHz).</summary>
    public static ulong SpinCycles(int milliseconds) => (ulong)milliseconds * 2_500_000;
}

/// <summary>
/// Tests that register host memory with the driver run alone: <c>cuMemHostRegister</c> can hold the driver until
/// kernels in flight finish, which would upset a test that times a running kernel (IpcTests, which runs alone too,
/// so that no other test pins memory, <c>cuMemHostAlloc</c> included, while it times its kernel).
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class GpuExclusive
{
    public const string Name = "GPU, run alone";
}

using System.Net;
using System.Net.Sockets;
using NcclSwap.Cuda;
using NcclSwap.DataPlane;

namespace NcclSwap.Perf;

/// <summary>
/// A swap group of this process alone with a rank per local GPU (rank r on GPU r), as an agent driving several GPUs
/// forms it; on the host backend, ranks over loopback TCP. Benchmarks time work run on every rank at once.
/// </summary>
internal static class LocalGroup
{
    public static SwapGroup Form(int ranks, bool host)
    {
        if (!host && ranks > CudaDriver.DeviceCount)
            throw new ArgumentException($"{ranks} ranks need {ranks} GPUs; this machine has {CudaDriver.DeviceCount}");
        int port;
        using (var probe = new TcpListener(IPAddress.Loopback, 0))
        {
            probe.Start();
            port = ((IPEndPoint)probe.LocalEndpoint).Port;
        }
        var config = new SwapGroupConfig("perf", new IPEndPoint(IPAddress.Loopback, port),
            [new SwapGroupMember(Environment.MachineName, Enumerable.Range(0, ranks).ToArray())], TimeSpan.FromSeconds(120));
        return SwapGroup.Form(config, 0, device => host ? new HostBackend() : new CudaBackend(device));
    }

    /// <summary>The median of <paramref name="values"/>.</summary>
    public static double Median(IEnumerable<double> values)
    {
        double[] sorted = values.Order().ToArray();
        return sorted.Length % 2 == 1 ? sorted[sorted.Length / 2] : (sorted[sorted.Length / 2 - 1] + sorted[sorted.Length / 2]) / 2;
    }
}

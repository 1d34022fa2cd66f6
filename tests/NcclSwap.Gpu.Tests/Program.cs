namespace NcclSwap.Gpu.Tests;

public static class Program
{
    public static int Main(string[] args) => Testing.PeerHost.Run(args, new Dictionary<string, Func<string[], int>>
    {
        [IpcReader.Role] = IpcReader.Run,
        [DataPlane.Tests.CollectivePeer.Role] = DataPlane.Tests.CollectivePeer.Run,
    });
}

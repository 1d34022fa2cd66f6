namespace NcclSwap.WeightSets.Tests;

public static class Program
{
    public static int Main(string[] args) => Testing.PeerHost.Run(args, new Dictionary<string, Func<string[], int>>
    {
        [PlanPeer.Role] = PlanPeer.Run,
        [GroupPeer.Role] = GroupPeer.Run,
    });
}

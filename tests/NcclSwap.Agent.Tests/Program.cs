namespace NcclSwap.Agent.Tests;

public static class TestProgram
{
    public static int Main(string[] args) => Testing.PeerHost.Run(args, new Dictionary<string, Func<string[], int>>
    {
        // The agent itself, run as the nccl-swap binary would run it.
        ["agent"] = agentArgs => Program.Main(agentArgs),
    });
}

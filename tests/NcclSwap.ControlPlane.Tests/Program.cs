namespace NcclSwap.ControlPlane.Tests;

public static class Program
{
    public static int Main(string[] args) => Testing.PeerHost.Run(args, new Dictionary<string, Func<string[], int>>
    {
        [ChannelPeers.TableReader] = ChannelPeers.ReadTable,
        [ChannelPeers.RingConsumer] = ChannelPeers.ConsumeRing,
        [LifecyclePeers.Publisher] = LifecyclePeers.Publish,
        [LifecyclePeers.Consumer] = LifecyclePeers.Consume,
        [TestAgent.AgentPeer] = TestAgent.RunPeer,
    });
}

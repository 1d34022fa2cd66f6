using System.Net;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.DataPlane;
using NcclSwap.Testing;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Tests;

/// <summary>
/// Versions that reach consumers through a swap group: a source rank sends each destination its share of a
/// tensor-parallel plan, each destination publishes what it received to its own agent, whose consumers switch to it.
/// Three members, formed from configuration for each update; the agents and consumers are the real ones.
/// </summary>
public class GroupTransferTests
{
    private static readonly Dtype Bf16 = Dtype.Parse("BF16");

    private static readonly ModelLayout Model = new("tp-model",
    [
        new("embed", Bf16, [64, 48], 0, null),
        new("layers.0.norm", Bf16, [48], null, null),
        new("layers.0.q_proj", Bf16, [96, 48], 0, null),
        new("layers.0.o_proj", Bf16, [48, 96], 1, null),
        new("layers.0.experts", Bf16, [4, 40, 24], 1, null),
        new("norm", Bf16, [48], null, null),
    ]);

    private static readonly TransferPlan Plan = TransferPlan.Create(Model, 1, 2, bucketBytes: 2048);

    private static byte[] Share(byte[] model, int d) => Shares.Of(Plan, model, d);

    private static SwapGroupConfig Config()
    {
        return new SwapGroupConfig("tp-update", new IPEndPoint(IPAddress.Loopback, Ports.Free()),
            [new SwapGroupMember("trainer", [0]), new SwapGroupMember("engine-a", [0]), new SwapGroupMember("engine-b", [0])], TimeSpan.FromSeconds(10));
    }

    /// <summary>One update: the group formed, the trainer sends <paramref name="model"/> as <paramref name="version"/> (giving up after <paramref name="failAfter"/> buckets), each engine member receives and publishes to its agent.</summary>
    private static Exception?[] Update(ReceivingPublisher.Registration[] publishers, byte[] model, ulong version, int? failAfter = null)
    {
        SwapGroupConfig config = Config();
        return Threads.Run(3, member =>
        {
            using SwapGroup group = SwapGroup.Form(config, member, _ => new HostBackend());
            group.RunOnEachRank(local =>
            {
                if (member == 0)
                {
                    using IDeviceBuffer region = local.Backend.Allocate(model.Length);
                    local.Backend.Upload(model, region);
                    ICollective link = failAfter is int n ? new GivesUp(local.Collective, n) : local.Collective;
                    using var executor = new PlanExecutor(Plan, local.Backend, link);
                    return executor.Run(region, version: version);
                }
                using var receiver = ReceivingPublisher.Over(publishers[member - 1], Plan, PlanRanks.Separate(Plan), member - 1, local.Backend, local.Collective);
                return receiver.Receive();
            });
        });
    }

    private static void StepUntil(TestAgent agent, ConsumerClient consumer, ulong version) =>
        agent.WaitFor(() => { consumer.Step(); return consumer.Version == version; }, TimeSpan.FromSeconds(30), $"a {consumer.Mode} consumer serving version {version} (it serves {consumer.Version}, {consumer.LastError})");

    private static void AssertServes(ConsumerClient consumer, byte[] share, ulong version, int d)
    {
        Assert.Equal(version, consumer.Version);
        RegionLayout layout = Plan.DestinationLayout(d);
        foreach (TensorPlacement t in layout.Tensors)
            Assert.True(consumer.Weights.Tensor(t.Name).SequenceEqual(share.AsSpan((int)t.Offset, (int)t.Bytes)),
                $"destination {d}, {consumer.Mode} consumer: '{t.Name}' is not version {version}'s part");
    }

    [Fact]
    public async Task Each_engine_serves_exactly_its_share_and_a_trainer_that_dies_mid_transfer_leaves_every_consumer_on_its_last_good_version()
    {
        int seed = TestData.NewSeed();
        await using TestAgent a = TestAgent.Start();
        await using TestAgent b = TestAgent.Start();
        TestAgent[] agents = [a, b];
        var consumers = agents.Select((agent, d) => new[]
        {
            ConsumerClient.Connect(agent.SocketPath, "moe", Plan.DestinationLayout(d), ConsumerMode.Flip),
            ConsumerClient.Connect(agent.SocketPath, "moe", Plan.DestinationLayout(d), ConsumerMode.CopyIn),
        }).ToArray();
        // Each engine registers once, as a publisher of its share, and keeps the registration across the groups.
        ReceivingPublisher.Registration[] publishers = agents.Select((agent, d) => ReceivingPublisher.Register(agent.SocketPath, "moe", Plan, d, new HostBackend())).ToArray();
        try
        {
            byte[] v1 = TestData.Random((int)Plan.SourceLayout().Length, seed);
            Assert.All(Update(publishers, v1, 1), f => Assert.Null(f));
            for (int d = 0; d < 2; d++)
                foreach (ConsumerClient consumer in consumers[d])
                {
                    StepUntil(agents[d], consumer, 1);
                    AssertServes(consumer, Share(v1, d), 1, d);
                }

            // The trainer gives up after two buckets of version 2: both engines' transfers end naming it, nothing is published.
            byte[] v2 = TestData.Random(v1.Length, seed + 1);
            Exception?[] failed = Update(publishers, v2, 2, failAfter: 2);
            Assert.NotNull(failed[0]);
            for (int member = 1; member < 3; member++)
            {
                var e = Assert.IsType<CollectiveException>(failed[member]);
                Assert.Contains("[the peer: rank 0 (member 0 on trainer", e.Message);
            }
            for (int d = 0; d < 2; d++)
                foreach (ConsumerClient consumer in consumers[d])
                {
                    for (int step = 0; step < 20; step++)
                        consumer.Step();
                    AssertServes(consumer, Share(v1, d), 1, d);
                }

            // The group forms again and version 3 reaches everyone.
            byte[] v3 = TestData.Random(v1.Length, seed + 2);
            Assert.All(Update(publishers, v3, 3), f => Assert.Null(f));
            for (int d = 0; d < 2; d++)
                foreach (ConsumerClient consumer in consumers[d])
                {
                    StepUntil(agents[d], consumer, 3);
                    AssertServes(consumer, Share(v3, d), 3, d);
                }
        }
        finally
        {
            foreach (ConsumerClient consumer in consumers.SelectMany(c => c))
                consumer.Dispose();
            foreach (ReceivingPublisher.Registration publisher in publishers)
                publisher.Dispose();
        }
    }

    /// <summary>A trainer that stops after <c>afterBuckets</c> bucket sends: it aborts its links (its peers see them close) and fails.</summary>
    private sealed class GivesUp(ICollective inner, int afterBuckets) : ICollective
    {
        private int _sent;

        public int Rank => inner.Rank;

        public int Size => inner.Size;

        public void Broadcast(IDeviceBuffer buffer, long offset, long length, int root, ICopyStream stream) => inner.Broadcast(buffer, offset, length, root, stream);

        public void AllGather(IDeviceBuffer send, long sendOffset, IDeviceBuffer receive, long receiveOffset, long bytesPerRank, ICopyStream stream) =>
            inner.AllGather(send, sendOffset, receive, receiveOffset, bytesPerRank, stream);

        public void Send(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream)
        {
            if (++_sent > afterBuckets)
            {
                inner.Abort();
                throw new CollectiveException($"rank {Rank}: the trainer gave up after {afterBuckets} buckets", null);
            }
            inner.Send(buffer, offset, length, peer, stream);
        }

        public void Receive(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream) => inner.Receive(buffer, offset, length, peer, stream);

        public IDisposable Group() => inner.Group();

        public void Abort() => inner.Abort();

        public void Dispose() => inner.Dispose();
    }
}

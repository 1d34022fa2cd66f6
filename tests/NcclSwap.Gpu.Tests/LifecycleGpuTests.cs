using Microsoft.Extensions.Logging.Abstractions;
using NcclSwap.ControlPlane;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.Gpu.Tests;

/// <summary>
/// The version life cycle with the CUDA backend: clients' shared memory and the staging files registered with the
/// driver and mapped into the GPU's address space, copies on CUDA streams, every digest computed on the GPU.
/// </summary>
[Collection(GpuExclusive.Name)]
public sealed class LifecycleGpuTests : IAsyncDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-gpu-agent-").FullName;
    private readonly SyntheticModel _model = new(4, 256, 688, 8192, 4, 2); // about 14 MB

    private (AgentCore Agent, FlakyBackend Backend) Start()
    {
        Gpu.RequireContext().Dispose();
        var roles = new RolePolicy();
        roles.Users[PeerIdentity.OfThisProcess().Uid] = Role.Publisher | Role.Consumer | Role.Operator;
        var options = new AgentOptions(Path.Combine(_folder, "agent.sock"), Path.Combine(_folder, "state"), Path.Combine("/dev/shm", Path.GetFileName(_folder)), 4, roles, UpdatePolicy.Queue, TimeSpan.FromSeconds(30));
        var backend = new FlakyBackend(new CudaBackend(0));
        return (AgentCore.Start(options, backend, NullLogger.Instance), backend);
    }

    private static void StepUntil(ConsumerClient consumer, ulong version)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (consumer.Version != version)
        {
            consumer.Step();
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"the {consumer.Mode} consumer serves {consumer.Version}, not {version}: {consumer.LastError}");
        }
    }

    private static void AssertHolds(ConsumerClient consumer, ulong version)
    {
        foreach (TensorPlacement tensor in consumer.Layout.Tensors)
        {
            byte[] expected = new byte[tensor.Bytes];
            SyntheticModel.Fill(version, tensor.Name, expected);
            Assert.True(consumer.Weights.Tensor(tensor.Name).SequenceEqual(expected), $"{consumer.Mode}: tensor '{tensor.Name}' is not version {version}'s");
        }
    }

    [Fact]
    public async Task Versions_verified_on_the_gpu_reach_flip_and_copy_in_consumers_intact_and_spoiled_bytes_are_never_served()
    {
        (AgentCore agent, FlakyBackend backend) = Start();
        using var ownsContext = backend; // disposed last: the agent unmaps registered memory with it
        await using var ownsAgent = agent;
        RegionLayout layout = _model.Layout();
        using var publisher = PublisherClient.Connect(agent.Options.SocketPath, "llama", layout);
        using var flip = ConsumerClient.Connect(agent.Options.SocketPath, "llama", layout, ConsumerMode.Flip);
        using var copyIn = ConsumerClient.Connect(agent.Options.SocketPath, "llama", layout, ConsumerMode.CopyIn);
        Assert.Equal("cuda", backend.Kind);

        for (ulong version = 1; version <= 3; version++)
        {
            SyntheticModel.Fill(version, layout, publisher.Tensors.Pointer);
            PublishResult result = publisher.Publish(version, wait: true);
            Assert.True(result.Ok, result.ToString());
            StepUntil(flip, version);
            StepUntil(copyIn, version);
            AssertHolds(flip, version);
            AssertHolds(copyIn, version);
        }

        // A bit spoiled on its way into the staged copy (made from the flip consumer's checked slot after the version
        // went straight there): the GPU digest catches it, and the copy-in consumer never gets those bytes.
        backend.CorruptCopiesInto("staging");
        SyntheticModel.Fill(4, layout, publisher.Tensors.Pointer);
        Assert.True(publisher.Publish(4, wait: true).Ok);
        StepUntil(flip, 4);
        AssertHolds(flip, 4);
        for (var clock = System.Diagnostics.Stopwatch.StartNew(); clock.Elapsed < TimeSpan.FromSeconds(1); Thread.Sleep(10))
            Assert.False(copyIn.Step(), "the copy-in consumer took version 4 from a spoiled staged copy");
        AssertHolds(copyIn, 3);

        // A bit spoiled once on its way to a consumer: sent again, then activated intact.
        backend.CorruptCopiesInto("slot");
        SyntheticModel.Fill(5, layout, publisher.Tensors.Pointer);
        Assert.True(publisher.Publish(5, wait: true).Ok);
        Assert.Equal(1, agent.Versions.History("llama").Single(o => o.Version == 5).Resent);
        StepUntil(flip, 5);
        StepUntil(copyIn, 5);
        AssertHolds(flip, 5);
        AssertHolds(copyIn, 5);
        SyntheticModel.Fill(6, layout, publisher.Tensors.Pointer);
        Assert.True(publisher.Publish(6, wait: true).Ok);
        StepUntil(flip, 6);

        using var operatorClient = ChannelClient.Connect(agent.Options.SocketPath, Role.Operator, "llama");
        Response rollback = operatorClient.Call(operatorClient.NewRequest(RequestKind.Rollback), TimeSpan.FromSeconds(60));
        Assert.Equal(Status.Ok, rollback.Status);
        StepUntil(flip, 5);
        StepUntil(copyIn, 5);
        AssertHolds(flip, 5);
        AssertHolds(copyIn, 5);
        Assert.Equal(2, backend.Corrupted);
    }

    public ValueTask DisposeAsync()
    {
        Directory.Delete(_folder, recursive: true);
        string staging = Path.Combine("/dev/shm", Path.GetFileName(_folder));
        if (Directory.Exists(staging))
            Directory.Delete(staging, recursive: true);
        return ValueTask.CompletedTask;
    }
}

using NcclSwap.Cuda;
using NcclSwap.DataPlane;
using NcclSwap.DataPlane.Tests;
using NcclSwap.Testing;
using NcclSwap.WeightSets;

namespace NcclSwap.Gpu.Tests;

/// <summary>
/// The NCCL path of a transfer plan on one GPU: the rank is the source and the destination, so every bucket goes
/// through NCCL as a send to itself, packed with 2-D copies and the copy kernel, digested by the GPU digest kernels.
/// What it receives is checked against the same plan run on the host backend, whose results the CPU suite checks
/// against tensors cut by rows and columns.
/// </summary>
[Collection(GpuExclusive.Name)]
public class TransferGpuTests
{
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(60);
    private static readonly Dtype Bf16 = Dtype.Parse("BF16");

    /// <summary>A replicated norm, row- and column-split projections, a 3-D expert block cut in the middle, odd sizes, a fewer-shard tensor.</summary>
    private static readonly ModelLayout Layout = new("gpu-mixed",
    [
        new("model.embed_tokens.weight", Bf16, [1000, 512], 0, null),
        new("model.layers.0.input_layernorm.weight", Bf16, [512], null, null),
        new("model.layers.0.self_attn.q_proj.weight", Bf16, [1024, 512], 0, null),
        new("model.layers.0.self_attn.k_proj.weight", Bf16, [256, 512], 0, 2),
        new("model.layers.0.self_attn.o_proj.weight", Bf16, [512, 1024], 1, null),
        new("model.layers.0.mlp.experts.down_proj", Bf16, [8, 768, 384], 2, null),
        new("model.layers.0.mlp.experts.up_proj", Bf16, [8, 384, 512], 1, null),
        new("model.norm.weight", Dtype.Parse("F32"), [512], null, null),
    ]);

    /// <summary>Runs <paramref name="plan"/> (one destination) on one rank of <paramref name="backend"/> and returns the destination's bytes and the report.</summary>
    private static (byte[] Held, TransferReport Report) RunOne(IBackend backend, ICollective collective, TransferPlan plan, byte[] model, byte[] start,
        TransferReport? previous = null)
    {
        using IDeviceBuffer source = backend.Allocate(model.Length);
        using IDeviceBuffer destination = backend.Allocate(start.Length);
        backend.Upload(model, source);
        backend.Upload(start, destination);
        using var executor = new PlanExecutor(plan, backend, collective, new PlanRanks([0], [0]));
        TransferReport report = executor.Run(source, destination, previous);
        byte[] held = new byte[start.Length];
        backend.Download(destination, 0, held);
        return (held, report);
    }

    /// <summary>What the host backend's run of the same plan leaves at the destination: the reference the GPU runs are held to.</summary>
    private static byte[] OnHost(TransferPlan plan, byte[] model, byte[] start)
    {
        using var host = new HostBackend();
        using ICollective alone = host.JoinCollective(host.CreateCollectiveId(), 0, 1, Deadline);
        return RunOne(host, alone, plan, model, start).Held;
    }

    [Fact]
    public void One_rank_runs_sends_to_itself_a_broadcast_an_all_gather_and_a_split_subset_through_nccl()
    {
        Gpu.RequireNccl().Dispose();
        using var backend = new CudaBackend(0);
        using ICollective collective = backend.JoinCollective(backend.CreateCollectiveId(), 0, 1, Deadline);
        int seed = TestData.NewSeed();
        const int bytes = 4 * 1_048_576 + 13;
        byte[] got = CollectivePeer.Exchange(backend, collective, seed, bytes);
        Assert.True(CollectivePeer.Expected(0, 1, seed, bytes).AsSpan().SequenceEqual(got), $"seed {seed}");
    }

    [Theory]
    [InlineData(4, 1)]
    [InlineData(4, 3)]
    [InlineData(2, 0)]
    public void A_tensor_parallel_share_moves_over_nccl_byte_for_byte_skips_what_it_holds_and_resends_a_spoiled_bucket(int tp, int destination)
    {
        Gpu.RequireNccl().Dispose();
        int seed = TestData.NewSeed();
        TransferPlan plan = TransferPlan.Create(Layout, 1, tp, bucketBytes: 1 << 20).ForDestination(destination);
        byte[] model = TestData.Random((int)plan.SourceLayout().Length, seed);
        byte[] start = TestData.Random((int)plan.DestinationLayout(0).Length, seed + 1);

        byte[] expected = OnHost(plan, model, start);

        using var backend = new CudaBackend(0);
        using var collective = new FlakyCollective(backend.JoinCollective(backend.CreateCollectiveId(), 0, 1, Deadline), backend);
        var (held, report) = RunOne(backend, collective, plan, model, start);
        Assert.True(expected.AsSpan().SequenceEqual(held), $"TP{tp} destination {destination}: the GPU run differs from the host run (seed {seed})");
        Assert.Equal(plan.Transfers.Sum(t => t.Buckets.Buckets.Count), report.Buckets);
        Assert.Equal(plan.ReceivedBytes()[0], report.Bytes);

        // The same model again into what it holds: nothing moves.
        var (again, second) = RunOne(backend, collective, plan, model, held, report);
        Assert.Equal(0, second.Buckets);
        Assert.True(expected.AsSpan().SequenceEqual(again));

        // One tensor changes, and the first bucket on the way is spoiled: only the tensor's buckets move, the spoiled one twice.
        byte[] changed = (byte[])model.Clone();
        TensorPlacement o = plan.SourceLayout()["model.layers.0.self_attn.o_proj.weight"];
        TestData.Random((int)o.Bytes, seed + 2).CopyTo(changed, o.Offset);
        expected = OnHost(plan, changed, held);
        collective.CorruptReceives(1);
        var (third, report3) = RunOne(backend, collective, plan, changed, again, second);
        Assert.True(expected.AsSpan().SequenceEqual(third), $"after a change and a spoiled bucket (seed {seed})");
        int holding = plan.Transfers.Sum(t => t.Buckets.Buckets.Count(b => b.Pieces.Any(p => p.Tensor.StartsWith("model.layers.0.self_attn.o_proj", StringComparison.Ordinal))));
        Assert.Equal(1, collective.Corrupted);
        Assert.Equal(1, report3.Resent);
        Assert.Equal(holding + 1, report3.Buckets);
    }

    [Fact]
    public void A_one_member_swap_group_forms_over_nccl_from_its_configuration_and_moves_a_share()
    {
        Gpu.RequireNccl().Dispose();
        var config = new SwapGroupConfig("gpu-one", new System.Net.IPEndPoint(System.Net.IPAddress.Loopback, Ports.Free()), [new SwapGroupMember("local", [0])], Deadline);
        int seed = TestData.NewSeed();
        TransferPlan plan = TransferPlan.Create(Layout, 1, 8, bucketBytes: 1 << 20).ForDestination(5);
        byte[] model = TestData.Random((int)plan.SourceLayout().Length, seed);
        byte[] start = TestData.Random((int)plan.DestinationLayout(0).Length, seed + 1);
        byte[] expected = OnHost(plan, model, start);

        using SwapGroup group = SwapGroup.Form(config, 0, device => new CudaBackend(device));
        Assert.Equal("cuda", group.Ranks[0].Backend.Kind);
        Assert.Contains("rank 0 (member 0 on local", group.Describe(0));
        byte[][] held = group.RunOnEachRank(local => RunOne(local.Backend, local.Collective, plan, model, start).Held);
        Assert.True(expected.AsSpan().SequenceEqual(held[0]), $"seed {seed}");
    }

    [Fact]
    public void A_source_in_host_memory_reaches_the_destination_through_device_staging()
    {
        // A trainer whose weights are in pinned host memory (mapped for the device): its buckets are packed over the
        // copy engines (host to device) while earlier ones are on the wire; nothing is sent from host memory in place.
        Gpu.RequireNccl().Dispose();
        int seed = TestData.NewSeed();
        TransferPlan plan = TransferPlan.Create(Layout, 1, 4, bucketBytes: 1 << 20).ForDestination(2);
        byte[] model = TestData.Random((int)plan.SourceLayout().Length, seed);
        byte[] start = TestData.Random((int)plan.DestinationLayout(0).Length, seed + 1);
        byte[] expected = OnHost(plan, model, start);

        using var backend = new CudaBackend(0);
        using ICollective collective = backend.JoinCollective(backend.CreateCollectiveId(), 0, 1, Deadline);
        // Ordinary page-aligned host memory, as a trainer's shared-memory region is; MapHost pins and maps it.
        nint weights;
        unsafe
        {
            weights = (nint)System.Runtime.InteropServices.NativeMemory.AlignedAlloc((nuint)model.Length, 4096);
            model.CopyTo(new Span<byte>((void*)weights, model.Length));
        }
        using var free = new Freed(weights);
        using IDeviceBuffer source = backend.MapHost(weights, model.Length, readOnly: true, "trainer weights in host memory");
        using IDeviceBuffer destination = backend.Allocate(start.Length);
        backend.Upload(start, destination);
        using var executor = new PlanExecutor(plan, backend, collective, new PlanRanks([0], [0])) { InPlace = false };
        TransferReport report = executor.Run(source, destination);
        byte[] held = new byte[start.Length];
        backend.Download(destination, 0, held);
        Assert.True(expected.AsSpan().SequenceEqual(held), $"seed {seed}");
        Assert.Equal(0, report.InPlace);
        Assert.Equal(plan.ReceivedBytes()[0], report.Bytes);
    }

    /// <summary>Frees native memory when disposed (after the mapping that uses it).</summary>
    private sealed unsafe class Freed(nint pointer) : IDisposable
    {
        public void Dispose() => System.Runtime.InteropServices.NativeMemory.AlignedFree((void*)pointer);
    }
}

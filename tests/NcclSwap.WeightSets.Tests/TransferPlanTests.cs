using System.Text;
using System.Text.Json;
using NcclSwap.DataPlane;
using NcclSwap.Testing;

namespace NcclSwap.WeightSets.Tests;

public class TransferPlanTests
{
    private static readonly Dtype Bf16 = Dtype.Parse("BF16");

    /// <summary>What rank <paramref name="rank"/> of <paramref name="ranks"/> holds of a 2-D tensor, cut as engines cut it, computed from rows and columns.</summary>
    internal static byte[] Held(byte[] data, long rows, long columns, int elementBytes, int? split, int? shards, int rank, int ranks)
    {
        if (split is null)
            return data;
        int parts = Math.Min(ranks, shards ?? ranks);
        int part = rank / (ranks / parts);
        var held = new List<byte>();
        for (long r = 0; r < rows; r++)
            for (long c = 0; c < columns; c++)
            {
                bool mine = split == 0 ? r / (rows / parts) == part : c / (columns / parts) == part;
                if (mine)
                    held.AddRange(data.AsSpan((int)((r * columns + c) * elementBytes), elementBytes).ToArray());
            }
        return [.. held];
    }

    /// <summary>The bytes a part names: its runs, gathered.</summary>
    private static byte[] Gather(byte[] data, TensorPart part)
    {
        var bytes = new byte[part.Bytes];
        for (long i = 0; i < part.Runs; i++)
            data.AsSpan((int)(part.Offset + i * part.Stride), (int)part.RunBytes).CopyTo(bytes.AsSpan((int)(i * part.RunBytes)));
        return bytes;
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(4)]
    [InlineData(8)]
    public void Every_destination_receives_exactly_the_bytes_its_engine_holds_of_replicated_column_and_row_split_tensors(int ranks)
    {
        int seed = TestData.NewSeed();
        var random = new Random(seed);
        // rows and columns divisible by 8 and 24, so that every rank count here divides them
        var tensors = new List<(LayoutTensor Tensor, byte[] Data)>();
        int kvShards = ranks % 2 == 0 ? 2 : 1; // fewer parts than ranks: neighbours share one (an odd count shares the whole)
        foreach ((string name, int? split, int? shards) in new (string, int?, int?)[]
                 { ("norm", null, null), ("q_proj", 0, null), ("o_proj", 1, null), ("k_proj", 0, kvShards), ("down", 1, 1) })
        {
            long rows = 24 * random.Next(1, 3), columns = 48 * random.Next(1, 3);
            var tensor = new LayoutTensor($"layer.{name}", Bf16, [rows, columns], split, shards);
            tensors.Add((tensor, TestData.Random((int)tensor.Bytes, random.Next())));
        }
        var layout = new ModelLayout("test", tensors.Select(t => t.Tensor).ToList());
        TransferPlan plan = TransferPlan.Create(layout, sources: 3, destinations: ranks, bucketBytes: 4096);

        var received = Enumerable.Range(0, ranks).Select(_ => new Dictionary<string, byte[]>()).ToArray();
        foreach (Transfer transfer in plan.Transfers)
        {
            Assert.Equal(transfer.Destinations.Count > 1, transfer.IsBroadcast);
            foreach (TensorPart part in transfer.Parts)
                foreach (int rank in transfer.Destinations)
                    Assert.True(received[rank].TryAdd(part.Tensor, Gather(tensors.Single(t => t.Tensor.Name == part.Tensor).Data, part)),
                        $"rank {rank} receives {part.Key} twice (seed {seed})");
        }
        for (int rank = 0; rank < ranks; rank++)
            foreach ((LayoutTensor tensor, byte[] data) in tensors)
            {
                byte[] expected = Held(data, tensor.Shape[0], tensor.Shape[1], 2, tensor.SplitDimension, tensor.Shards, rank, ranks);
                Assert.True(received[rank].TryGetValue(tensor.Name, out byte[]? got), $"rank {rank} of {ranks} receives nothing of {tensor.Name} (seed {seed})");
                Assert.True(expected.AsSpan().SequenceEqual(got), $"rank {rank} of {ranks}: the bytes of {tensor.Name} differ (seed {seed})");
            }

        long[] needed = plan.NeededBytes();
        for (int rank = 0; rank < ranks; rank++)
            Assert.Equal(received[rank].Values.Sum(b => (long)b.Length), needed[rank]);
        Assert.All(plan.ReceivedBytes().Zip(needed), x => Assert.True(x.First >= x.Second)); // plus bucket padding
        Assert.Equal(layout.TotalBytes * ranks, plan.BroadcastBytes);
    }

    /// <summary>
    /// Through a backend's batched copies, as an executor will do it: every bucket packed at its source from the
    /// whole model, then unpacked at each of its destinations; small buckets so that parts span several, and a 3-D
    /// tensor cut along its middle dimension. Every rank's region then holds, tensor by tensor, exactly its part.
    /// </summary>
    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(4)]
    [InlineData(8)]
    public void Buckets_packed_at_the_sources_and_unpacked_at_the_destinations_leave_each_rank_its_parts(int ranks)
    {
        int seed = TestData.NewSeed();
        var random = new Random(seed);
        IReadOnlyList<LayoutTensor> tensors = MixedTensors;
        var layout = new ModelLayout("test", tensors);
        TransferPlan plan = TransferPlan.Create(layout, sources: 2, destinations: ranks, bucketBytes: 512);
        RegionLayout source = plan.SourceLayout();
        byte[] model = TestData.Random((int)source.Length, seed);

        using var backend = new NcclSwap.DataPlane.HostBackend();
        using NcclSwap.DataPlane.IDeviceBuffer whole = backend.Allocate(source.Length);
        backend.Upload(model, whole);
        RegionLayout[] layouts = Enumerable.Range(0, ranks).Select(plan.DestinationLayout).ToArray();
        NcclSwap.DataPlane.IDeviceBuffer[] regions = layouts.Select(l => backend.Allocate(l.Length)).ToArray();
        using NcclSwap.DataPlane.IDeviceBuffer bucket = backend.Allocate(plan.BucketBytes);
        using NcclSwap.DataPlane.ICopyStream stream = backend.CreateStream();
        foreach (Transfer transfer in plan.Transfers)
            for (int b = 0; b < transfer.Buckets.Buckets.Count; b++)
            {
                stream.CopyAsync(bucket, whole, TransferPlan.PackRuns(transfer, b, source));
                foreach (int rank in transfer.Destinations)
                    stream.CopyAsync(regions[rank], bucket, TransferPlan.UnpackRuns(transfer, b, layouts[rank]));
            }
        stream.Synchronize();

        for (int rank = 0; rank < ranks; rank++)
        {
            byte[] held = new byte[layouts[rank].Length];
            backend.Download(regions[rank], 0, held);
            foreach (LayoutTensor t in tensors)
            {
                byte[] expected = Expected(t, model.AsSpan((int)source[t.Name].Offset, (int)t.Bytes).ToArray(), rank, ranks);
                TensorPlacement at = layouts[rank][t.Name];
                Assert.True(expected.AsSpan().SequenceEqual(held.AsSpan((int)at.Offset, (int)at.Bytes)),
                    $"rank {rank} of {ranks}: {t.Name} differs (seed {seed})");
            }
        }
        foreach (NcclSwap.DataPlane.IDeviceBuffer region in regions)
            region.Dispose();
    }

    /// <summary>Replicated, column- and row-split, fewer-shard, 3-D cut in the middle, and a 4-byte dtype: every case a plan has.</summary>
    internal static IReadOnlyList<LayoutTensor> MixedTensors { get; } =
    [
        new("a.norm", Bf16, [64], null, null),
        new("b.q_proj", Bf16, [48, 40], 0, null),
        new("c.o_proj", Bf16, [40, 48], 1, null),
        new("d.k_proj", Bf16, [16, 40], 0, 2),
        new("e.experts", Bf16, [3, 16, 24], 1, null),
        new("f.scale", Dtype.Parse("F32"), [8, 8], 1, 4),
    ];

    /// <summary>What rank <paramref name="rank"/> of <paramref name="ranks"/> holds of tensor <paramref name="t"/> whose bytes are <paramref name="data"/>.</summary>
    internal static byte[] Expected(LayoutTensor t, byte[] data, int rank, int ranks)
    {
        int element = t.Dtype.Bits / 8;
        return t.Shape.Length == 1 ? data
            : t.Shape.Length == 2 ? Held(data, t.Shape[0], t.Shape[1], element, t.SplitDimension, t.Shards, rank, ranks)
            : HeldMiddle(data, t.Shape, element, rank, ranks); // cut along dimension 1, as many parts as ranks
    }

    /// <summary>What rank r holds of a 3-D tensor cut along dimension 1 into as many parts as ranks.</summary>
    private static byte[] HeldMiddle(byte[] data, long[] shape, int element, int rank, int ranks)
    {
        long per = shape[1] / ranks;
        var held = new List<byte>();
        for (long i = 0; i < shape[0]; i++)
            for (long j = rank * per; j < (rank + 1) * per; j++)
                held.AddRange(data.AsSpan((int)(((i * shape[1] + j) * shape[2]) * element), (int)(shape[2] * element)).ToArray());
        return [.. held];
    }

    [Fact]
    public void A_part_cut_along_columns_packs_as_one_strided_copy_of_its_rows()
    {
        // c.o_proj [40, 48] cut along columns for 4 ranks: 40 rows of 12 elements, 96 bytes apart. In one large bucket
        // each destination's part is a single copy of all 40 rows, not 40 copies; a piece that starts or ends in the
        // middle of a row (256-byte buckets) adds a partial row at that end only.
        TransferPlan plan = TransferPlan.Create(new ModelLayout("mixed", MixedTensors), 1, 4, bucketBytes: 1 << 20);
        RegionLayout source = plan.SourceLayout();
        foreach (Transfer t in plan.Transfers.Where(t => t.Parts.Any(p => p.Tensor == "c.o_proj")))
        {
            int bucket = t.Buckets.Buckets.Single(b => b.Pieces.Any(p => p.Tensor.StartsWith("c.o_proj", StringComparison.Ordinal))).Index;
            TensorPart part = t.Parts.Single(p => p.Tensor == "c.o_proj");
            long at = t.Buckets.Buckets[bucket].Pieces.Single(p => p.Tensor == part.Key).BucketOffset;
            StridedCopy copy = Assert.Single(TransferPlan.PackCopies(t, bucket, source), c => c.To == at);
            Assert.Equal(new StridedCopy(source["c.o_proj"].Offset + part.Offset, 96, at, 24, 24, 40), copy);
        }

        TransferPlan small = TransferPlan.Create(new ModelLayout("mixed", MixedTensors), 1, 4, bucketBytes: 256);
        foreach (Transfer t in small.Transfers)
            for (int b = 0; b < t.Buckets.Buckets.Count; b++)
            {
                List<StridedCopy> copies = TransferPlan.PackCopies(t, b, small.SourceLayout());
                Assert.True(copies.Count <= 3 * t.Buckets.Buckets[b].Pieces.Count, $"bucket {b}: {copies.Count} copies for {t.Buckets.Buckets[b].Pieces.Count} pieces");
                Assert.Equal(t.Buckets.Buckets[b].Pieces.Sum(p => p.Bytes), copies.Sum(c => c.TotalBytes));
            }
    }

    [Fact]
    public void The_plan_depends_only_on_its_inputs_and_balances_the_sources()
    {
        ModelLayout layout = ModelLayout.Load(Path.Combine(AppContext.BaseDirectory, "layouts", "llama-3-8b.json"));
        TransferPlan a = TransferPlan.Create(layout, 3, 8), b = TransferPlan.Create(layout, 3, 8);
        Assert.Equal(a.ToJson(parts: true), b.ToJson(parts: true));
        long[] sent = a.SentBytes();
        long largest = a.Transfers.SelectMany(t => t.Parts).Max(p => p.Bytes);
        Assert.True(sent.Max() - sent.Min() <= largest, $"sources send {string.Join(", ", sent)}");
        Assert.Equal(layout.TotalBytes, a.Transfers.Sum(t => t.Bytes)); // every part sent once, whoever receives it
    }

    [Fact]
    public void A_plan_for_some_destinations_gives_each_the_same_buckets_and_broadcasts_only_among_them()
    {
        ModelLayout layout = ModelLayout.Load(Path.Combine(AppContext.BaseDirectory, "layouts", "llama-3-8b.json"));
        TransferPlan whole = TransferPlan.Create(layout, 1, 4, bucketBytes: 64 << 20);
        TransferPlan some = whole.ForDestinations([3, 1]);
        Assert.Equal(2, some.Destinations);
        Assert.Equal([whole.ReceivedBytes()[3], whole.ReceivedBytes()[1]], some.ReceivedBytes());
        for (int i = 0; i < 2; i++)
        {
            int d = new[] { 3, 1 }[i];
            var mine = some.Transfers.Where(t => t.Destinations.Contains(i)).SelectMany(t => t.Buckets.Buckets.Select(b => (b.Bytes, string.Join(",", t.Parts.Select(p => p.Key))))).ToList();
            var theirs = whole.Transfers.Where(t => t.Destinations.Contains(d)).SelectMany(t => t.Buckets.Buckets.Select(b => (b.Bytes, string.Join(",", t.Parts.Select(p => p.Key))))).ToList();
            Assert.Equal(theirs, mine);
            Assert.Equal(whole.DestinationLayout(d).Length, some.DestinationLayout(i).Length);
        }
        // Replicated tensors went to all four by broadcast; now to the two; a shard of one of them alone is a send.
        Assert.Contains(some.Transfers, t => t.IsBroadcast && t.Destinations.SequenceEqual([0, 1]));
        Assert.Contains(some.Transfers, t => !t.IsBroadcast);
        Assert.DoesNotContain(some.Transfers, t => t.Destinations.Count == 0);
        Assert.Equal(whole.ForDestination(1).ToJson(parts: true), whole.ForDestinations([1]).ToJson(parts: true));
        Assert.Throws<ArgumentException>(() => whole.ForDestinations([1, 1]));
        Assert.Throws<ArgumentOutOfRangeException>(() => whole.ForDestinations([4]));
    }

    [Fact]
    public void The_shipped_layouts_hold_their_models_and_tp8_destinations_get_an_eighth()
    {
        ModelLayout llama = ModelLayout.Load(Path.Combine(AppContext.BaseDirectory, "layouts", "llama-3-8b.json"));
        Assert.Equal(291, llama.Tensors.Count);
        Assert.Equal(16_060_522_496, llama.TotalBytes); // 8 030 261 248 parameters in BF16

        ModelLayout qwen = ModelLayout.Load(Path.Combine(AppContext.BaseDirectory, "layouts", "qwen3-235b-a22b.json"));
        Assert.Equal(3 + 94 * (9 + 3 * 128), qwen.Tensors.Count);
        Assert.Contains(qwen.Tensors, t => t.Name == "model.layers.93.mlp.experts.127.down_proj.weight");
        Assert.InRange(qwen.TotalBytes / 2, 234_000_000_000, 236_000_000_000); // about 235 billion parameters

        TransferPlan plan = TransferPlan.Create(qwen, 1, 8);
        long[] received = plan.ReceivedBytes();
        Assert.All(received, r => Assert.InRange(r, qwen.TotalBytes / 8, qwen.TotalBytes / 8 + qwen.TotalBytes / 100));
        using JsonDocument json = JsonDocument.Parse(plan.ToJson());
        Assert.Equal(8, json.RootElement.GetProperty("destinations").GetArrayLength());
        Assert.Equal(received[0], json.RootElement.GetProperty("destinations")[0].GetProperty("bytes").GetInt64());
        Assert.Equal(qwen.TotalBytes * 8, json.RootElement.GetProperty("broadcast_bytes").GetInt64());
    }

    [Theory]
    [InlineData("""{"format": "nccl-swap-layout/1", "tensors": [{"name": "a", "dtype": "BF17", "shape": [2]}]}""", "tensors[0] ('a'): \"dtype\" must be a safetensors dtype")]
    [InlineData("""{"format": "nccl-swap-layout/1", "tensors": [{"name": "a", "dtype": "BF16", "shape": [2, 3], "split": 2}]}""", "tensor 'a': split dimension 2 is not one of its 2 dimensions")]
    [InlineData("""{"format": "nccl-swap-layout/1", "tensors": [{"name": "a.{0..1}", "dtype": "BF16", "shape": [2]}, {"name": "a.1", "dtype": "BF16", "shape": [2]}]}""", "tensor 'a.1' appears twice")]
    [InlineData("""{"format": "nccl-swap-layout/1", "tensors": [{"name": "a.{3..1}", "dtype": "BF16", "shape": [2]}]}""", "range {3..1} must go up")]
    [InlineData("""{"format": "nccl-swap-layout/1", "tensors": [{"name": "a.{x}", "dtype": "BF16", "shape": [2]}]}""", "a range in a name is written {first..last}")]
    [InlineData("""{"format": "nccl-swap-layout/1", "tensors": [{"name": "a", "dtype": "BF16", "shape": "2"}]}""", "tensors[0] ('a'): \"shape\" must be an array of integers")]
    [InlineData("""{"format": "other", "tensors": []}""", "\"format\" must be \"nccl-swap-layout/1\"")]
    [InlineData("""{"format": "nccl-swap-layout/1", "tensors": [{"name": "a", "dtype": "BF16", "shape": [2], "shards": 0, "split": 0}]}""", "tensor 'a': shards must be positive")]
    public void A_bad_layout_is_refused_naming_the_file_entry_and_field(string json, string message)
    {
        var e = Assert.Throws<LayoutException>(() => ModelLayout.Parse(Encoding.UTF8.GetBytes(json), "bad.json"));
        Assert.StartsWith("bad.json: ", e.Message);
        Assert.Contains(message, e.Message);
    }

    [Fact]
    public void A_dimension_the_ranks_cannot_divide_is_refused_naming_the_tensor()
    {
        var layout = new ModelLayout("m", [new LayoutTensor("w", Bf16, [10, 4], 0, null), new LayoutTensor("k", Bf16, [8, 4], 0, 3)]);
        Assert.Contains("tensor 'w': dimension 0 (10) does not divide into 4 parts", Assert.Throws<LayoutException>(() => TransferPlan.Create(layout, 1, 4)).Message);
        Assert.Contains("tensor 'k': 4 ranks cannot share its 3 parts evenly", Assert.Throws<LayoutException>(() => TransferPlan.Create(
            new ModelLayout("m", [layout.Tensors[1]]), 1, 4)).Message);
        Assert.Equal(2, TransferPlan.Create(layout, 1, 2).Transfers.Count(t => !t.IsBroadcast)); // 10 rows do split in two
    }

    [Fact]
    public void Names_with_ranges_expand_in_order()
    {
        Assert.Equal(["l.0.e.0", "l.0.e.1", "l.1.e.0", "l.1.e.1"], ModelLayout.Expand("l.{0..1}.e.{0..1}", "t"));
    }
}

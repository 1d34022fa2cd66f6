using System.Runtime.InteropServices;
using NcclSwap.Testing;

namespace NcclSwap.WeightSets.Tests;

public class BucketPlanTests
{
    private static readonly (string, long)[] Layout =
    [
        ("a", 100), ("b", 1000), ("empty", 0), ("big", 2500), ("c", 1), ("d", 1024), ("e", 700),
    ];

    [Fact]
    public void Tensors_are_aligned_split_and_never_straddle_unless_larger_than_a_bucket()
    {
        BucketPlan plan = BucketPlan.Create(Layout, bucketBytes: 1024, alignment: 256);
        var pieces = plan.Buckets.SelectMany(b => b.Pieces.Select(p => (b.Index, p))).ToList();
        // a at 0; b (1000) does not fit after a at 256: next bucket; empty at 1024 → next bucket, offset 0;
        // big (2500) fills from 0: 1024 + 1024 + 452; c at 512 of that bucket; d (1024) next bucket; e next.
        Assert.Equal(
        [
            (0, new BucketPiece("a", 0, 0, 100)),
            (1, new BucketPiece("b", 0, 0, 1000)),
            (2, new BucketPiece("empty", 0, 0, 0)),
            (2, new BucketPiece("big", 0, 0, 1024)),
            (3, new BucketPiece("big", 1024, 0, 1024)),
            (4, new BucketPiece("big", 2048, 0, 452)),
            (4, new BucketPiece("c", 0, 512, 1)),
            (5, new BucketPiece("d", 0, 0, 1024)),
            (6, new BucketPiece("e", 0, 0, 700)),
        ], pieces);
        Assert.All(plan.Buckets, b => Assert.InRange(b.Bytes, 0, 1024));
        Assert.All(pieces, x => Assert.Equal(0, x.p.BucketOffset % 256));
        foreach (var (name, bytes) in Layout)
            Assert.Equal(bytes, pieces.Where(x => x.p.Tensor == name).Sum(x => x.p.Bytes));
    }

    [Fact]
    public void The_plan_is_deterministic_and_survives_json()
    {
        var random = new Random(40);
        var tensors = Enumerable.Range(0, 200).Select(i => ($"t{i}", (long)random.Next(0, 300_000))).ToList();
        BucketPlan plan = BucketPlan.Create(tensors, 1 << 20, 4096);
        Assert.Equal(plan.ToJson(), BucketPlan.Create(tensors, 1 << 20, 4096).ToJson());
        BucketPlan back = BucketPlan.FromJson(plan.ToJson());
        Assert.Equal(plan.ToJson(), back.ToJson());

        var node = System.Text.Json.Nodes.JsonNode.Parse(plan.ToJson())!;
        var piece = node["buckets"]![0]!["pieces"]![1]!;
        piece["bucket_offset"] = piece["bucket_offset"]!.GetValue<long>() + 1;
        string tampered = node.ToJsonString();
        Assert.Contains("differs from the layout", Assert.Throws<FormatException>(() => BucketPlan.FromJson(tampered)).Message);
        Assert.Throws<FormatException>(() => BucketPlan.FromJson("{\"format\": \"something else\"}"));
    }

    [Fact]
    public unsafe void Bucket_digests_find_exactly_the_bucket_that_changed()
    {
        var data = Layout.ToDictionary(t => t.Item1, t => TestData.Random((int)t.Item2, seed: t.Item1.Length * 31 + (int)t.Item2));
        var handles = data.ToDictionary(kv => kv.Key, kv => GCHandle.Alloc(kv.Value, GCHandleType.Pinned));
        try
        {
            nint Source(string name) => handles[name].AddrOfPinnedObject();
            BucketPlan plan = BucketPlan.Create(Layout, 1024, 256).WithDigests(Source);
            Assert.All(plan.Buckets, b => Assert.NotNull(b.Digest));

            // Packed bytes are the pieces at their offsets with zeros between.
            byte[] packed = new byte[1024];
            plan.Pack(4, Source, packed);
            Assert.Equal(data["big"].AsSpan(2048, 452).ToArray(), packed[..452]);
            Assert.All(packed[452..512], x => Assert.Equal(0, x));
            Assert.Equal(data["c"][0], packed[512]);

            Assert.Empty(plan.ChangedBuckets(BucketPlan.Create(Layout, 1024, 256).WithDigests(Source)));
            data["big"][1500] ^= 0x10; // the second bucket of "big"
            BucketPlan next = BucketPlan.Create(Layout, 1024, 256).WithDigests(Source);
            Assert.Equal([3], next.ChangedBuckets(plan));
            Assert.Equal(next.Buckets.Select(b => b.Index), next.ChangedBuckets(BucketPlan.Create(Layout, 2048, 256)));
        }
        finally
        {
            foreach (GCHandle handle in handles.Values)
                handle.Free();
        }
    }

    [Fact]
    public void Bad_sizes_and_names_are_refused()
    {
        Assert.Throws<ArgumentException>(() => BucketPlan.Create(Layout, 1000, 256));
        Assert.Throws<ArgumentException>(() => BucketPlan.Create(Layout, 1024, 100));
        Assert.Contains("appears twice", Assert.Throws<ArgumentException>(() => BucketPlan.Create([("x", 1L), ("x", 2L)], 1024)).Message);
        Assert.Throws<ArgumentException>(() => BucketPlan.Create([("x", -1L)], 1024));
    }
}

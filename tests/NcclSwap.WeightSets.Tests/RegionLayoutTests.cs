using System.Text.Json;
using NcclSwap.DataPlane;
using NcclSwap.Testing;

namespace NcclSwap.WeightSets.Tests;

public class RegionLayoutTests
{
    [Fact]
    public void Every_rule_is_checked_and_the_error_names_the_tensor()
    {
        (string, string, long[], long)[] good = [("b", "F32", [3, 5], 0), ("a", "BF16", [7], 64)];
        RegionLayout layout = RegionLayout.Create(good);
        Assert.Equal(["a", "b"], layout.Tensors.Select(t => t.Name)); // name order, like a manifest
        Assert.Equal(60, layout["b"].Bytes);
        Assert.Equal(78, layout.Length);
        Assert.Equal(74, layout.TotalBytes);

        void Refused(string expected, params (string, string, long[], long)[] tensors) =>
            Assert.Contains(expected, Assert.Throws<LayoutException>(() => RegionLayout.Create(tensors)).Message);
        Refused("tensor 'a' appears twice", ("a", "F32", [1], 0), ("a", "F32", [1], 8));
        Refused("tensor 'a': unknown dtype 'F33'", ("a", "F33", [1], 0));
        Refused("tensor 'a': negative dimension", ("a", "F32", [2, -1], 0));
        Refused("tensor 'a': shape [4611686018427387904, 4] overflows", ("a", "F32", [1L << 62, 4], 0));
        Refused("tensor 'a': 3 values of F4 do not fill whole bytes", ("a", "F4", [3], 0));
        Refused("tensor 'a': offset -8 is out of range", ("a", "F32", [1], -8));
        Refused("tensor 'b' at offset 8 overlaps tensor 'a' ([0, 12))", ("a", "F32", [3], 0), ("b", "F32", [1], 8));
        Refused("a tensor has an empty name", ("", "F32", [1], 0));
        RegionLayout.Create([("a", "F32", [0], 0), ("b", "F32", [2], 0)]); // an empty tensor overlaps nothing
    }

    [Fact]
    public void Packing_aligns_every_tensor_and_copy_runs_join_what_lies_alike_in_both_regions()
    {
        var tensors = new (string, string, long[])[] { ("c", "U8", [300]), ("a", "F32", [10]), ("b", "F16", [129]) };
        RegionLayout packed = RegionLayout.Packed(tensors);
        Assert.Equal([0L, 256, 768], packed.Tensors.Select(t => t.Offset));
        Assert.All(packed.Tensors, t => Assert.Equal(0, t.Offset % RegionLayout.PackedAlignment));

        // The same packing on both sides: one run. Another placement: a run per stretch that lies alike.
        Assert.Equal([new CopyRun(0, 0, 768 + 300)], RegionLayout.CopyRuns(packed, packed.Pack()));
        RegionLayout scattered = RegionLayout.Create([("a", "F32", [10], 4096), ("b", "F16", [129], 4352), ("c", "U8", [300], 0)]);
        Assert.Equal([new CopyRun(0, 4096, 256 + 258), new CopyRun(768, 0, 300)], RegionLayout.CopyRuns(packed, scattered));
        Assert.Equal([new CopyRun(768, 0, 300)], RegionLayout.CopyRuns(packed, scattered, ["c"]));
        // Into memory whose gaps may belong to something else, only tensors that touch share a run.
        Assert.Equal([new CopyRun(0, 4096, 40), new CopyRun(256, 4352, 258), new CopyRun(768, 0, 300)], RegionLayout.CopyRuns(packed, scattered, joinGaps: false));

        // Moving bytes by the runs puts every tensor's bytes where the other layout says.
        byte[] from = TestData.Random((int)packed.Length, seed: 11);
        byte[] to = new byte[scattered.Length];
        foreach (CopyRun run in RegionLayout.CopyRuns(packed, scattered))
            from.AsSpan((int)run.From, (int)run.Bytes).CopyTo(to.AsSpan((int)run.To));
        foreach (TensorPlacement t in packed.Tensors)
            Assert.True(from.AsSpan((int)t.Offset, (int)t.Bytes).SequenceEqual(to.AsSpan((int)scattered[t.Name].Offset, (int)t.Bytes)), t.Name);
    }

    [Fact]
    public void Layouts_of_different_tensors_say_how_they_differ_and_round_trip_through_json()
    {
        RegionLayout a = RegionLayout.Packed([("x", "F32", [4, 4]), ("y", "F32", [4])]);
        Assert.Null(a.Mismatch(RegionLayout.Create([("y", "F32", [4], 0), ("x", "F32", [4, 4], 1000)])));
        Assert.Equal("tensor 'x' has shape [4, 5], not [4, 4]", a.Mismatch(RegionLayout.Packed([("x", "F32", [4, 5]), ("y", "F32", [4])])));
        Assert.Equal("tensor 'y' is BF16, not F32", a.Mismatch(RegionLayout.Packed([("x", "F32", [4, 4]), ("y", "BF16", [4])])));
        Assert.Equal("tensor 'y' is missing", a.Mismatch(RegionLayout.Packed([("x", "F32", [4, 4])])));
        Assert.Equal("tensor 'z' is not in the weight set", a.Mismatch(RegionLayout.Packed([("x", "F32", [4, 4]), ("y", "F32", [4]), ("z", "U8", [1])])));
        Assert.Contains("hold different tensors", Assert.Throws<LayoutException>(() => RegionLayout.CopyRuns(a, RegionLayout.Packed([("x", "F32", [4, 4])]))).Message);

        var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream))
            a.WriteJson(writer);
        using JsonDocument json = JsonDocument.Parse(stream.ToArray());
        RegionLayout back = RegionLayout.FromJson(json.RootElement);
        Assert.Equal(a.Tensors.Select(t => (t.Name, t.Dtype, t.ShapeText, t.Offset, t.Bytes)), back.Tensors.Select(t => (t.Name, t.Dtype, t.ShapeText, t.Offset, t.Bytes)));
        using JsonDocument bad = JsonDocument.Parse("[{\"name\": \"x\", \"dtype\": \"F32\", \"shape\": [1, \"two\"], \"offset\": 0}]");
        Assert.Equal("tensor 'x': shape must be an array of whole numbers", Assert.Throws<LayoutException>(() => RegionLayout.FromJson(bad.RootElement)).Message);
    }

    [Fact]
    public void The_synthetic_model_has_llama_names_and_bytes_that_depend_on_the_version()
    {
        RegionLayout layout = SyntheticModel.Tiny.Layout();
        Assert.Contains(layout.Tensors, t => t.Name == "model.layers.1.self_attn.k_proj.weight" && t.ShapeText == "[32, 64]");
        Assert.Equal(2 + 9 * SyntheticModel.Tiny.Layers + 1, layout.Tensors.Count);
        Assert.Equal(SyntheticModel.Tiny, SyntheticModel.Parse(SyntheticModel.Tiny.ToString()));
        byte[] one = new byte[1000], again = new byte[1000], two = new byte[1000];
        SyntheticModel.Fill(1, "w", one);
        SyntheticModel.Fill(1, "w", again);
        SyntheticModel.Fill(2, "w", two);
        Assert.Equal(one, again);
        Assert.NotEqual(one, two);
        Assert.Contains(one, b => b != 0);
        Assert.NotEqual(SyntheticModel.Expected(1, layout), SyntheticModel.Expected(2, layout));
    }
}

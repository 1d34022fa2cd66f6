using System.Text.Json;
using NcclSwap.Cuda;

namespace NcclSwap.WeightSets.Tests;

public class CheckpointTests
{
    /// <summary>Three shards and an index, as transformers writes them.</summary>
    private static List<TensorData> WriteSharded(Files files, int seed)
    {
        var f32 = Dtype.Parse("F32");
        var bf16 = Dtype.Parse("BF16");
        var tensors = new List<TensorData>();
        for (int i = 0; i < 9; i++)
            tensors.Add(Files.Make($"model.layers.{i}.weight", i % 2 == 0 ? bf16 : f32, [17 + i, 33], seed + i));
        var weightMap = new Dictionary<string, string>();
        for (int shard = 0; shard < 3; shard++)
        {
            string name = $"model-{shard + 1:00000}-of-00003.safetensors";
            var part = tensors.Skip(shard * 3).Take(3).ToList();
            SafetensorsWriter.Write(files.PathOf(name), part, new Dictionary<string, string> { ["format"] = "pt" });
            foreach (TensorData t in part)
                weightMap[t.Name] = name;
        }
        WriteIndex(files, weightMap);
        return tensors;
    }

    private static void WriteIndex(Files files, Dictionary<string, string> weightMap) =>
        File.WriteAllText(files.PathOf(Checkpoint.IndexFileName),
            JsonSerializer.Serialize(new Dictionary<string, object> { ["metadata"] = new Dictionary<string, long> { ["total_size"] = 0 }, ["weight_map"] = weightMap }));

    [Fact]
    public void A_sharded_checkpoint_loads_every_tensor_exactly_with_progress()
    {
        using var files = new Files();
        List<TensorData> tensors = WriteSharded(files, seed: 20);
        Checkpoint checkpoint = Checkpoint.Open(files.Folder);
        Assert.Equal(3, checkpoint.Files.Count);
        Assert.Equal(tensors.Sum(t => t.Data.Length), checkpoint.TotalBytes);

        var reports = new List<LoadProgress>();
        using LoadedCheckpoint loaded = CheckpointLoader.Load(checkpoint, PinnedBuffer.AllocatePageable,
            new SynchronousProgress(p => { lock (reports) reports.Add(p); }), readers: 3, chunkBytes: 1000);
        foreach (TensorData expected in tensors)
            Assert.Equal(expected.Data.ToArray(), loaded.Bytes(checkpoint.Tensors.Single(t => t.Name == expected.Name)).ToArray());
        Assert.True(reports.Count > 3);
        Assert.Equal(checkpoint.Files.Sum(f => f.DataLength), reports.Max(r => r.BytesDone));
        Assert.All(reports, r => Assert.Equal(reports[0].BytesTotal, r.BytesTotal));
        Assert.True(loaded.BytesPerSecond > 0);
    }

    [Fact]
    public void An_index_naming_a_missing_shard_is_refused_naming_the_tensor()
    {
        using var files = new Files();
        WriteSharded(files, seed: 21);
        File.Delete(files.PathOf("model-00002-of-00003.safetensors"));
        var e = Assert.Throws<SafetensorsException>(() => Checkpoint.Open(files.Folder));
        Assert.Equal("missing shard", e.Rule);
        Assert.Equal("model.layers.3.weight", e.Tensor);
        Assert.Contains("model-00002-of-00003.safetensors", e.Message);
    }

    [Fact]
    public void An_index_naming_a_tensor_its_shard_lacks_is_refused()
    {
        using var files = new Files();
        List<TensorData> tensors = WriteSharded(files, seed: 22);
        var map = tensors.Select((t, i) => (t.Name, File: $"model-{i / 3 + 1:00000}-of-00003.safetensors")).ToDictionary(x => x.Name, x => x.File);
        map["model.layers.99.weight"] = "model-00001-of-00003.safetensors";
        WriteIndex(files, map);
        var e = Assert.Throws<SafetensorsException>(() => Checkpoint.Open(files.Folder));
        Assert.Equal("tensor missing from its shard", e.Rule);
        Assert.Equal("model.layers.99.weight", e.Tensor);
    }

    [Fact]
    public void A_shard_tensor_the_index_does_not_list_is_refused()
    {
        using var files = new Files();
        List<TensorData> tensors = WriteSharded(files, seed: 23);
        var map = tensors.Select((t, i) => (t.Name, File: $"model-{i / 3 + 1:00000}-of-00003.safetensors")).ToDictionary(x => x.Name, x => x.File);
        map.Remove("model.layers.4.weight");
        WriteIndex(files, map);
        var e = Assert.Throws<SafetensorsException>(() => Checkpoint.Open(files.Folder));
        Assert.Equal("tensor not in the index", e.Rule);
        Assert.Equal("model.layers.4.weight", e.Tensor);
    }

    [Fact]
    public void Folders_without_an_index_need_exactly_one_file()
    {
        using var files = new Files();
        var f32 = Dtype.Parse("F32");
        SafetensorsWriter.Write(files.PathOf("a.safetensors"), [Files.Make("x", f32, [2], 1)]);
        Assert.Single(Checkpoint.Open(files.Folder).Tensors);
        SafetensorsWriter.Write(files.PathOf("b.safetensors"), [Files.Make("y", f32, [2], 2)]);
        Assert.Equal("no index", Assert.Throws<SafetensorsException>(() => Checkpoint.Open(files.Folder)).Rule);
        Assert.Throws<FileNotFoundException>(() => Checkpoint.Open(files.PathOf("nothing-here")));
    }

    [Fact]
    public void A_file_cut_short_after_its_header_was_read_fails_the_load_and_frees_everything()
    {
        using var files = new Files();
        string path = files.PathOf("cut.safetensors");
        SafetensorsWriter.Write(path, [Files.Make("x", Dtype.Parse("U8"), [100_000], 5)]);
        Checkpoint checkpoint = Checkpoint.Open(path);
        using (var stream = new FileStream(path, FileMode.Open))
            stream.SetLength(stream.Length - 10);
        var allocated = new List<PinnedBuffer>();
        var e = Assert.Throws<IOException>(() => CheckpointLoader.Load(checkpoint, n => { var b = PinnedBuffer.AllocatePageable(n); allocated.Add(b); return b; }));
        Assert.Contains(path, e.Message);
        Assert.All(allocated, b => Assert.True(b.IsDisposed));
    }

    private sealed class SynchronousProgress(Action<LoadProgress> report) : IProgress<LoadProgress>
    {
        public void Report(LoadProgress value) => report(value);
    }
}

using NcclSwap.Cuda;

namespace NcclSwap.WeightSets.Tests;

public class SafetensorsTests
{
    [Fact]
    public void Every_dtype_scalars_empty_tensors_and_metadata_round_trip()
    {
        using var files = new Files();
        List<TensorData> tensors = Files.EveryDtype(seed: 10);
        var metadata = new Dictionary<string, string> { ["format"] = "pt", ["note"] = "ünïcode ✓" };
        string path = files.PathOf("all.safetensors");
        SafetensorsWriter.Write(path, tensors, metadata);

        SafetensorsFile file = SafetensorsFile.Open(path);
        Assert.Equal(0, file.HeaderLength % 8);
        Assert.Equal(metadata, file.Metadata);
        Assert.Equal(tensors.Count, file.Tensors.Count);
        using LoadedCheckpoint loaded = CheckpointLoader.Load(Checkpoint.Open(path), PinnedBuffer.AllocatePageable);
        foreach (TensorData expected in tensors)
        {
            TensorInfo info = Assert.Single(file.Tensors, t => t.Name == expected.Name);
            Assert.Equal(expected.Dtype, info.Dtype);
            Assert.Equal(expected.Shape, info.Shape);
            Assert.Equal(expected.Data.ToArray(), loaded.Bytes(info).ToArray());
        }
        Assert.Contains(file.Tensors, t => t.Shape.Length == 0 && t.Bytes == 4);
        Assert.Contains(file.Tensors, t => t.Bytes == 0);
        Assert.Equal(20, Dtype.All.Count);
    }

    [Fact]
    public void The_writer_refuses_bad_tensors_and_leaves_no_file()
    {
        using var files = new Files();
        string path = files.PathOf("bad.safetensors");
        var f32 = Dtype.Parse("F32");
        var wrongSize = new TensorData("w", f32, [3], new byte[8]);
        var e = Assert.Throws<SafetensorsException>(() => SafetensorsWriter.Write(path, [wrongSize]));
        Assert.Equal("byte length", e.Rule);
        Assert.Equal("w", e.Tensor);
        var twice = Assert.Throws<SafetensorsException>(() => SafetensorsWriter.Write(path, [Files.Make("a", f32, [1], 1), Files.Make("a", f32, [1], 2)]));
        Assert.Equal("duplicate name", twice.Rule);
        Assert.Empty(Directory.GetFiles(files.Folder));
    }

    public static TheoryData<string, string, string?> MalformedHeaders() => new()
    {
        // header text, rule, tensor named in the error
        { "[1, 2]", "header start", null },
        { " {\"a\":{}}", "header start", null },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}", "invalid JSON", null },
        { "{\"a\": {\"dtype\": \"F128\", \"shape\": [1], \"data_offsets\": [0, 4]}}", "unknown dtype", "a" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [-1, 2], \"data_offsets\": [0, 4]}}", "negative dimension", "a" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296], \"data_offsets\": [0, 4]}}", "shape overflows", "a" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}", "invalid shape", "a" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}", "invalid data_offsets", "a" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [-4, 0]}}", "invalid data_offsets", "a" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [8, 4]}}", "offsets out of order", "a" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", "offsets out of range", "a" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}}", "byte length", "a" },
        { "{\"a\": {\"dtype\": \"F4\", \"shape\": [3], \"data_offsets\": [0, 2]}}", "byte length", "a" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, \"b\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", "offsets overlap", "b" },
        { "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", "hole in the data", "a" },
        { "{\"b\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [4, 8]}}", "hole in the data", "b" },
        { "{\"a\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [0, 8]}, \"a\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [8, 8]}}", "duplicate name", "a" },
        { "{\"__metadata__\": {\"k\": 1}, \"a\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [0, 8]}}", "metadata", null },
        { "{\"a\": {\"dtype\": \"U8\", \"data_offsets\": [0, 8]}}", "missing field", "a" },
        { "{\"a\": [1, 2]}", "invalid entry", "a" },
    };

    [Theory]
    [MemberData(nameof(MalformedHeaders))]
    public void Every_rule_of_the_format_is_checked_with_file_tensor_and_rule_named(string header, string rule, string? tensor)
    {
        using var files = new Files();
        string path = files.Raw("bad.safetensors", header, Testing.TestData.Random(8, seed: 1));
        var e = Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(path));
        Assert.Equal(rule, e.Rule);
        Assert.Equal(tensor, e.Tensor);
        Assert.StartsWith(path + ": ", e.Message);
    }

    [Fact]
    public void Bad_lengths_and_bytes_of_the_header_are_checked()
    {
        using var files = new Files();
        string tiny = files.PathOf("tiny.safetensors");
        File.WriteAllBytes(tiny, [1, 2, 3]);
        Assert.Equal("file too short", Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(tiny)).Rule);

        string huge = files.Raw("huge.safetensors", "{}", [], claimedLength: 100_000_001);
        var tooLarge = Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(huge));
        Assert.Equal("header too large", tooLarge.Rule);
        Assert.Contains("100000001", tooLarge.Message);

        string beyond = files.Raw("beyond.safetensors", "{}", [], claimedLength: 1000);
        Assert.Equal("header beyond the file", Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(beyond)).Rule);

        byte[] notUtf8 = [.. "{\"a"u8, 0xFF, 0xFE, .. "\": {\"dtype\": \"U8\", \"shape\": [0], \"data_offsets\": [0, 0]}}"u8];
        string badText = files.RawBytes("utf8.safetensors", notUtf8, []);
        Assert.Equal("invalid UTF-8", Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(badText)).Rule);

        string empty = files.Raw("empty.safetensors", "", []);
        Assert.Equal("header start", Assert.Throws<SafetensorsException>(() => SafetensorsFile.Open(empty)).Rule);
    }

    [Fact]
    public void Tensors_may_be_listed_in_any_order_in_the_header()
    {
        using var files = new Files();
        byte[] data = Testing.TestData.Random(12, seed: 4);
        string path = files.Raw("order.safetensors",
            "{\"b\": {\"dtype\": \"U8\", \"shape\": [8], \"data_offsets\": [4, 12]}, \"a\": {\"dtype\": \"F32\", \"shape\": [], \"data_offsets\": [0, 4]}}      ", data);
        SafetensorsFile file = SafetensorsFile.Open(path);
        Assert.Equal(["a", "b"], file.Tensors.Select(t => t.Name));
        Assert.Equal(8 + file.HeaderLength + 4, file.Tensors[1].FileOffset);
    }
}

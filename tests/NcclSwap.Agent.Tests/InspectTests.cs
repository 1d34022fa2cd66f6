using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using NcclSwap.Testing;
using NcclSwap.WeightSets;

namespace NcclSwap.Agent.Tests;

public sealed class InspectTests : IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-inspect-").FullName;

    private static (int Code, string Output, string Error) Run(params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        int code = Program.BuildCommandLine(output, error).Parse(args).Invoke(new() { Output = output, Error = error });
        return (code, output.ToString(), error.ToString());
    }

    private List<TensorData> WriteCheckpoint()
    {
        var tensors = new List<TensorData>
        {
            new("embed.weight", Dtype.Parse("BF16"), [32, 16], TestData.Random(1024, seed: 1)),
            new("layer.0.bias", Dtype.Parse("F32"), [16], TestData.Random(64, seed: 2)),
            new("scale", Dtype.Parse("F8_E4M3"), [], TestData.Random(1, seed: 3)),
        };
        SafetensorsWriter.Write(Path.Combine(_folder, "model-00001-of-00002.safetensors"), tensors[..2]);
        SafetensorsWriter.Write(Path.Combine(_folder, "model-00002-of-00002.safetensors"), tensors[2..]);
        File.WriteAllText(Path.Combine(_folder, Checkpoint.IndexFileName), JsonSerializer.Serialize(new Dictionary<string, object>
        {
            ["weight_map"] = new Dictionary<string, string>
            {
                ["embed.weight"] = "model-00001-of-00002.safetensors",
                ["layer.0.bias"] = "model-00001-of-00002.safetensors",
                ["scale"] = "model-00002-of-00002.safetensors",
            },
        }));
        return tensors;
    }

    [Fact]
    public void Inspect_lists_every_tensor_the_totals_and_the_manifest_digest()
    {
        WriteCheckpoint();
        (int code, string output, _) = Run("inspect", _folder);
        Assert.Equal(0, code);
        Assert.Matches(@"embed\.weight\s+BF16\s+\[32, 16\]\s+1,024\s+model-00001-of-00002\.safetensors", output);
        Assert.Matches(@"scale\s+F8_E4M3\s+\[\]\s+1\s+model-00002-of-00002\.safetensors", output);
        Assert.Contains("3 tensors in 2 file(s), 1,089 bytes", output);
        Assert.Matches("manifest digest [0-9a-f]{16}, sha256 [0-9a-f]{64}", output);
    }

    [Fact]
    public void Inspect_json_has_the_documented_fields_and_the_same_digest()
    {
        List<TensorData> tensors = WriteCheckpoint();
        (int code, string output, _) = Run("inspect", _folder, "--json");
        Assert.Equal(0, code);
        using JsonDocument document = JsonDocument.Parse(output);
        JsonElement root = document.RootElement;
        Assert.Equal(1089, root.GetProperty("total_bytes").GetInt64());
        var listed = root.GetProperty("tensors").EnumerateArray().ToList();
        Assert.Equal(3, listed.Count);
        JsonElement embed = listed.Single(t => t.GetProperty("name").GetString() == "embed.weight");
        Assert.Equal("BF16", embed.GetProperty("dtype").GetString());
        Assert.Equal([32, 16], embed.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64()));
        Assert.Equal(1024, embed.GetProperty("bytes").GetInt64());
        Assert.Equal("model-00001-of-00002.safetensors", embed.GetProperty("file").GetString());
        Assert.Equal(DataPlane.BlockDigest.Compute(tensors[0].Data.Span).ToString(), embed.GetProperty("digest").GetString());

        (_, string text, _) = Run("inspect", _folder);
        Assert.Contains($"manifest digest {root.GetProperty("digest").GetString()}, sha256 {root.GetProperty("sha256").GetString()}", text);
    }

    [Fact]
    public void A_malformed_file_exits_non_zero_with_the_specific_error_on_stderr()
    {
        string path = Path.Combine(_folder, "bad.safetensors");
        byte[] header = Encoding.UTF8.GetBytes("{\"w\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}}");
        byte[] bytes = new byte[8 + header.Length + 8];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, (ulong)header.Length);
        header.CopyTo(bytes, 8);
        File.WriteAllBytes(path, bytes);
        (int code, string output, string error) = Run("inspect", path);
        Assert.Equal(1, code);
        Assert.Equal("", output);
        Assert.Contains($"nccl-swap inspect: {path}: tensor 'w': byte length: data_offsets [0, 8] hold 8 bytes, but F32 × [3] needs 12", error);

        (int missing, _, string why) = Run("inspect", Path.Combine(_folder, "nope"));
        Assert.Equal(1, missing);
        Assert.Contains("no such file or folder", why);
    }

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}

using System.Diagnostics;
using System.Security.Cryptography;
using System.Text.Json;
using NcclSwap.Cuda;
using NcclSwap.Testing;
using NcclSwap.WeightSets;

namespace NcclSwap.Gpu.Tests;

/// <summary>
/// The checkpoint format against the reference implementations: the Python safetensors library reads what
/// the writer wrote, and what transformers saved loads intact. They run where Python has those libraries
/// (the GPU machine) and skip, saying so, elsewhere.
/// </summary>
public sealed class PythonInteropTests : IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-python-").FullName;

    [Fact]
    public void Every_dtype_written_here_is_read_by_the_python_safetensors_library()
    {
        RequirePython("safetensors");
        var files = new Dictionary<string, TensorData>();
        int seed = TestData.NewSeed();
        foreach (Dtype dtype in Dtype.All)
        {
            long[] shape = dtype.Bits switch { 4 => [6, 10], 6 => [4, 5], _ => [3, 7] };
            long bytes = dtype.ByteLength(shape.Aggregate(1L, (a, b) => a * b))!.Value;
            var tensor = new TensorData($"w.{dtype.Name}", dtype, shape, TestData.Random((int)bytes, seed++));
            string path = Path.Combine(_folder, $"{dtype.Name}.safetensors");
            SafetensorsWriter.Write(path, [tensor, new TensorData("scalar", Dtype.Parse("F32"), [], TestData.Random(4, seed++)), new TensorData("empty", dtype, [0, 8], Array.Empty<byte>())],
                new Dictionary<string, string> { ["written_by"] = "nccl-swap", ["dtype"] = dtype.Name });
            files[path] = tensor;
        }

        using JsonDocument report = RunPython("read_safetensors.py", [.. files.Keys]);
        Console.WriteLine($"python safetensors {report.RootElement.GetProperty("version").GetString()}");
        var refused = new List<string>();
        foreach (var (path, tensor) in files)
        {
            JsonElement result = report.RootElement.GetProperty("files").GetProperty(path);
            if (!result.GetProperty("ok").GetBoolean())
            {
                refused.Add($"{tensor.Dtype}: {result.GetProperty("error").GetString()}");
                continue;
            }
            JsonElement read = result.GetProperty("tensors").GetProperty(tensor.Name);
            Assert.Equal(tensor.Dtype.Name, read.GetProperty("dtype").GetString());
            Assert.Equal(tensor.Shape, read.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64()));
            Assert.Equal(Sha256(tensor.Data.Span), read.GetProperty("sha256").GetString());
            Assert.Equal(Sha256(ReadOnlySpan<byte>.Empty), result.GetProperty("tensors").GetProperty("empty").GetProperty("sha256").GetString());
            Assert.Equal("nccl-swap", result.GetProperty("metadata").GetProperty("written_by").GetString());
        }
        Assert.True(refused.Count == 0, "the python library refused: " + string.Join("; ", refused));
    }

    [Fact]
    public void A_sharded_checkpoint_saved_by_transformers_loads_with_every_tensor_intact()
    {
        RequirePython("transformers");
        string folder = Path.Combine(_folder, "llama");
        using JsonDocument reference = RunPython("save_transformers.py", [folder]);
        Console.WriteLine($"transformers {reference.RootElement.GetProperty("transformers").GetString()}, torch {reference.RootElement.GetProperty("torch").GetString()}");

        Checkpoint checkpoint = Checkpoint.Open(folder);
        Assert.True(checkpoint.Files.Count > 1, $"expected several shards, got {checkpoint.Files.Count}");
        using LoadedCheckpoint loaded = CheckpointLoader.Load(checkpoint, PinnedBuffer.AllocatePageable);
        var expected = reference.RootElement.GetProperty("tensors").EnumerateObject().ToDictionary(p => p.Name, p => p.Value);
        Assert.Equal(expected.Keys.Order(StringComparer.Ordinal), checkpoint.Tensors.Select(t => t.Name).Order(StringComparer.Ordinal));
        foreach (TensorInfo tensor in checkpoint.Tensors)
        {
            JsonElement want = expected[tensor.Name];
            Assert.Equal("BF16", tensor.Dtype.Name);
            Assert.Equal(want.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64()), tensor.Shape);
            Assert.True(want.GetProperty("sha256").GetString() == Sha256(loaded.Bytes(tensor)), $"tensor {tensor.Name} differs from transformers' state dict");
        }
        Manifest manifest = loaded.CreateManifest();
        Assert.Equal(checkpoint.Tensors.Count, manifest.Tensors.Count);
    }

    private static string Sha256(ReadOnlySpan<byte> bytes) => Convert.ToHexStringLower(SHA256.HashData(bytes));

    private static void RequirePython(string module)
    {
        try
        {
            using Process probe = Process.Start(new ProcessStartInfo("python3", ["-c", $"import {module}"]) { RedirectStandardError = true, RedirectStandardOutput = true })!;
            probe.WaitForExit(60_000);
            Assert.SkipUnless(probe.ExitCode == 0, $"needs python3 with {module} (the GPU machine has it): {probe.StandardError.ReadToEnd().Trim().Split('\n').LastOrDefault()}");
        }
        catch (System.ComponentModel.Win32Exception)
        {
            Assert.Skip($"needs python3 with {module}: no python3 on PATH");
        }
    }

    private JsonDocument RunPython(string script, string[] args)
    {
        string path = Path.Combine(_folder, script);
        using (Stream resource = typeof(PythonInteropTests).Assembly.GetManifestResourceStream(script)!)
        using (FileStream file = File.Create(path))
            resource.CopyTo(file);
        using Process python = Process.Start(new ProcessStartInfo("python3", [path, .. args]) { RedirectStandardOutput = true, RedirectStandardError = true })!;
        Task<string> stderr = python.StandardError.ReadToEndAsync();
        string stdout = python.StandardOutput.ReadToEnd();
        Assert.True(python.WaitForExit(300_000), $"{script} did not finish in 5 minutes");
        Assert.True(python.ExitCode == 0, $"{script} exited {python.ExitCode}: {stderr.Result}");
        return JsonDocument.Parse(stdout.Trim().Split('\n').Last());
    }

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}

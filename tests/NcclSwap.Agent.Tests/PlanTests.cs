using System.Text.Json;

namespace NcclSwap.Agent.Tests;

public sealed class PlanTests : IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-plan-").FullName;

    private static (int Code, string Output, string Error) Run(params string[] args)
    {
        var output = new StringWriter();
        var error = new StringWriter();
        int code = Program.BuildCommandLine(output, error).Parse(args).Invoke(new() { Output = output, Error = error });
        return (code, output.ToString(), error.ToString());
    }

    private static string Layout(string name) => Path.Combine(AppContext.BaseDirectory, "layouts", name);

    [Fact]
    public void Qwen3_235B_on_tp8_gives_each_destination_an_eighth_of_what_a_broadcast_of_everything_would()
    {
        var (code, output, error) = Run("plan", "--layout", Layout("qwen3-235b-a22b.json"), "--sources", "2", "--tp", "8", "--json");
        Assert.True(code == 0, error);
        using JsonDocument plan = JsonDocument.Parse(output);
        JsonElement root = plan.RootElement;
        long model = root.GetProperty("model_bytes").GetInt64();
        Assert.Equal(model * 8, root.GetProperty("broadcast_bytes").GetInt64());
        JsonElement[] destinations = root.GetProperty("destinations").EnumerateArray().ToArray();
        Assert.Equal(8, destinations.Length);
        foreach (JsonElement d in destinations)
            Assert.InRange(d.GetProperty("bytes").GetInt64(), model / 8, model / 8 + model / 100); // its shards and the small replicated tensors
        Assert.Equal(2, root.GetProperty("sources").GetArrayLength());
        JsonElement[] transfers = root.GetProperty("transfers").EnumerateArray().ToArray();
        Assert.Contains(transfers, t => t.GetProperty("kind").GetString() == "broadcast" && t.GetProperty("destinations").GetArrayLength() == 8); // norms, router
        Assert.Contains(transfers, t => t.GetProperty("kind").GetString() == "broadcast" && t.GetProperty("destinations").GetArrayLength() == 2); // 4 key/value heads
        Assert.Contains(transfers, t => t.GetProperty("kind").GetString() == "send");
    }

    [Fact]
    public void The_text_summary_says_what_each_destination_receives_against_the_broadcast()
    {
        var (code, output, error) = Run("plan", "--layout", Layout("llama-3-8b.json"), "--tp", "4");
        Assert.True(code == 0, error);
        Assert.Contains("Llama-3-8B: 291 tensors, 16.06 GB; 1 source(s) → TP4", output);
        Assert.Contains("destination 3: receives 4.02 GB", output);
        Assert.Contains("16.06 GB per destination, 64.24 GB in all", output);
    }

    [Fact]
    public void Bad_arguments_and_bad_layouts_are_refused_saying_why()
    {
        var (code, _, error) = Run("plan", "--layout", Layout("llama-3-8b.json"), "--tp", "0");
        Assert.Equal(2, code);
        Assert.Contains("--tp (0)", error);

        (code, _, error) = Run("plan", "--layout", Layout("llama-3-8b.json"), "--tp", "3");
        Assert.Equal(1, code);
        Assert.Contains("does not divide into 3 parts", error);

        string bad = Path.Combine(_folder, "bad.json");
        File.WriteAllText(bad, """{"format": "nccl-swap-layout/1", "tensors": [{"name": "w", "dtype": "BF16"}]}""");
        (code, _, error) = Run("plan", "--layout", bad, "--tp", "2");
        Assert.Equal(1, code);
        Assert.Contains($"{bad}: tensors[0] ('w'): \"shape\" must be an array of integers", error);

        (code, _, error) = Run("plan", "--layout", Path.Combine(_folder, "missing.json"), "--tp", "2");
        Assert.Equal(1, code);
        Assert.Contains("missing.json", error);
    }

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}

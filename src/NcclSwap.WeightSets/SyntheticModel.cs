using System.Globalization;
using System.IO.Hashing;
using System.Text;

namespace NcclSwap.WeightSets;

/// <summary>
/// A generated model with the names and shapes of a Llama checkpoint, scaled down, whose bytes are a function of
/// (version, tensor name): a publisher writes version v, and a consumer that believes it serves version v can
/// check every byte it reads against what v must hold, so a torn or unverified version cannot go unseen.
/// </summary>
public sealed record SyntheticModel(int Layers, int Hidden, int Intermediate, int Vocabulary, int Heads, int KeyValueHeads, string Dtype = "BF16")
{
    /// <summary>Small enough to publish a thousand versions in seconds on two cores (about 0.2 MB in BF16).</summary>
    public static SyntheticModel Tiny { get; } = new(2, 64, 172, 256, 4, 2);

    /// <summary>A few tens of MB in BF16: the demo's model.</summary>
    public static SyntheticModel Small { get; } = new(4, 512, 1376, 8192, 8, 2);

    /// <summary>The tensors, named as transformers names a LlamaForCausalLM's state dict.</summary>
    public IReadOnlyList<(string Name, string Dtype, long[] Shape)> Tensors()
    {
        int headDim = Hidden / Heads;
        var tensors = new List<(string, string, long[])> { ("model.embed_tokens.weight", Dtype, [Vocabulary, Hidden]) };
        for (int i = 0; i < Layers; i++)
        {
            string p = $"model.layers.{i}.";
            tensors.Add((p + "self_attn.q_proj.weight", Dtype, [Heads * headDim, Hidden]));
            tensors.Add((p + "self_attn.k_proj.weight", Dtype, [KeyValueHeads * headDim, Hidden]));
            tensors.Add((p + "self_attn.v_proj.weight", Dtype, [KeyValueHeads * headDim, Hidden]));
            tensors.Add((p + "self_attn.o_proj.weight", Dtype, [Hidden, Heads * headDim]));
            tensors.Add((p + "mlp.gate_proj.weight", Dtype, [Intermediate, Hidden]));
            tensors.Add((p + "mlp.up_proj.weight", Dtype, [Intermediate, Hidden]));
            tensors.Add((p + "mlp.down_proj.weight", Dtype, [Hidden, Intermediate]));
            tensors.Add((p + "input_layernorm.weight", Dtype, [Hidden]));
            tensors.Add((p + "post_attention_layernorm.weight", Dtype, [Hidden]));
        }
        tensors.Add(("model.norm.weight", Dtype, [Hidden]));
        tensors.Add(("lm_head.weight", Dtype, [Vocabulary, Hidden]));
        return tensors;
    }

    /// <summary>The tensors packed in name order: how a client lays out its region.</summary>
    public RegionLayout Layout() => RegionLayout.Packed(Tensors());

    /// <summary>"layers:hidden:intermediate:vocabulary:heads:kv-heads[:dtype]", for command lines.</summary>
    public override string ToString() => string.Join(':', Layers, Hidden, Intermediate, Vocabulary, Heads, KeyValueHeads, Dtype);

    public static SyntheticModel Parse(string text)
    {
        string[] parts = text.Split(':');
        if (parts.Length is not (6 or 7) || !parts[..6].All(p => int.TryParse(p, CultureInfo.InvariantCulture, out int v) && v > 0))
            throw new FormatException($"'{text}' is not layers:hidden:intermediate:vocabulary:heads:kv-heads[:dtype] with positive numbers");
        int[] n = parts[..6].Select(p => int.Parse(p, CultureInfo.InvariantCulture)).ToArray();
        return new SyntheticModel(n[0], n[1], n[2], n[3], n[4], n[5], parts.Length == 7 ? parts[6] : "BF16");
    }

    /// <summary>Writes version <paramref name="version"/> of every tensor into a region laid out as <paramref name="layout"/>.</summary>
    public static unsafe void Fill(ulong version, RegionLayout layout, nint region)
    {
        Parallel.ForEach(layout.Tensors, tensor =>
            Fill(version, tensor.Name, new Span<byte>((byte*)region + tensor.Offset, checked((int)tensor.Bytes))));
    }

    /// <summary>
    /// The bytes of <paramref name="tensor"/> at <paramref name="version"/>: SplitMix64 from a seed hashed from both,
    /// eight bytes at a time (a few GB/s, so that generating and checking versions is cheap next to moving them).
    /// </summary>
    public static void Fill(ulong version, string tensor, Span<byte> destination)
    {
        ulong state = Seed(version, tensor);
        Span<ulong> words = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ulong>(destination);
        for (int i = 0; i < words.Length; i++)
            words[i] = Next(ref state);
        Span<byte> tail = destination[(words.Length * 8)..];
        if (tail.Length > 0)
        {
            ulong last = Next(ref state);
            for (int i = 0; i < tail.Length; i++)
                tail[i] = (byte)(last >> (8 * i));
        }
    }

    private static ulong Next(ref ulong state)
    {
        ulong z = state += 0x9E3779B97F4A7C15;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
        return z ^ (z >> 31);
    }

    /// <summary>What <see cref="Hash"/> gives for a region holding <paramref name="version"/> exactly.</summary>
    public static ulong Expected(ulong version, RegionLayout layout)
    {
        var hash = new XxHash64();
        foreach (TensorPlacement tensor in layout.Tensors)
        {
            byte[] bytes = new byte[tensor.Bytes];
            Fill(version, tensor.Name, bytes);
            hash.Append(bytes);
        }
        return hash.GetCurrentHashAsUInt64();
    }

    /// <summary>One hash over every tensor's bytes of a region, in layout order (gaps excluded).</summary>
    public static unsafe ulong Hash(RegionLayout layout, nint region)
    {
        var hash = new XxHash64();
        foreach (TensorPlacement tensor in layout.Tensors)
            hash.Append(new ReadOnlySpan<byte>((byte*)region + tensor.Offset, checked((int)tensor.Bytes)));
        return hash.GetCurrentHashAsUInt64();
    }

    private static ulong Seed(ulong version, string tensor) => XxHash64.HashToUInt64(Encoding.UTF8.GetBytes($"{version}/{tensor}"));
}

using System.Text.Json;
using System.Text.RegularExpressions;

namespace NcclSwap.WeightSets;

/// <summary>
/// One tensor of a model as tensor-parallel engines hold it: whole on every rank (<see cref="SplitDimension"/> null),
/// or cut along one dimension into at most <see cref="Shards"/> parts (null: as many as there are ranks). With more
/// ranks than parts, neighbouring ranks hold the same part (key/value heads fewer than the ranks).
/// </summary>
public sealed record LayoutTensor(string Name, Dtype Dtype, long[] Shape, int? SplitDimension, int? Shards)
{
    public long Elements => Shape.Aggregate(1L, (a, d) => checked(a * d));

    public long Bytes => Dtype.ByteLength(Elements) ?? throw new LayoutException($"tensor '{Name}': {Elements} {Dtype} values do not fill whole bytes");
}

/// <summary>
/// A model's tensors and how tensor-parallel engines split them, read from a layout file:
/// <c>{"format": "nccl-swap-layout/1", "model": NAME, "tensors": [{"name", "dtype", "shape", "split"?, "shards"?}, ...]}</c>.
/// <c>split</c> is the dimension the engines cut (absent or null: replicated); <c>shards</c> caps the parts (for
/// example the key/value heads). A name may hold ranges <c>{a..b}</c>, which expand to one tensor per value (every
/// combination when there are several), so a 94-layer, 128-expert model takes a page. Errors name the file, the
/// entry and the field.
/// </summary>
public sealed class ModelLayout
{
    public const string Format = "nccl-swap-layout/1";

    private static readonly Regex s_range = new(@"\{(\d+)\.\.(\d+)\}", RegexOptions.CultureInvariant);

    public ModelLayout(string model, IReadOnlyList<LayoutTensor> tensors)
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (LayoutTensor t in tensors)
        {
            if (!names.Add(t.Name))
                throw new LayoutException($"tensor '{t.Name}' appears twice");
            if (t.SplitDimension is int d && (d < 0 || d >= t.Shape.Length))
                throw new LayoutException($"tensor '{t.Name}': split dimension {d} is not one of its {t.Shape.Length} dimensions");
            if (t.Shards is <= 0)
                throw new LayoutException($"tensor '{t.Name}': shards must be positive, not {t.Shards}");
            if (t.Shape.Any(x => x < 0))
                throw new LayoutException($"tensor '{t.Name}': shape [{string.Join(", ", t.Shape)}] has a negative dimension");
            _ = t.Bytes;
        }
        Model = model;
        Tensors = tensors;
    }

    public string Model { get; }

    public IReadOnlyList<LayoutTensor> Tensors { get; }

    public long TotalBytes => Tensors.Sum(t => t.Bytes);

    public static ModelLayout Load(string path)
    {
        try
        {
            return Parse(File.ReadAllBytes(path), path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new LayoutException($"{path}: {e.Message}");
        }
    }

    public static ModelLayout Parse(ReadOnlySpan<byte> json, string source)
    {
        try
        {
            using JsonDocument document = JsonDocument.Parse(json.ToArray());
            JsonElement root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new LayoutException("the document is not a JSON object");
            if (!root.TryGetProperty("format", out JsonElement format) || format.ValueKind != JsonValueKind.String || format.GetString() != Format)
                throw new LayoutException($"\"format\" must be \"{Format}\"");
            string model = root.TryGetProperty("model", out JsonElement m) && m.ValueKind == JsonValueKind.String ? m.GetString()! : Path.GetFileNameWithoutExtension(source);
            if (!root.TryGetProperty("tensors", out JsonElement list) || list.ValueKind != JsonValueKind.Array)
                throw new LayoutException("\"tensors\" must be an array");
            var tensors = new List<LayoutTensor>();
            int index = 0;
            foreach (JsonElement entry in list.EnumerateArray())
            {
                string where = $"tensors[{index++}]";
                if (entry.ValueKind != JsonValueKind.Object)
                    throw new LayoutException($"{where} is not an object");
                string name = entry.TryGetProperty("name", out JsonElement n) && n.ValueKind == JsonValueKind.String && n.GetString() is { Length: > 0 } s
                    ? s : throw new LayoutException($"{where}: \"name\" must be a non-empty string");
                where = $"{where} ('{name}')";
                if (!entry.TryGetProperty("dtype", out JsonElement dt) || dt.ValueKind != JsonValueKind.String || !Dtype.TryParse(dt.GetString()!, out Dtype dtype))
                    throw new LayoutException($"{where}: \"dtype\" must be a safetensors dtype ({string.Join(", ", Dtype.All.Select(d => d.Name))})");
                if (!entry.TryGetProperty("shape", out JsonElement sh) || sh.ValueKind != JsonValueKind.Array || sh.EnumerateArray().Any(x => x.ValueKind != JsonValueKind.Number || !x.TryGetInt64(out _)))
                    throw new LayoutException($"{where}: \"shape\" must be an array of integers");
                long[] shape = sh.EnumerateArray().Select(x => x.GetInt64()).ToArray();
                int? split = null;
                if (entry.TryGetProperty("split", out JsonElement sp) && sp.ValueKind != JsonValueKind.Null)
                    split = sp.ValueKind == JsonValueKind.Number && sp.TryGetInt32(out int d) ? d : throw new LayoutException($"{where}: \"split\" must be a dimension or null");
                int? shards = null;
                if (entry.TryGetProperty("shards", out JsonElement sd) && sd.ValueKind != JsonValueKind.Null)
                    shards = sd.ValueKind == JsonValueKind.Number && sd.TryGetInt32(out int k) ? k : throw new LayoutException($"{where}: \"shards\" must be an integer or null");
                foreach (string expanded in Expand(name, where))
                    tensors.Add(new LayoutTensor(expanded, dtype, shape, split, shards));
            }
            return new ModelLayout(model, tensors);
        }
        catch (JsonException e)
        {
            throw new LayoutException($"{source}: not valid JSON: {e.Message}");
        }
        catch (LayoutException e) when (!e.Message.StartsWith(source, StringComparison.Ordinal))
        {
            throw new LayoutException($"{source}: {e.Message}");
        }
    }

    /// <summary>Every name <paramref name="pattern"/>'s <c>{a..b}</c> ranges stand for, the first range varying slowest.</summary>
    internal static IEnumerable<string> Expand(string pattern, string where)
    {
        Match match = s_range.Match(pattern);
        if (!match.Success)
        {
            if (pattern.Contains('{') || pattern.Contains('}'))
                throw new LayoutException($"{where}: a range in a name is written {{first..last}}, as in layers.{{0..31}}");
            yield return pattern;
            yield break;
        }
        if (!int.TryParse(match.Groups[1].Value, out int first) || !int.TryParse(match.Groups[2].Value, out int last) || last < first || last - first >= 1 << 20)
            throw new LayoutException($"{where}: range {match.Value} must go up from its first value");
        string head = pattern[..match.Index], tail = pattern[(match.Index + match.Length)..];
        for (int i = first; i <= last; i++)
            foreach (string rest in Expand(tail, where))
                yield return head + i.ToString(System.Globalization.CultureInfo.InvariantCulture) + rest;
    }
}

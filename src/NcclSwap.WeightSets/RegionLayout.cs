using System.Text.Json;
using NcclSwap.DataPlane;

namespace NcclSwap.WeightSets;

/// <summary>One tensor placed in a region of memory: what it is and where its bytes lie.</summary>
public sealed record TensorPlacement(string Name, string Dtype, long[] Shape, long Offset, long Bytes)
{
    public string ShapeText => $"[{string.Join(", ", Shape)}]";
}

/// <summary>A layout that breaks a rule; the message names the tensor and the rule.</summary>
public sealed class LayoutException(string message) : Exception(message);

/// <summary>
/// Where each tensor of a weight set lies in one region (a client's shared memory, a staging buffer): names,
/// dtypes and shapes, and each tensor's byte offset. Tensors are kept in name order, like a manifest's. Two
/// layouts of the same weight set hold the same tensors (<see cref="Mismatch"/>) but may place them
/// differently; <see cref="CopyRuns"/> says how to move bytes from one to the other in as few copies as the
/// two placements allow.
/// </summary>
public sealed class RegionLayout
{
    public const int PackedAlignment = 256;

    private readonly Dictionary<string, int> _index;

    private RegionLayout(List<TensorPlacement> tensors)
    {
        Tensors = tensors;
        _index = new Dictionary<string, int>(tensors.Count, StringComparer.Ordinal);
        for (int i = 0; i < tensors.Count; i++)
            _index[tensors[i].Name] = i;
        Length = tensors.Count == 0 ? 0 : tensors.Max(t => t.Offset + t.Bytes);
        TotalBytes = tensors.Sum(t => t.Bytes);
    }

    /// <summary>The tensors, in ordinal name order.</summary>
    public IReadOnlyList<TensorPlacement> Tensors { get; }

    /// <summary>The smallest region that holds every tensor.</summary>
    public long Length { get; }

    /// <summary>The tensors' bytes, without the gaps between them.</summary>
    public long TotalBytes { get; }

    public TensorPlacement this[string name] =>
        _index.TryGetValue(name, out int i) ? Tensors[i] : throw new KeyNotFoundException($"no tensor '{name}' in this layout");

    /// <summary>
    /// A layout from (name, dtype, shape, offset) entries, every rule checked: names non-empty and unique,
    /// dtypes known, dimensions non-negative, whole bytes, offsets non-negative, no two tensors overlapping.
    /// </summary>
    public static RegionLayout Create(IEnumerable<(string Name, string Dtype, long[] Shape, long Offset)> tensors)
    {
        var placed = tensors.Select(t => Place(t.Name, t.Dtype, t.Shape, t.Offset)).ToList();
        var byOffset = placed.Where(t => t.Bytes > 0).OrderBy(t => t.Offset).ToList();
        for (int i = 1; i < byOffset.Count; i++)
        {
            TensorPlacement before = byOffset[i - 1], after = byOffset[i];
            if (after.Offset < before.Offset + before.Bytes)
                throw new LayoutException($"tensor '{after.Name}' at offset {after.Offset} overlaps tensor '{before.Name}' ([{before.Offset}, {before.Offset + before.Bytes}))");
        }
        return Sorted(placed);
    }

    /// <summary>The tensors packed one after another in name order, each at a multiple of <paramref name="alignment"/>.</summary>
    public static RegionLayout Packed(IEnumerable<(string Name, string Dtype, long[] Shape)> tensors, int alignment = PackedAlignment)
    {
        if (alignment <= 0 || (alignment & (alignment - 1)) != 0)
            throw new ArgumentException($"alignment {alignment} must be a power of two", nameof(alignment));
        var placed = new List<TensorPlacement>();
        long offset = 0;
        foreach (var (name, dtype, shape) in tensors.OrderBy(t => t.Name, StringComparer.Ordinal))
        {
            TensorPlacement tensor = Place(name, dtype, shape, offset);
            placed.Add(tensor);
            offset = checked(offset + tensor.Bytes + alignment - 1) & ~(long)(alignment - 1);
        }
        return Sorted(placed);
    }

    private static RegionLayout Sorted(List<TensorPlacement> placed)
    {
        placed.Sort((a, b) => string.CompareOrdinal(a.Name, b.Name));
        for (int i = 1; i < placed.Count; i++)
            if (placed[i].Name == placed[i - 1].Name)
                throw new LayoutException($"tensor '{placed[i].Name}' appears twice");
        return new RegionLayout(placed);
    }

    private static TensorPlacement Place(string name, string dtypeName, long[] shape, long offset)
    {
        if (string.IsNullOrEmpty(name))
            throw new LayoutException("a tensor has an empty name");
        if (!Dtype.TryParse(dtypeName, out Dtype dtype))
            throw new LayoutException($"tensor '{name}': unknown dtype '{dtypeName}'");
        long elements = 1;
        foreach (long dimension in shape)
        {
            if (dimension < 0)
                throw new LayoutException($"tensor '{name}': negative dimension in shape [{string.Join(", ", shape)}]");
            try
            {
                elements = checked(elements * dimension);
            }
            catch (OverflowException)
            {
                throw new LayoutException($"tensor '{name}': shape [{string.Join(", ", shape)}] overflows");
            }
        }
        long bytes = dtype.ByteLength(elements)
            ?? throw new LayoutException($"tensor '{name}': {elements} values of {dtype} do not fill whole bytes");
        if (offset < 0 || offset > long.MaxValue - bytes)
            throw new LayoutException($"tensor '{name}': offset {offset} is out of range");
        return new TensorPlacement(name, dtype.Name, [.. shape], offset, bytes);
    }

    /// <summary>The packed layout of the tensors a manifest describes (how staging holds a version).</summary>
    public static RegionLayout Packed(Manifest manifest) => Packed(manifest.Tensors.Select(t => (t.Name, t.Dtype, t.Shape)));

    /// <summary>This layout's tensors packed (<see cref="Packed(IEnumerable{ValueTuple{string, string, long[]}}, int)"/>).</summary>
    public RegionLayout Pack() => Packed(Tensors.Select(t => (t.Name, t.Dtype, t.Shape)));

    /// <summary>The first way <paramref name="other"/> holds different tensors from this layout (placement aside), or null.</summary>
    public string? Mismatch(RegionLayout other)
    {
        foreach (TensorPlacement mine in Tensors)
        {
            if (!other._index.TryGetValue(mine.Name, out int i))
                return $"tensor '{mine.Name}' is missing";
            TensorPlacement theirs = other.Tensors[i];
            if (theirs.Dtype != mine.Dtype)
                return $"tensor '{mine.Name}' is {theirs.Dtype}, not {mine.Dtype}";
            if (!theirs.Shape.AsSpan().SequenceEqual(mine.Shape))
                return $"tensor '{mine.Name}' has shape {theirs.ShapeText}, not {mine.ShapeText}";
        }
        foreach (TensorPlacement theirs in other.Tensors)
            if (!_index.ContainsKey(theirs.Name))
                return $"tensor '{theirs.Name}' is not in the weight set";
        return null;
    }

    /// <summary>
    /// Copies that move every tensor (or those named by <paramref name="only"/>) from <paramref name="from"/>'s
    /// placement to <paramref name="to"/>'s: tensors that follow each other with the same gap in both become one run.
    /// Gaps are copied too, so <paramref name="joinGaps"/> false keeps runs to tensors that touch, for destinations
    /// whose gaps may belong to something else (an engine's GPU memory).
    /// </summary>
    public static List<CopyRun> CopyRuns(RegionLayout from, RegionLayout to, IEnumerable<string>? only = null, bool joinGaps = true)
    {
        if (from.Mismatch(to) is { } problem)
            throw new LayoutException($"the layouts hold different tensors: {problem}");
        var pairs = (only ?? from.Tensors.Select(t => t.Name))
            .Select(name => (From: from[name], To: to[name]))
            .Where(p => p.From.Bytes > 0)
            .OrderBy(p => p.From.Offset)
            .ToList();
        var runs = new List<CopyRun>();
        foreach (var (source, destination) in pairs)
        {
            if (runs.Count > 0)
            {
                CopyRun last = runs[^1];
                long gap = source.Offset - (last.From + last.Bytes);
                // Joined only when the gap is the same in both regions and small: the gap's bytes are copied too.
                if (gap >= 0 && gap < (joinGaps ? PackedAlignment : 1) && destination.Offset == last.To + last.Bytes + gap)
                {
                    runs[^1] = last with { Bytes = last.Bytes + gap + source.Bytes };
                    continue;
                }
            }
            runs.Add(new CopyRun(source.Offset, destination.Offset, source.Bytes));
        }
        return runs;
    }

    /// <summary>
    /// One run per tensor of <paramref name="from"/>, in its order (a manifest's), to where <paramref name="to"/> places
    /// it: copies whose digests are the tensors' (<see cref="IBackend.CopyAndDigest"/>).
    /// </summary>
    public static List<CopyRun> TensorRuns(RegionLayout from, RegionLayout to)
    {
        if (from.Mismatch(to) is { } problem)
            throw new LayoutException($"the layouts hold different tensors: {problem}");
        return from.Tensors.Select(t => new CopyRun(t.Offset, to[t.Name].Offset, t.Bytes)).ToList();
    }

    /// <summary>The manifest of a version whose tensors, in this layout's order, have <paramref name="digests"/>.</summary>
    public Manifest ToManifest(IReadOnlyList<Digest> digests)
    {
        if (digests.Count != Tensors.Count)
            throw new ArgumentException($"{digests.Count} digests for {Tensors.Count} tensors");
        return Manifest.Create(Tensors.Select((t, i) => new ManifestEntry(t.Name, t.Dtype, t.Shape, t.Bytes, digests[i])));
    }

    /// <summary>Writes the tensors as a JSON array of <c>{"name", "dtype", "shape", "offset"}</c>.</summary>
    public void WriteJson(Utf8JsonWriter writer)
    {
        writer.WriteStartArray();
        foreach (TensorPlacement t in Tensors)
        {
            writer.WriteStartObject();
            writer.WriteString("name", t.Name);
            TensorJson.WriteDtypeAndShape(writer, t.Dtype, t.Shape);
            writer.WriteNumber("offset", t.Offset);
            writer.WriteEndObject();
        }
        writer.WriteEndArray();
    }

    /// <summary>Reads the array <see cref="WriteJson"/> writes; any missing or mistyped field is an error naming the entry.</summary>
    public static RegionLayout FromJson(JsonElement array)
    {
        if (array.ValueKind != JsonValueKind.Array)
            throw new LayoutException("tensors must be a JSON array");
        var entries = new List<(string, string, long[], long)>();
        int index = 0;
        foreach (JsonElement t in array.EnumerateArray())
        {
            string where = $"tensors[{index++}]";
            if (t.ValueKind != JsonValueKind.Object)
                throw new LayoutException($"{where} is not an object");
            string name = String(t, "name", where);
            where = $"tensor '{name}'";
            string dtype = String(t, "dtype", where);
            if (!t.TryGetProperty("shape", out JsonElement shape) || shape.ValueKind != JsonValueKind.Array)
                throw new LayoutException($"{where}: shape must be an array of whole numbers");
            var dimensions = new List<long>();
            foreach (JsonElement d in shape.EnumerateArray())
                dimensions.Add(d.ValueKind == JsonValueKind.Number && d.TryGetInt64(out long v) ? v : throw new LayoutException($"{where}: shape must be an array of whole numbers"));
            if (!t.TryGetProperty("offset", out JsonElement offset) || offset.ValueKind != JsonValueKind.Number || !offset.TryGetInt64(out long at))
                throw new LayoutException($"{where}: offset must be a whole number");
            entries.Add((name, dtype, [.. dimensions], at));
        }
        return Create(entries);
    }

    private static string String(JsonElement element, string field, string where) =>
        element.TryGetProperty(field, out JsonElement value) && value.ValueKind == JsonValueKind.String && value.GetString() is { } text
            ? text
            : throw new LayoutException($"{where}: {field} must be a string");
}

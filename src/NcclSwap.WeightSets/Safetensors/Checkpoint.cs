using System.Text.Json;

namespace NcclSwap.WeightSets;

/// <summary>
/// A checkpoint: one safetensors file, or a folder holding either a Hugging Face
/// <c>model.safetensors.index.json</c> (whose <c>weight_map</c> names the shard of every tensor) or exactly
/// one <c>.safetensors</c> file. Every header is read and checked; with an index, every tensor it names must
/// be in its shard and every tensor of a shard must be in the index.
/// </summary>
public sealed class Checkpoint
{
    public const string IndexFileName = "model.safetensors.index.json";

    private Checkpoint(string path, IReadOnlyList<SafetensorsFile> files, IReadOnlyList<TensorInfo> tensors)
    {
        Path = path;
        Files = files;
        Tensors = tensors;
    }

    public string Path { get; }

    public IReadOnlyList<SafetensorsFile> Files { get; }

    /// <summary>Every tensor, ordered by file (as listed) then by position in the file.</summary>
    public IReadOnlyList<TensorInfo> Tensors { get; }

    public long TotalBytes => Tensors.Sum(t => t.Bytes);

    public static Checkpoint Open(string path)
    {
        if (File.Exists(path))
            return FromFiles(path, [SafetensorsFile.Open(path)]);
        if (!Directory.Exists(path))
            throw new FileNotFoundException($"{path}: no such file or folder", path);

        string index = System.IO.Path.Combine(path, IndexFileName);
        if (File.Exists(index))
            return FromIndex(path, index);
        string[] files = Directory.GetFiles(path, "*.safetensors");
        return files.Length switch
        {
            1 => FromFiles(path, [SafetensorsFile.Open(files[0])]),
            0 => throw new SafetensorsException(path, null, "no checkpoint", $"the folder holds neither {IndexFileName} nor a .safetensors file"),
            _ => throw new SafetensorsException(path, null, "no index", $"the folder holds {files.Length} .safetensors files but no {IndexFileName} to say how they go together"),
        };
    }

    private static Checkpoint FromIndex(string folder, string index)
    {
        Dictionary<string, string> weightMap = ReadWeightMap(index);
        var shards = new List<SafetensorsFile>();
        foreach (string shardName in weightMap.Values.Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal))
        {
            string shardPath = System.IO.Path.Combine(folder, shardName);
            if (System.IO.Path.GetFileName(shardName) != shardName)
                throw new SafetensorsException(index, null, "invalid shard name", $"'{shardName}' must be a file name in the checkpoint's folder");
            if (!File.Exists(shardPath))
            {
                string tensor = weightMap.First(kv => kv.Value == shardName).Key;
                throw new SafetensorsException(index, tensor, "missing shard", $"the index puts it in {shardName}, which does not exist");
            }
            shards.Add(SafetensorsFile.Open(shardPath));
        }
        foreach (SafetensorsFile shard in shards)
        {
            string shardName = System.IO.Path.GetFileName(shard.Path);
            var present = shard.Tensors.Select(t => t.Name).ToHashSet(StringComparer.Ordinal);
            foreach (var (tensor, file) in weightMap)
                if (file == shardName && !present.Contains(tensor))
                    throw new SafetensorsException(index, tensor, "tensor missing from its shard", $"the index puts it in {shardName}, which has no such tensor");
            foreach (TensorInfo tensor in shard.Tensors)
                if (!weightMap.TryGetValue(tensor.Name, out string? listed) || listed != shardName)
                    throw new SafetensorsException(shard.Path, tensor.Name, "tensor not in the index",
                        listed is null ? $"{IndexFileName} does not list it" : $"{IndexFileName} puts it in {listed}");
        }
        return FromFiles(folder, shards);
    }

    private static Dictionary<string, string> ReadWeightMap(string index)
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(File.ReadAllBytes(index));
        }
        catch (JsonException e)
        {
            throw new SafetensorsException(index, null, "invalid JSON", e.Message);
        }
        using (document)
        {
            if (document.RootElement.ValueKind != JsonValueKind.Object
                || !document.RootElement.TryGetProperty("weight_map", out JsonElement map)
                || map.ValueKind != JsonValueKind.Object)
                throw new SafetensorsException(index, null, "no weight_map", "the index must be an object with a \"weight_map\" object");
            var weightMap = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach (JsonProperty entry in map.EnumerateObject())
            {
                if (entry.Value.ValueKind != JsonValueKind.String)
                    throw new SafetensorsException(index, entry.Name, "invalid weight_map", $"its file is {entry.Value.ValueKind}, not a string");
                if (!weightMap.TryAdd(entry.Name, entry.Value.GetString()!))
                    throw new SafetensorsException(index, entry.Name, "duplicate name", "weight_map lists the tensor twice");
            }
            return weightMap;
        }
    }

    private static Checkpoint FromFiles(string path, IReadOnlyList<SafetensorsFile> files)
    {
        var seen = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (SafetensorsFile file in files)
            foreach (TensorInfo tensor in file.Tensors)
                if (!seen.TryAdd(tensor.Name, file.Path))
                    throw new SafetensorsException(file.Path, tensor.Name, "duplicate name", $"also in {seen[tensor.Name]}");
        return new Checkpoint(path, files, files.SelectMany(f => f.Tensors).ToList());
    }
}

using System.Security.Cryptography;
using System.Text.Json;
using NcclSwap.DataPlane;

namespace NcclSwap.WeightSets;

/// <summary>One tensor of a version: what it is and the block digest of its bytes.</summary>
public sealed record ManifestEntry(string Name, string Dtype, long[] Shape, long Bytes, Digest Digest);

/// <summary>
/// What a version holds: every tensor's name, dtype, shape, byte length and digest, ordered by name. Its
/// canonical encoding is compact UTF-8 JSON with a fixed field order; the set's <see cref="Digest"/> and
/// <see cref="Sha256"/> (the input of signing) are taken over those bytes, so equal sets give equal bytes.
/// </summary>
public sealed class Manifest
{
    public const string Format = "nccl-swap-manifest/1";

    private readonly byte[] _canonical;

    private Manifest(IReadOnlyList<ManifestEntry> tensors)
    {
        Tensors = tensors;
        _canonical = Encode(tensors);
        Digest = BlockDigest.Compute(_canonical);
        Sha256 = Convert.ToHexStringLower(SHA256.HashData(_canonical));
    }

    public IReadOnlyList<ManifestEntry> Tensors { get; }

    public long TotalBytes => Tensors.Sum(t => t.Bytes);

    public Digest Digest { get; }

    /// <summary>SHA-256 of the canonical encoding, as 64 lowercase hex digits.</summary>
    public string Sha256 { get; }

    public ReadOnlySpan<byte> CanonicalBytes => _canonical;

    public static Manifest Create(IEnumerable<ManifestEntry> tensors)
    {
        var ordered = tensors.OrderBy(t => t.Name, StringComparer.Ordinal).ToList();
        for (int i = 1; i < ordered.Count; i++)
            if (ordered[i].Name == ordered[i - 1].Name)
                throw new ArgumentException($"tensor '{ordered[i].Name}' appears twice in the manifest");
        return new Manifest(ordered);
    }

    /// <summary>Reads a canonical encoding back; anything that does not re-encode to the same bytes is refused.</summary>
    public static Manifest Parse(ReadOnlySpan<byte> canonical)
    {
        var entries = new List<ManifestEntry>();
        try
        {
            using JsonDocument document = JsonDocument.Parse(canonical.ToArray());
            JsonElement root = document.RootElement;
            if (root.GetProperty("format").GetString() != Format)
                throw new FormatException($"manifest format is not {Format}");
            foreach (JsonElement t in root.GetProperty("tensors").EnumerateArray())
                entries.Add(new ManifestEntry(
                    t.GetProperty("name").GetString()!,
                    t.GetProperty("dtype").GetString()!,
                    t.GetProperty("shape").EnumerateArray().Select(d => d.GetInt64()).ToArray(),
                    t.GetProperty("bytes").GetInt64(),
                    Digest.Parse(t.GetProperty("digest").GetString()!)));
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException)
        {
            throw new FormatException($"not a manifest: {e.Message}", e);
        }
        Manifest manifest = Create(entries);
        if (!manifest.CanonicalBytes.SequenceEqual(canonical))
            throw new FormatException("the manifest is not in canonical form (field order, tensor order or spacing differ)");
        return manifest;
    }

    private static byte[] Encode(IReadOnlyList<ManifestEntry> tensors)
    {
        var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = false }))
        {
            writer.WriteStartObject();
            writer.WriteString("format", Format);
            writer.WriteStartArray("tensors");
            foreach (ManifestEntry t in tensors)
            {
                writer.WriteStartObject();
                writer.WriteString("name", t.Name);
                TensorJson.WriteDtypeAndShape(writer, t.Dtype, t.Shape);
                writer.WriteNumber("bytes", t.Bytes);
                writer.WriteString("digest", t.Digest.ToString());
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
            writer.WriteEndObject();
        }
        return stream.ToArray();
    }
}

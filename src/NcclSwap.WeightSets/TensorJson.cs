using System.Text.Json;

namespace NcclSwap.WeightSets;

/// <summary>How every JSON document of the project writes a tensor's dtype and shape (safetensors headers, manifests, layouts, inspect).</summary>
public static class TensorJson
{
    /// <summary>Writes <c>"dtype": DTYPE, "shape": [d0, d1, …]</c> into the object being written.</summary>
    public static void WriteDtypeAndShape(Utf8JsonWriter writer, string dtype, IEnumerable<long> shape)
    {
        writer.WriteString("dtype", dtype);
        writer.WriteStartArray("shape");
        foreach (long dimension in shape)
            writer.WriteNumberValue(dimension);
        writer.WriteEndArray();
    }
}

using System.Buffers.Binary;
using System.Text;
using System.Text.Json;

namespace NcclSwap.WeightSets;

/// <summary>A tensor to write: name, dtype, shape and exactly the bytes those imply.</summary>
public sealed record TensorData(string Name, Dtype Dtype, long[] Shape, ReadOnlyMemory<byte> Data);

/// <summary>
/// Writes safetensors files the reference library reads: header padded with spaces to a multiple of 8
/// bytes, tensors back to back in the order given. A file is written to a temporary name beside the target
/// and renamed into place, so a crash never leaves half a file under the real name.
/// </summary>
public static class SafetensorsWriter
{
    public static void Write(string path, IReadOnlyList<TensorData> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        byte[] header = Header(path, tensors, metadata);
        string temporary = path + $".{Environment.ProcessId}.partial";
        try
        {
            using (var file = new FileStream(temporary, FileMode.Create, FileAccess.Write, FileShare.None, 1 << 20))
            {
                Span<byte> length = stackalloc byte[8];
                BinaryPrimitives.WriteUInt64LittleEndian(length, (ulong)header.Length);
                file.Write(length);
                file.Write(header);
                foreach (TensorData tensor in tensors)
                    file.Write(tensor.Data.Span);
                file.Flush(flushToDisk: true);
            }
            File.Move(temporary, path, overwrite: true);
        }
        catch
        {
            File.Delete(temporary);
            throw;
        }
    }

    /// <summary>The padded JSON header for <paramref name="tensors"/>, after checking names and sizes.</summary>
    public static byte[] Header(string path, IReadOnlyList<TensorData> tensors, IReadOnlyDictionary<string, string>? metadata)
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        var json = new MemoryStream();
        using (var writer = new Utf8JsonWriter(json))
        {
            writer.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                writer.WriteStartObject(SafetensorsFile.MetadataKey);
                foreach (var (key, value) in metadata)
                    writer.WriteString(key, value);
                writer.WriteEndObject();
            }
            long offset = 0;
            foreach (TensorData tensor in tensors)
            {
                if (string.IsNullOrEmpty(tensor.Name) || tensor.Name == SafetensorsFile.MetadataKey)
                    throw new SafetensorsException(path, tensor.Name, "invalid name", "a tensor name must be non-empty and not __metadata__");
                if (!names.Add(tensor.Name))
                    throw new SafetensorsException(path, tensor.Name, "duplicate name", "two tensors have this name");
                if (tensor.Shape.Any(d => d < 0))
                    throw new SafetensorsException(path, tensor.Name, "negative dimension", $"shape [{string.Join(", ", tensor.Shape)}]");
                long elements = tensor.Shape.Aggregate(1L, (a, b) => checked(a * b));
                long? expected = tensor.Dtype.ByteLength(elements);
                if (expected != tensor.Data.Length)
                    throw new SafetensorsException(path, tensor.Name, "byte length",
                        $"{tensor.Data.Length} bytes given, but {tensor.Dtype} × [{string.Join(", ", tensor.Shape)}] needs {expected?.ToString() ?? "a whole number of bytes"}");
                writer.WriteStartObject(tensor.Name);
                TensorJson.WriteDtypeAndShape(writer, tensor.Dtype.Name, tensor.Shape);
                writer.WriteStartArray("data_offsets");
                writer.WriteNumberValue(offset);
                writer.WriteNumberValue(offset + tensor.Data.Length);
                writer.WriteEndArray();
                writer.WriteEndObject();
                offset += tensor.Data.Length;
            }
            writer.WriteEndObject();
        }
        int padding = (int)((8 - json.Length % 8) % 8);
        json.Write(Encoding.ASCII.GetBytes(new string(' ', padding)));
        return json.ToArray();
    }
}

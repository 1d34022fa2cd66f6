using System.Buffers.Binary;
using System.Text;
using System.Text.Json;

namespace NcclSwap.WeightSets;

/// <summary>One tensor of a safetensors file: where its bytes are, relative to the file's data section and to the file.</summary>
public sealed record TensorInfo(string Name, Dtype Dtype, long[] Shape, long Begin, long End, string File, long DataStart)
{
    public long Bytes => End - Begin;

    /// <summary>Offset of the first byte in the file.</summary>
    public long FileOffset => DataStart + Begin;

    public long Elements => Shape.Aggregate(1L, (a, b) => a * b);

    public string ShapeText => "[" + string.Join(", ", Shape) + "]";
}

/// <summary>
/// The header of one safetensors file, read and checked against every rule of the format: an 8-byte
/// little-endian header length (at most 100 MB, inside the file), a UTF-8 JSON object starting with '{'
/// that maps unique tensor names to dtype, shape and data offsets (plus an optional string map
/// <c>__metadata__</c>), and a data section that the tensors' byte ranges tile exactly, without holes or
/// overlaps, each range as long as its dtype and shape say.
/// </summary>
public sealed class SafetensorsFile
{
    public const long MaxHeaderBytes = 100_000_000;
    public const string MetadataKey = "__metadata__";

    private SafetensorsFile(string path, long headerLength, long dataLength, IReadOnlyList<TensorInfo> tensors, IReadOnlyDictionary<string, string> metadata)
    {
        Path = path;
        HeaderLength = headerLength;
        DataLength = dataLength;
        Tensors = tensors;
        Metadata = metadata;
    }

    public string Path { get; }

    public long HeaderLength { get; }

    /// <summary>Offset of the data section in the file.</summary>
    public long DataStart => 8 + HeaderLength;

    public long DataLength { get; }

    /// <summary>The tensors in the order of their bytes in the file.</summary>
    public IReadOnlyList<TensorInfo> Tensors { get; }

    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Reads and checks the header of <paramref name="path"/>; the tensor data is not read.</summary>
    public static SafetensorsFile Open(string path)
    {
        using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1, FileOptions.RandomAccess);
        long fileLength = file.Length;
        Span<byte> prefix = stackalloc byte[8];
        if (fileLength < 8)
            throw new SafetensorsException(path, null, "file too short", $"{fileLength} bytes, but the header length alone takes 8");
        file.ReadExactly(prefix);
        ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(prefix);
        if (headerLength > MaxHeaderBytes)
            throw new SafetensorsException(path, null, "header too large", $"{headerLength} bytes, over the limit of {MaxHeaderBytes}");
        if (8 + (long)headerLength > fileLength)
            throw new SafetensorsException(path, null, "header beyond the file", $"the header claims {headerLength} bytes, but only {fileLength - 8} follow the length");
        byte[] header = new byte[headerLength];
        file.ReadExactly(header);
        return Parse(path, header, fileLength - 8 - (long)headerLength);
    }

    /// <summary>Checks a header given as bytes, for a data section of <paramref name="dataLength"/> bytes.</summary>
    public static SafetensorsFile Parse(string path, ReadOnlySpan<byte> header, long dataLength)
    {
        long headerLength = header.Length;
        if (header.IsEmpty || header[0] != (byte)'{')
            throw new SafetensorsException(path, null, "header start", header.IsEmpty ? "the header is empty" : $"the header starts with byte 0x{header[0]:x2}, not '{{'");
        try
        {
            new UTF8Encoding(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true).GetCharCount(header);
        }
        catch (DecoderFallbackException e)
        {
            throw new SafetensorsException(path, null, "invalid UTF-8", $"byte {e.Index} of the header");
        }

        var tensors = new List<TensorInfo>();
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        var names = new HashSet<string>(StringComparer.Ordinal);
        var reader = new Utf8JsonReader(header, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Disallow });
        try
        {
            Expect(ref reader, JsonTokenType.StartObject, path, null, "the header is not a JSON object");
            while (reader.Read() && reader.TokenType != JsonTokenType.EndObject)
            {
                string name = reader.GetString()!;
                if (!names.Add(name))
                    throw new SafetensorsException(path, name, "duplicate name", "the name appears twice in the header");
                reader.Read();
                if (name == MetadataKey)
                    ReadMetadata(ref reader, path, metadata);
                else
                    tensors.Add(ReadTensor(ref reader, path, name, 8 + headerLength));
            }
            // Only whitespace (the writer's padding) may follow the object.
            if (reader.Read())
                throw new SafetensorsException(path, null, "invalid JSON", $"data after the header object at byte {reader.TokenStartIndex}");
        }
        catch (JsonException e)
        {
            throw new SafetensorsException(path, null, "invalid JSON", $"{e.Message} (byte {reader.BytesConsumed} of the header)");
        }

        CheckTiling(path, tensors, dataLength);
        tensors.Sort((a, b) => a.Begin != b.Begin ? a.Begin.CompareTo(b.Begin) : a.End.CompareTo(b.End));
        return new SafetensorsFile(path, headerLength, dataLength, tensors, metadata);
    }

    private static void ReadMetadata(ref Utf8JsonReader reader, string path, Dictionary<string, string> metadata)
    {
        Expect(ref reader, JsonTokenType.StartObject, path, MetadataKey, "__metadata__ must be an object of strings", read: false);
        while (reader.Read() && reader.TokenType != JsonTokenType.EndObject)
        {
            string key = reader.GetString()!;
            reader.Read();
            if (reader.TokenType != JsonTokenType.String)
                throw new SafetensorsException(path, null, "metadata", $"__metadata__['{key}'] is {reader.TokenType}, not a string");
            if (!metadata.TryAdd(key, reader.GetString()!))
                throw new SafetensorsException(path, null, "duplicate name", $"__metadata__ has the key '{key}' twice");
        }
    }

    private static TensorInfo ReadTensor(ref Utf8JsonReader reader, string path, string name, long dataStart)
    {
        Expect(ref reader, JsonTokenType.StartObject, path, name, "a tensor entry must be an object", read: false);
        string? dtypeName = null;
        long[]? shape = null, offsets = null;
        while (reader.Read() && reader.TokenType != JsonTokenType.EndObject)
        {
            string field = reader.GetString()!;
            reader.Read();
            switch (field)
            {
                case "dtype":
                    if (reader.TokenType != JsonTokenType.String)
                        throw new SafetensorsException(path, name, "invalid dtype", $"dtype is {reader.TokenType}, not a string");
                    dtypeName = reader.GetString();
                    break;
                case "shape":
                    shape = ReadIntegers(ref reader, path, name, "invalid shape", "shape");
                    break;
                case "data_offsets":
                    offsets = ReadIntegers(ref reader, path, name, "invalid data_offsets", "data_offsets");
                    break;
                default:
                    reader.Skip();
                    break;
            }
        }
        if (dtypeName is null || shape is null || offsets is null)
            throw new SafetensorsException(path, name, "missing field",
                $"a tensor needs dtype, shape and data_offsets; missing: {string.Join(", ", new[] { dtypeName is null ? "dtype" : null, shape is null ? "shape" : null, offsets is null ? "data_offsets" : null }.OfType<string>())}");
        if (!Dtype.TryParse(dtypeName, out Dtype dtype))
            throw new SafetensorsException(path, name, "unknown dtype", $"'{dtypeName}' (known: {string.Join(", ", Dtype.All.Select(d => d.Name))})");
        if (shape.FirstOrDefault(d => d < 0) is var negative && negative < 0)
            throw new SafetensorsException(path, name, "negative dimension", $"shape [{string.Join(", ", shape)}]");
        long elements = 1;
        try
        {
            foreach (long dimension in shape)
                elements = checked(elements * dimension);
        }
        catch (OverflowException)
        {
            throw new SafetensorsException(path, name, "shape overflows", $"the element count of [{string.Join(", ", shape)}] does not fit in 64 bits");
        }
        if (offsets.Length != 2 || offsets[0] < 0 || offsets[1] < 0)
            throw new SafetensorsException(path, name, "invalid data_offsets", $"[{string.Join(", ", offsets)}] is not two non-negative offsets");
        if (offsets[0] > offsets[1])
            throw new SafetensorsException(path, name, "offsets out of order", $"begin {offsets[0]} is after end {offsets[1]}");
        long? expected = dtype.ByteLength(elements);
        if (expected is null)
            throw new SafetensorsException(path, name, "byte length", $"{elements} × {dtype.Bits} bits of {dtype} is not a whole number of bytes (or overflows)");
        if (offsets[1] - offsets[0] != expected)
            throw new SafetensorsException(path, name, "byte length",
                $"data_offsets [{offsets[0]}, {offsets[1]}] hold {offsets[1] - offsets[0]} bytes, but {dtype} × [{string.Join(", ", shape)}] needs {expected}");
        return new TensorInfo(name, dtype, shape, offsets[0], offsets[1], path, dataStart);
    }

    private static long[] ReadIntegers(ref Utf8JsonReader reader, string path, string tensor, string rule, string field)
    {
        if (reader.TokenType != JsonTokenType.StartArray)
            throw new SafetensorsException(path, tensor, rule, $"{field} is {reader.TokenType}, not an array of integers");
        var values = new List<long>();
        while (reader.Read() && reader.TokenType != JsonTokenType.EndArray)
        {
            if (reader.TokenType != JsonTokenType.Number || !reader.TryGetInt64(out long value))
            {
                string text = reader.TokenType == JsonTokenType.Number ? Encoding.UTF8.GetString(reader.ValueSpan) : reader.TokenType.ToString();
                throw new SafetensorsException(path, tensor, field == "shape" && text.StartsWith('-') ? "negative dimension" : rule,
                    $"{field} holds {text}, not a 64-bit integer");
            }
            values.Add(value);
        }
        return [.. values];
    }

    /// <summary>The byte ranges must tile [0, dataLength) exactly.</summary>
    private static void CheckTiling(string path, List<TensorInfo> tensors, long dataLength)
    {
        var ordered = tensors.OrderBy(t => t.Begin).ThenBy(t => t.End).ToList();
        long position = 0;
        TensorInfo? previous = null;
        foreach (TensorInfo tensor in ordered)
        {
            if (tensor.End > dataLength)
                throw new SafetensorsException(path, tensor.Name, "offsets out of range",
                    $"data_offsets [{tensor.Begin}, {tensor.End}] go past the end of the data section ({dataLength} bytes)");
            if (tensor.Begin < position)
                throw new SafetensorsException(path, tensor.Name, "offsets overlap",
                    $"[{tensor.Begin}, {tensor.End}) overlaps tensor '{previous!.Name}' at [{previous.Begin}, {previous.End})");
            if (tensor.Begin > position)
                throw new SafetensorsException(path, tensor.Name, "hole in the data",
                    $"bytes [{position}, {tensor.Begin}) before it belong to no tensor");
            position = tensor.End;
            previous = tensor;
        }
        if (position != dataLength)
            throw new SafetensorsException(path, previous?.Name, "hole in the data",
                $"the tensors end at byte {position} of the data section, but it holds {dataLength} bytes");
    }

    private static void Expect(ref Utf8JsonReader reader, JsonTokenType type, string path, string? tensor, string message, bool read = true)
    {
        if (read && !reader.Read())
            throw new SafetensorsException(path, tensor, "invalid JSON", "the header is empty");
        if (reader.TokenType != type)
            throw new SafetensorsException(path, tensor, tensor is null ? "invalid JSON" : "invalid entry", message);
    }
}

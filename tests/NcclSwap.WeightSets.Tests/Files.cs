using System.Buffers.Binary;
using System.Text;
using NcclSwap.Testing;

namespace NcclSwap.WeightSets.Tests;

/// <summary>Scratch folders and hand-built safetensors files for the tests.</summary>
internal sealed class Files : IDisposable
{
    public Files() => Folder = Directory.CreateTempSubdirectory("nccl-swap-weights-").FullName;

    public string Folder { get; }

    public string PathOf(string name) => Path.Combine(Folder, name);

    /// <summary>A file built byte by byte: the 8-byte length (or <paramref name="claimedLength"/>), the header text, the data.</summary>
    public string Raw(string name, string header, byte[] data, ulong? claimedLength = null) =>
        RawBytes(name, Encoding.UTF8.GetBytes(header), data, claimedLength);

    public string RawBytes(string name, byte[] header, byte[] data, ulong? claimedLength = null)
    {
        string path = PathOf(name);
        var bytes = new byte[8 + header.Length + data.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, claimedLength ?? (ulong)header.Length);
        header.CopyTo(bytes, 8);
        data.CopyTo(bytes, 8 + header.Length);
        File.WriteAllBytes(path, bytes);
        return path;
    }

    /// <summary>Random tensors of every dtype, with a scalar and a zero-size tensor among them.</summary>
    public static List<TensorData> EveryDtype(int seed)
    {
        var tensors = new List<TensorData>();
        int i = 0;
        foreach (Dtype dtype in Dtype.All)
        {
            long[] shape = dtype.Bits switch { 4 => [6, 10], 6 => [4, 5], _ => [3, 7] };
            tensors.Add(Make($"t{i++:00}.{dtype.Name.ToLowerInvariant()}", dtype, shape, seed + i));
        }
        tensors.Add(Make("scalar.f32", Dtype.Parse("F32"), [], seed + 100));
        tensors.Add(Make("empty.bf16", Dtype.Parse("BF16"), [0, 4096], seed + 101));
        return tensors;
    }

    public static TensorData Make(string name, Dtype dtype, long[] shape, int seed)
    {
        long elements = shape.Aggregate(1L, (a, b) => a * b);
        return new TensorData(name, dtype, shape, TestData.Random((int)dtype.ByteLength(elements)!.Value, seed));
    }

    public void Dispose() => Directory.Delete(Folder, recursive: true);
}

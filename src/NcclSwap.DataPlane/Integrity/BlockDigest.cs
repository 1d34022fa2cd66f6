using System.Buffers.Binary;
using System.Globalization;
using System.IO.Hashing;
using System.Runtime.InteropServices;

namespace NcclSwap.DataPlane;

/// <summary>A 64-bit block digest of a byte range; prints as 16 hex digits.</summary>
public readonly record struct Digest(ulong Value)
{
    public override string ToString() => Value.ToString("x16", CultureInfo.InvariantCulture);

    public static Digest Parse(string hex) =>
        hex.Length == 16 && ulong.TryParse(hex, NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out ulong value)
            ? new Digest(value)
            : throw new FormatException($"'{hex}' is not a digest (16 hex digits).");
}

/// <summary>
/// The digest the CPU and the GPU compute identically (native/kernels/digest.cu is the GPU side):
/// XXH64 of each 4096-byte leaf (the last may be short; empty data has one empty leaf), then XXH64 of
/// each group of 512 hashes, level by level, until one root remains; the digest is XXH64 of the root and
/// the length, each as 8 little-endian bytes. Leaves are independent, so both sides hash them in parallel.
/// </summary>
public static class BlockDigest
{
    public const int LeafBytes = 4096;
    public const int Fanout = 512;

    /// <summary>The digest of <paramref name="data"/>, on the calling thread.</summary>
    public static Digest Compute(ReadOnlySpan<byte> data)
    {
        ulong[] leaves = new ulong[LeafCount(data.Length)];
        for (int i = 0; i < leaves.Length; i++)
        {
            int start = i * LeafBytes;
            leaves[i] = XxHash64.HashToUInt64(data.Slice(start, Math.Min(LeafBytes, data.Length - start)));
        }
        return Finish(leaves, data.Length);
    }

    /// <summary>The digest of <paramref name="length"/> bytes at <paramref name="pointer"/>, leaves hashed on up to <paramref name="parallelism"/> threads.</summary>
    public static unsafe Digest Compute(nint pointer, long length, int parallelism = 0)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        long count = LeafCount(length);
        ulong[] leaves = new ulong[count];
        const int leavesPerTask = 256; // 1 MiB per work item
        long items = (count + leavesPerTask - 1) / leavesPerTask;
        var options = new ParallelOptions { MaxDegreeOfParallelism = parallelism > 0 ? parallelism : Environment.ProcessorCount };
        Parallel.For(0L, items, options, item =>
        {
            long end = Math.Min(count, (item + 1) * leavesPerTask);
            for (long i = item * leavesPerTask; i < end; i++)
            {
                long start = i * LeafBytes;
                var leaf = new ReadOnlySpan<byte>((byte*)pointer + start, (int)Math.Min(LeafBytes, length - start));
                leaves[i] = XxHash64.HashToUInt64(leaf);
            }
        });
        return Finish(leaves, length);
    }

    public static long LeafCount(long length) => length == 0 ? 1 : (length + LeafBytes - 1) / LeafBytes;

    /// <summary>Combines leaf hashes (in order) into the digest of data of <paramref name="length"/> bytes.</summary>
    public static Digest Finish(ulong[] leaves, long length)
    {
        ulong root = Root(leaves);
        Span<byte> last = stackalloc byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(last, root);
        BinaryPrimitives.WriteUInt64LittleEndian(last[8..], (ulong)length);
        return new Digest(XxHash64.HashToUInt64(last));
    }

    /// <summary>The digest from the root hash the GPU computes, and the length.</summary>
    public static Digest FromRoot(ulong root, long length) => Finish([root], length);

    private static ulong Root(ulong[] level)
    {
        while (level.Length > 1)
        {
            ulong[] next = new ulong[(level.Length + Fanout - 1) / Fanout];
            for (int g = 0; g < next.Length; g++)
            {
                ReadOnlySpan<ulong> group = level.AsSpan(g * Fanout, Math.Min(Fanout, level.Length - g * Fanout));
                next[g] = XxHash64.HashToUInt64(AsLittleEndianBytes(group));
            }
            level = next;
        }
        return level[0];
    }

    private static ReadOnlySpan<byte> AsLittleEndianBytes(ReadOnlySpan<ulong> words)
    {
        if (BitConverter.IsLittleEndian)
            return MemoryMarshal.AsBytes(words);
        byte[] bytes = new byte[words.Length * 8];
        for (int i = 0; i < words.Length; i++)
            BinaryPrimitives.WriteUInt64LittleEndian(bytes.AsSpan(i * 8), words[i]);
        return bytes;
    }
}

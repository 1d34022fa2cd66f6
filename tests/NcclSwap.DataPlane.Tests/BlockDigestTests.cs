using System.Buffers.Binary;
using System.IO.Hashing;
using System.Runtime.InteropServices;
using NcclSwap.Testing;

namespace NcclSwap.DataPlane.Tests;

public class BlockDigestTests
{
    [Fact]
    public void The_tree_is_what_the_documentation_says()
    {
        // Two leaves: a full one and a 5-byte one; one level above them; then root || length.
        byte[] data = TestData.Random(BlockDigest.LeafBytes + 5, seed: 1);
        ulong leaf0 = XxHash64.HashToUInt64(data.AsSpan(0, 4096));
        ulong leaf1 = XxHash64.HashToUInt64(data.AsSpan(4096));
        byte[] level = new byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(level, leaf0);
        BinaryPrimitives.WriteUInt64LittleEndian(level.AsSpan(8), leaf1);
        ulong root = XxHash64.HashToUInt64(level);
        byte[] last = new byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(last, root);
        BinaryPrimitives.WriteUInt64LittleEndian(last.AsSpan(8), (ulong)data.Length);
        Assert.Equal(XxHash64.HashToUInt64(last), BlockDigest.Compute(data).Value);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(4095)]
    [InlineData(4096)]
    [InlineData(4097)]
    [InlineData(512 * 4096)]
    [InlineData(512 * 4096 + 1)]   // two levels above the leaves
    [InlineData(3_000_017)]
    public unsafe void Parallel_and_sequential_digests_agree(int length)
    {
        byte[] data = TestData.Random(length, seed: length);
        Digest sequential = BlockDigest.Compute(data);
        fixed (byte* p = data)
        {
            Assert.Equal(sequential, BlockDigest.Compute((nint)p, length, parallelism: 1));
            Assert.Equal(sequential, BlockDigest.Compute((nint)p, length, parallelism: 4));
        }
    }

    [Fact]
    public void A_flipped_bit_anywhere_changes_the_digest()
    {
        int seed = TestData.NewSeed();
        var random = new Random(seed);
        byte[] data = TestData.Random(3 * 512 * 4096 + 123, seed);
        Digest original = BlockDigest.Compute(data);
        int[] positions = [0, 4095, 4096, data.Length - 1, .. Enumerable.Range(0, 60).Select(_ => random.Next(data.Length))];
        foreach (int position in positions)
        {
            int bit = random.Next(8);
            data[position] ^= (byte)(1 << bit);
            Assert.True(original != BlockDigest.Compute(data), $"flipping bit {bit} of byte {position} (seed {seed}) left the digest unchanged");
            data[position] ^= (byte)(1 << bit);
        }
        Assert.Equal(original, BlockDigest.Compute(data));
    }

    [Fact]
    public void Length_order_and_content_all_count()
    {
        byte[] data = TestData.Random(8192, seed: 2);
        Assert.NotEqual(BlockDigest.Compute(data), BlockDigest.Compute(data.AsSpan(0, 8191)));
        Assert.NotEqual(BlockDigest.Compute(new byte[10]), BlockDigest.Compute(new byte[11])); // zeros differ by length alone
        byte[] swapped = [.. data.AsSpan(4096), .. data.AsSpan(0, 4096)];
        Assert.NotEqual(BlockDigest.Compute(data), BlockDigest.Compute(swapped));
    }

    [Fact]
    public void Digests_print_and_parse_as_16_hex_digits()
    {
        Digest digest = BlockDigest.Compute(TestData.Random(100, seed: 3));
        string text = digest.ToString();
        Assert.Matches("^[0-9a-f]{16}$", text);
        Assert.Equal(digest, Digest.Parse(text));
        Assert.Throws<FormatException>(() => Digest.Parse("xyz"));
    }
}

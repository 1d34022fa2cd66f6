using NcclSwap.Cuda;
using NcclSwap.DataPlane;
using NcclSwap.Testing;

namespace NcclSwap.Gpu.Tests;

public class DigestTests
{
    public static TheoryData<long, int> SizesAndOffsets()
    {
        var data = new TheoryData<long, int>();
        long[] sizes = [0, 1, 31, 32, 33, 4095, 4096, 4097, 128 * 4096, 128 * 4096 + 1, 512 * 4096 + 77, 5_000_011, 64L * 1_048_576 + 3];
        foreach (long size in sizes)
            foreach (int offset in new[] { 0, 16, 1, 7 })
                data.Add(size, offset);
        return data;
    }

    [Theory]
    [MemberData(nameof(SizesAndOffsets))]
    public unsafe void Gpu_digest_equals_cpu_digest(long size, int offset)
    {
        using CudaContext context = Gpu.RequireContext();
        int seed = TestData.NewSeed();
        byte[] data = TestData.Random(checked((int)size), seed);
        using var buffer = DeviceBuffer.Allocate(context, size + offset + 1);
        buffer.Fill(0xA5);
        buffer.CopyFrom(data, offset);
        using var stream = CudaStream.Create(context);
        using var digest = new GpuDigest(context);
        Digest gpu = digest.Compute(buffer, offset, size, stream);
        Assert.True(BlockDigest.Compute(data) == gpu, $"size {size}, offset {offset}, seed {seed}");
    }

    [Fact]
    public unsafe void Three_levels_agree_and_a_flipped_bit_anywhere_changes_the_gpu_digest()
    {
        using CudaContext context = Gpu.RequireContext();
        int seed = TestData.NewSeed();
        var random = new Random(seed);
        long size = 512L * 512 * 4096 + 4096 * 3 + 5; // > 512² leaves: three levels above the leaves
        using var host = PinnedBuffer.Allocate(context, size);
        for (long done = 0; done < size; done += int.MaxValue / 2)
            random.NextBytes(host.GetSpan(done, (int)Math.Min(int.MaxValue / 2, size - done)));
        using var buffer = DeviceBuffer.Allocate(context, size);
        using var stream = CudaStream.Create(context);
        stream.CopyAsync(buffer, 0, host, 0, size);
        using var digest = new GpuDigest(context);
        Digest gpu = digest.Compute(buffer, 0, size, stream);
        Assert.Equal(BlockDigest.Compute(host.Pointer, size), gpu);

        byte[] one = new byte[1];
        for (int i = 0; i < 20; i++)
        {
            long position = i switch { 0 => 0, 1 => size - 1, _ => random.NextInt64(size) };
            buffer.CopyTo(one, position);
            byte original = one[0];
            one[0] ^= (byte)(1 << random.Next(8));
            buffer.CopyFrom(one, position);
            Assert.True(gpu != digest.Compute(buffer, 0, size, stream), $"byte {position} (seed {seed})");
            one[0] = original;
            buffer.CopyFrom(one, position);
        }
        Assert.Equal(gpu, digest.Compute(buffer, 0, size, stream));
    }
}

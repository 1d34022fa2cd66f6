using NcclSwap.DataPlane;

namespace NcclSwap.Perf;

internal static class RandomBytes
{
    /// <summary>Random bytes: 64 MiB made on the host, copied over the buffer with a different start each time.</summary>
    public static void Fill(IBackend backend, IDeviceBuffer buffer, int seed)
    {
        const int Chunk = 64 << 20;
        byte[] random = new byte[Chunk];
        new Random(seed).NextBytes(random);
        using IDeviceBuffer staged = backend.Allocate(Chunk);
        backend.Upload(random, staged);
        using ICopyStream stream = backend.CreateStream();
        for (long at = 0, i = 0; at < buffer.Length; i++)
        {
            long skew = i * 4099 % 4096;
            long take = Math.Min(Chunk - skew, buffer.Length - at);
            stream.CopyAsync(buffer, at, staged, skew, take);
            at += take;
        }
        stream.Synchronize();
    }
}

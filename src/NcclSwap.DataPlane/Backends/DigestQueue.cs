namespace NcclSwap.DataPlane;

/// <summary>
/// Digests enqueued on one stream behind the work already there and read back together by <see cref="Collect"/>: a
/// pipeline digests what it packs and unpacks without waiting for each digest. Made by
/// <see cref="IBackend.CreateDigestQueue"/>; one stream per queue.
/// </summary>
public interface IDigestQueue : IDisposable
{
    /// <summary>Enqueues the <see cref="BlockDigest"/> of each range of <paramref name="buffer"/>; returns the index of the first in what <see cref="Collect"/> returns.</summary>
    int Digest(IDeviceBuffer buffer, IReadOnlyList<(long Offset, long Length)> ranges);

    /// <summary>Enqueues the copies of <paramref name="runs"/> and the digests of the bytes they read (as <see cref="IBackend.CopyAndDigest"/>); returns the index of the first.</summary>
    int CopyAndDigest(IDeviceBuffer destination, IDeviceBuffer source, IReadOnlyList<CopyRun> runs);

    /// <summary>Waits for the stream and returns every digest enqueued since the last collect, in order.</summary>
    Digest[] Collect();
}

/// <summary>For backends whose streams finish their work as it is issued: each digest is computed when it is enqueued.</summary>
internal sealed class ImmediateDigestQueue(IBackend backend, ICopyStream stream) : IDigestQueue
{
    private readonly List<Digest> _digests = [];

    public int Digest(IDeviceBuffer buffer, IReadOnlyList<(long Offset, long Length)> ranges)
    {
        stream.Synchronize();
        int first = _digests.Count;
        _digests.AddRange(backend.Digests(buffer, ranges));
        return first;
    }

    public int CopyAndDigest(IDeviceBuffer destination, IDeviceBuffer source, IReadOnlyList<CopyRun> runs)
    {
        stream.Synchronize();
        int first = _digests.Count;
        _digests.AddRange(backend.CopyAndDigest(destination, source, runs));
        return first;
    }

    public Digest[] Collect()
    {
        stream.Synchronize();
        Digest[] all = [.. _digests];
        _digests.Clear();
        return all;
    }

    public void Dispose()
    {
    }
}

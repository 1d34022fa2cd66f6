namespace NcclSwap.DataPlane;

/// <summary>
/// A collective that hands everything to another and, when told to, spoils what it receives the way a failing link
/// would: after the next <c>count</c> receives of more than <c>above</c> bytes, it flips one bit in the middle of the
/// range received. For tests of the layers above (per-bucket digests, sending a bucket again).
/// </summary>
public sealed class FlakyCollective(ICollective inner, IBackend backend) : ICollective
{
    private int _left;
    private long _above;
    private int _corrupted;

    public ICollective Inner { get; } = inner;

    /// <summary>How many receives were spoiled so far.</summary>
    public int Corrupted => Volatile.Read(ref _corrupted);

    public void CorruptReceives(int count, long above = 8)
    {
        Volatile.Write(ref _above, above);
        Volatile.Write(ref _left, count);
    }

    public int Rank => Inner.Rank;

    public int Size => Inner.Size;

    public void Broadcast(IDeviceBuffer buffer, long offset, long length, int root, ICopyStream stream)
    {
        Inner.Broadcast(buffer, offset, length, root, stream);
        if (root != Rank)
            Spoil(buffer, offset, length, stream);
    }

    public void AllGather(IDeviceBuffer send, long sendOffset, IDeviceBuffer receive, long receiveOffset, long bytesPerRank, ICopyStream stream) =>
        Inner.AllGather(send, sendOffset, receive, receiveOffset, bytesPerRank, stream);

    public void Send(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream) => Inner.Send(buffer, offset, length, peer, stream);

    public void Receive(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream)
    {
        Inner.Receive(buffer, offset, length, peer, stream);
        Spoil(buffer, offset, length, stream);
    }

    public IDisposable Group() => Inner.Group();

    public void Abort() => Inner.Abort();

    public void Dispose() => Inner.Dispose();

    private void Spoil(IDeviceBuffer buffer, long offset, long length, ICopyStream stream)
    {
        if (length <= Volatile.Read(ref _above) || Interlocked.Decrement(ref _left) < 0)
            return;
        stream.Synchronize();
        FlakyBackend.FlipMiddleBit(backend, buffer, offset, length, 0x08);
        Interlocked.Increment(ref _corrupted);
    }
}

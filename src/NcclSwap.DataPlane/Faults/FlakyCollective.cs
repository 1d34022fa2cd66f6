namespace NcclSwap.DataPlane;

/// <summary>
/// A collective that hands everything to another and, when told to, spoils what it receives the way a failing link
/// would: after the next <c>count</c> receives of more than <c>above</c> bytes, it flips one bit in the middle of the
/// range received. For tests of the layers above (per-bucket digests, sending a bucket again).
/// </summary>
public sealed class FlakyCollective(ICollective inner, IBackend backend) : ICollective
{
    private Faults _faults = new();
    private int _groupDepth;
    private readonly List<(IDeviceBuffer Buffer, long Offset, long Length, ICopyStream Stream)> _spoilAtEnd = [];

    public ICollective Inner { get; } = inner;

    /// <summary>How many receives were spoiled so far (by this collective and its subsets).</summary>
    public int Corrupted => Volatile.Read(ref _faults.Corrupted);

    public void CorruptReceives(int count, long above = 8)
    {
        Volatile.Write(ref _faults.Above, above);
        Volatile.Write(ref _faults.Left, count);
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

    /// <summary>Receives issued inside the group are spoiled when it ends, once their bytes have arrived.</summary>
    public IDisposable Group()
    {
        IDisposable inner = Inner.Group();
        _groupDepth++;
        return new Scope(this, inner);
    }

    public void Wait(IDeviceEvent done, int? peer, string what) => Inner.Wait(done, peer, what);

    /// <summary>The inner collective's subset, spoiling receives from the same count as this one.</summary>
    public ICollective? Subset(IReadOnlyList<int> ranks) =>
        Inner.Subset(ranks) is { } subset ? new FlakyCollective(subset, backend) { _faults = _faults } : null;

    public void WatchPeers(Func<PeerLoss?> lost) => Inner.WatchPeers(lost);

    public void Abort() => Inner.Abort();

    public void Dispose() => Inner.Dispose();

    private void Spoil(IDeviceBuffer buffer, long offset, long length, ICopyStream stream)
    {
        if (_groupDepth > 0)
        {
            _spoilAtEnd.Add((buffer, offset, length, stream));
            return;
        }
        if (length <= Volatile.Read(ref _faults.Above) || Interlocked.Decrement(ref _faults.Left) < 0)
            return;
        stream.Synchronize();
        FlakyBackend.FlipMiddleBit(backend, buffer, offset, length, 0x08);
        Interlocked.Increment(ref _faults.Corrupted);
    }

    private sealed class Scope(FlakyCollective owner, IDisposable inner) : IDisposable
    {
        private bool _ended;

        public void Dispose()
        {
            if (_ended)
                return;
            _ended = true;
            inner.Dispose();
            if (--owner._groupDepth > 0)
                return;
            var spoil = owner._spoilAtEnd.ToList();
            owner._spoilAtEnd.Clear();
            foreach (var (buffer, offset, length, stream) in spoil)
                owner.Spoil(buffer, offset, length, stream);
        }
    }

    private sealed class Faults
    {
        public int Left;
        public long Above;
        public int Corrupted;
    }
}

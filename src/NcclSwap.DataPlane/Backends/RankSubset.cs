namespace NcclSwap.DataPlane;

/// <summary>
/// Some ranks of a collective as a collective of their own, run as sends and receives of the parent: a broadcast is
/// the root's send to each member, an all-gather every member's send to every other. It owns no links: disposing it
/// leaves the parent as it is, aborting it aborts the parent. Peers it names in errors are the parent's ranks.
/// </summary>
internal sealed class RankSubset : ICollective
{
    private readonly ICollective _parent;
    private readonly int[] _ranks;
    private int _groupDepth;

    private RankSubset(ICollective parent, int[] ranks, int rank)
    {
        _parent = parent;
        _ranks = ranks;
        Rank = rank;
    }

    public static RankSubset? Of(ICollective parent, IReadOnlyList<int> ranks)
    {
        CollectiveArguments.CheckSubset(ranks, parent.Size);
        int rank = ranks.ToList().IndexOf(parent.Rank);
        return rank < 0 ? null : new RankSubset(parent, [.. ranks], rank);
    }

    public int Rank { get; }

    public int Size => _ranks.Length;

    public void Broadcast(IDeviceBuffer buffer, long offset, long length, int root, ICopyStream stream)
    {
        CollectiveArguments.CheckRank(root, Size, "root");
        using (Group())
        {
            if (Rank != root)
                _parent.Receive(buffer, offset, length, _ranks[root], stream);
            else
                for (int member = 0; member < Size; member++)
                    if (member != root)
                        _parent.Send(buffer, offset, length, _ranks[member], stream);
        }
    }

    public void AllGather(IDeviceBuffer send, long sendOffset, IDeviceBuffer receive, long receiveOffset, long bytesPerRank, ICopyStream stream)
    {
        if (!SegmentedBuffer.Holds(receive, receiveOffset, checked(bytesPerRank * Size)))
            throw new ArgumentOutOfRangeException(nameof(receiveOffset), $"{Size} ranks of {bytesPerRank} bytes from {receiveOffset} do not fit {receive}");
        stream.CopyAsync(receive, receiveOffset + Rank * bytesPerRank, send, sendOffset, bytesPerRank);
        using (Group())
            for (int member = 0; member < Size; member++)
            {
                if (member == Rank)
                    continue;
                _parent.Send(send, sendOffset, bytesPerRank, _ranks[member], stream);
                _parent.Receive(receive, receiveOffset + member * bytesPerRank, bytesPerRank, _ranks[member], stream);
            }
    }

    public void Send(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream)
    {
        CollectiveArguments.CheckPeer(peer, Rank, Size, _groupDepth > 0);
        _parent.Send(buffer, offset, length, _ranks[peer], stream);
    }

    public void Receive(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream)
    {
        CollectiveArguments.CheckPeer(peer, Rank, Size, _groupDepth > 0);
        _parent.Receive(buffer, offset, length, _ranks[peer], stream);
    }

    public IDisposable Group()
    {
        IDisposable inner = _parent.Group();
        _groupDepth++;
        return new Scope(this, inner);
    }

    public void Wait(IDeviceEvent done, int? peer, string what) => _parent.Wait(done, peer is int p ? _ranks[p] : null, what);

    public void Abort() => _parent.Abort();

    public void Dispose()
    {
    }

    private sealed class Scope(RankSubset owner, IDisposable inner) : IDisposable
    {
        private bool _ended;

        public void Dispose()
        {
            if (_ended)
                return;
            _ended = true;
            owner._groupDepth--;
            inner.Dispose();
        }
    }
}

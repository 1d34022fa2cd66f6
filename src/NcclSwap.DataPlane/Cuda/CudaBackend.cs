using NcclSwap.Cuda;

namespace NcclSwap.DataPlane;

/// <summary>The GPU backend: device memory, streams and events of one device's primary context; NCCL collectives.</summary>
public sealed class CudaBackend : IBackend
{
    public CudaBackend(int device = 0, long maxRetainedPinnedBytes = 4L << 30)
    {
        Context = CudaContext.Retain(device);
        PinnedPool = new PinnedBufferPool(length => PinnedBuffer.Allocate(Context, length), maxRetainedPinnedBytes);
    }

    private readonly Lock _digestLock = new();
    private GpuDigest? _digest;
    private StridedCopyKernel? _strided;
    private CudaStream? _digestStream;

    public CudaContext Context { get; }

    public string Kind => "cuda";

    public string Description => $"cuda: {Context.Device}, {Context.Device.Name}";

    public PinnedBufferPool PinnedPool { get; }

    public IDeviceBuffer Allocate(long length) => new CudaDeviceBuffer(DeviceBuffer.Allocate(Context, length));

    public ICopyStream CreateStream() => new CudaCopyStream(CudaStream.Create(Context), this);

    public IDeviceEvent CreateEvent() => new CudaDeviceEvent(CudaEvent.Create(Context));

    public IDeviceBuffer MapHost(nint pointer, long length, bool readOnly, string name)
    {
        MappedHostMemory mapped = MappedHostMemory.Register(Context, pointer, length, readOnly);
        return new CudaDeviceBuffer(mapped.Buffer, mapped, name, onHost: true);
    }

    public IDeviceBuffer OpenIpc(CuIpcMemHandle handle, long offset, long length, string name)
    {
        IpcMemoryMapping mapping = IpcMemoryMapping.Open(Context, handle);
        try
        {
            if (offset < 0 || length < 0 || offset > mapping.Length - length)
                throw new ArgumentException($"{name}: the allocation its IPC handle names holds {mapping.Length} bytes, so bytes [{offset}, {offset}+{length}) are not in it", nameof(length));
            return new CudaDeviceBuffer(mapping.View(offset, length), mapping, name);
        }
        catch
        {
            mapping.Dispose();
            throw;
        }
    }

    public (long Free, long Total)? DeviceMemory => Context.MemoryInfo;

    public (CuIpcMemHandle Handle, long Offset) ExportIpc(IDeviceBuffer buffer)
    {
        CudaDeviceBuffer device = Backend.As<CudaDeviceBuffer>(buffer, Kind);
        if (device.OnHost)
            throw new ArgumentException($"{buffer} is host memory mapped for the GPU; CUDA IPC exports device allocations only", nameof(buffer));
        return device.Buffer.ExportIpcHandle();
    }

    public Digest[] Digests(IDeviceBuffer buffer, IReadOnlyList<(long Offset, long Length)> ranges)
    {
        // A segmented buffer's ranges each lie in one of its segments: one batch for all of them all the same.
        var resolved = ranges.Select(r =>
        {
            (IDeviceBuffer part, long offset) = SegmentedBuffer.Resolve(buffer, r.Offset, r.Length);
            return (AsCuda(part), offset, r.Length);
        }).ToList();
        Digest[] digests;
        lock (_digestLock) // one GpuDigest, whose scratch memory serves one digest at a time
        {
            _digest ??= new GpuDigest(Context);
            _digestStream ??= CudaStream.Create(Context);
            digests = _digest.Compute(resolved, _digestStream);
        }
        return digests;
    }

    public IDigestQueue CreateDigestQueue(ICopyStream stream) => new CudaDigestQueue(this, Backend.As<CudaCopyStream>(stream, Kind));

    /// <summary>
    /// Runs between device memory (16-byte aligned) are copied by the digest kernel as it hashes them, all in one
    /// launch; the others are copied with <c>cuMemcpy</c> (the copy engines: host memory, odd addresses) and their
    /// source digested in the same launch.
    /// </summary>
    public Digest[] CopyAndDigest(IDeviceBuffer destination, IDeviceBuffer source, IReadOnlyList<CopyRun> runs)
    {
        lock (_digestLock)
        {
            _digest ??= new GpuDigest(Context);
            _digestStream ??= CudaStream.Create(Context);
            return _digest.CopyAndDigest(KernelRanges(destination, source, runs, _digestStream, digests: true), _digestStream);
        }
    }

    /// <summary>
    /// The runs the copy kernel moves (device memory on both sides, aligned) as its ranges; the others copied with
    /// <c>cuMemcpy</c> on <paramref name="stream"/> now and, with <paramref name="digests"/>, given as digest-only ranges
    /// of their source (Destination 0), so that there is one range per run, in order.
    /// </summary>
    internal static List<(ulong Destination, ulong Source, long Length)> KernelRanges(IDeviceBuffer destination, IDeviceBuffer source, IReadOnlyList<CopyRun> runs, CudaStream stream, bool digests)
    {
        var ranges = new List<(ulong Destination, ulong Source, long Length)>(runs.Count);
        foreach (CopyRun run in runs)
        {
            if (run.Bytes == 0 && !digests)
                continue;
            (IDeviceBuffer to, long at) = SegmentedBuffer.Resolve(destination, run.To, run.Bytes);
            (IDeviceBuffer from, long offset) = SegmentedBuffer.Resolve(source, run.From, run.Bytes);
            CudaDeviceBuffer target = AsCudaBuffer(to), origin = AsCudaBuffer(from);
            ulong d = target.Buffer.At(at, run.Bytes), s = origin.Buffer.At(offset, run.Bytes);
            if (KernelCopies(target, origin, d, s))
                ranges.Add((d, s, run.Bytes));
            else
            {
                if (run.Bytes > 0)
                    stream.CopyAsync(target.Buffer, at, origin.Buffer, offset, run.Bytes);
                if (digests)
                    ranges.Add((0, s, run.Bytes));
            }
        }
        return ranges;
    }

    /// <summary>The kernels of <see cref="GpuDigest"/>; its batched copies need no lock.</summary>
    internal GpuDigest Kernels
    {
        get
        {
            lock (_digestLock)
                return _digest ??= new GpuDigest(Context);
        }
    }

    /// <summary>The strided copy kernel, loaded on first use.</summary>
    internal StridedCopyKernel Strided
    {
        get
        {
            lock (_digestLock)
                return _strided ??= new StridedCopyKernel(Context);
        }
    }

    /// <summary>Whether the copy kernel moves these bytes: device memory on both sides (host memory goes over the copy engines), aligned.</summary>
    internal static bool KernelCopies(CudaDeviceBuffer to, CudaDeviceBuffer from, ulong destination, ulong source) =>
        !to.OnHost && !from.OnHost && GpuDigest.CanCopy(destination, source);

    public void Upload(ReadOnlySpan<byte> source, IDeviceBuffer destination, long offset = 0) =>
        AsCuda(destination).CopyFrom(source, offset);

    public void Download(IDeviceBuffer source, long offset, Span<byte> destination) =>
        AsCuda(source).CopyTo(destination, offset);

    public string CreateCollectiveId() => NcclCollective.Scheme + NcclLibrary.CreateUniqueId().ToHex();

    public ICollective JoinCollective(string id, int rank, int size, TimeSpan timeout) =>
        NcclCollective.Join(Context, id, rank, size, timeout);

    public void Dispose()
    {
        _strided?.Dispose();
        _digest?.Dispose();
        _digestStream?.Dispose();
        PinnedPool.Dispose();
        Context.Dispose();
    }

    internal static DeviceBuffer AsCuda(IDeviceBuffer buffer) => AsCudaBuffer(buffer).Buffer;

    internal static CudaDeviceBuffer AsCudaBuffer(IDeviceBuffer buffer) => Backend.As<CudaDeviceBuffer>(buffer, "cuda");

    internal static CudaStream AsCuda(ICopyStream stream) => Backend.As<CudaCopyStream>(stream, "cuda").Stream;
}

/// <summary>A <see cref="DeviceBuffer"/> seen through the backend seam; <c>owner</c>, if any, is what Dispose releases along with it.</summary>
public sealed class CudaDeviceBuffer(DeviceBuffer buffer, IDisposable? owner = null, string? name = null, bool onHost = false) : IDeviceBuffer
{
    public DeviceBuffer Buffer { get; } = buffer;

    /// <summary>Page-locked host memory mapped into the device's address space (<see cref="CudaBackend.MapHost"/>).</summary>
    public bool OnHost { get; } = onHost;

    public long Length => Buffer.Length;

    public void Dispose()
    {
        Buffer.Dispose();
        owner?.Dispose();
    }

    public override string ToString() => name is null ? Buffer.ToString() : $"{name} ({Buffer})";
}

internal sealed class CudaCopyStream(CudaStream stream, CudaBackend backend) : ICopyStream
{
    public CudaStream Stream { get; } = stream;

    /// <summary>The runs between device memory in one launch of the copy kernel; the others with <c>cuMemcpy</c>.</summary>
    public void CopyAsync(IDeviceBuffer destination, IDeviceBuffer source, IReadOnlyList<CopyRun> runs)
    {
        List<(ulong Destination, ulong Source, long Length)> batch = CudaBackend.KernelRanges(destination, source, runs, Stream, digests: false);
        if (batch.Count > 0)
            backend.Kernels.EnqueueCopy(batch, Stream);
    }

    /// <summary>
    /// Single rows join the copy kernel's batch; copies of several rows between device memory go to the strided copy
    /// kernel in one launch, those touching host memory are one 2-D copy each on the copy engines.
    /// </summary>
    public void CopyAsync(IDeviceBuffer destination, IDeviceBuffer source, IReadOnlyList<StridedCopy> copies)
    {
        var single = new List<CopyRun>();
        var strided = new List<(ulong To, long ToPitch, ulong From, long FromPitch, long Bytes, long Rows)>();
        foreach (StridedCopy copy in copies)
        {
            if (copy.Rows <= 1 || copy.Bytes == 0 || copy.FromPitch > int.MaxValue || copy.ToPitch > int.MaxValue)
            {
                single.AddRange(copy.Runs());
                continue;
            }
            long toSpan = (copy.Rows - 1) * copy.ToPitch + copy.Bytes, fromSpan = (copy.Rows - 1) * copy.FromPitch + copy.Bytes;
            (IDeviceBuffer to, long at) = SegmentedBuffer.Resolve(destination, copy.To, toSpan);
            (IDeviceBuffer from, long offset) = SegmentedBuffer.Resolve(source, copy.From, fromSpan);
            CudaDeviceBuffer target = CudaBackend.AsCudaBuffer(to), origin = CudaBackend.AsCudaBuffer(from);
            if (!target.OnHost && !origin.OnHost)
                strided.Add((target.Buffer.At(at, toSpan), copy.ToPitch, origin.Buffer.At(offset, fromSpan), copy.FromPitch, copy.Bytes, copy.Rows));
            else
                Stream.CopyAsync(target.Buffer, at, copy.ToPitch, origin.Buffer, offset, copy.FromPitch, copy.Bytes, copy.Rows);
        }
        if (strided.Count > 0)
            backend.Strided.Enqueue(strided, Stream);
        if (single.Count > 0)
            CopyAsync(destination, source, single);
    }

    public void CopyAsync(IDeviceBuffer destination, long destinationOffset, PinnedBuffer source, long sourceOffset, long length) =>
        Stream.CopyAsync(CudaBackend.AsCuda(destination), destinationOffset, source, sourceOffset, length);

    public void CopyAsync(PinnedBuffer destination, long destinationOffset, IDeviceBuffer source, long sourceOffset, long length) =>
        Stream.CopyAsync(destination, destinationOffset, CudaBackend.AsCuda(source), sourceOffset, length);

    public void CopyAsync(IDeviceBuffer destination, long destinationOffset, IDeviceBuffer source, long sourceOffset, long length) =>
        Stream.CopyAsync(CudaBackend.AsCuda(destination), destinationOffset, CudaBackend.AsCuda(source), sourceOffset, length);

    public void FillAsync(IDeviceBuffer destination, long offset, long length, byte value) =>
        Stream.FillAsync(CudaBackend.AsCuda(destination), offset, length, value);

    public void Record(IDeviceEvent @event) => Stream.Record(Backend.As<CudaDeviceEvent>(@event, "cuda").Event);

    public void Wait(IDeviceEvent @event) => Stream.Wait(Backend.As<CudaDeviceEvent>(@event, "cuda").Event);

    public void WaitValue(IDeviceBuffer word, long offset, uint value) => Stream.WaitValue(CudaBackend.AsCuda(word), offset, value);

    public void WriteValue(IDeviceBuffer word, long offset, uint value) => Stream.WriteValue(CudaBackend.AsCuda(word), offset, value);

    public void Synchronize() => Stream.Synchronize();

    public void Dispose() => Stream.Dispose();
}

internal sealed class CudaDeviceEvent(CudaEvent @event) : IDeviceEvent
{
    public CudaEvent Event { get; } = @event;

    public bool IsComplete => Event.IsComplete;

    public void Synchronize() => Event.Synchronize();

    public void Dispose() => Event.Dispose();
}

/// <summary>
/// An NCCL communicator behind the collective seam: non-blocking, with a deadline on every wait. A subset is a
/// communicator split from this one; its errors name the ranks of the collective it was split from.
/// </summary>
internal sealed class NcclCollective : ICollective
{
    internal const string Scheme = "nccl:";
    private readonly NcclCommunicator _comm;
    private readonly TimeSpan _timeout;
    private readonly int[] _names;
    private int _groupDepth;
    private Func<PeerLoss?>? _lost;

    private NcclCollective(NcclCommunicator comm, int rank, int size, TimeSpan timeout, int[]? names = null)
    {
        _comm = comm;
        Rank = rank;
        Size = size;
        _timeout = timeout;
        _names = names ?? Enumerable.Range(0, size).ToArray();
    }

    public int Rank { get; }

    public int Size { get; }

    public static NcclCollective Join(CudaContext context, string id, int rank, int size, TimeSpan timeout)
    {
        if (!id.StartsWith(Scheme, StringComparison.Ordinal))
            throw new ArgumentException($"'{id}' is not an NCCL collective id (expected nccl:<256 hex digits>).", nameof(id));
        NcclUniqueId unique = NcclUniqueId.FromHex(id[Scheme.Length..]);
        try
        {
            return new NcclCollective(NcclCommunicator.InitRank(context, size, unique, rank, blocking: false, timeout), rank, size, timeout);
        }
        catch (Exception e) when (e is NcclException or TimeoutException)
        {
            throw new CollectiveException($"rank {rank}: joining the NCCL collective of {size} ranks failed: {e.Message}", null, e);
        }
    }

    public void Broadcast(IDeviceBuffer buffer, long offset, long length, int root, ICopyStream stream)
    {
        CollectiveArguments.CheckRank(root, Size, "root");
        ulong address = CudaBackend.AsCuda(buffer).At(offset, length);
        Enqueue("broadcast", Rank == root ? null : root, () => _comm.Broadcast(address, address, length, root, CudaBackend.AsCuda(stream)));
    }

    public void AllGather(IDeviceBuffer send, long sendOffset, IDeviceBuffer receive, long receiveOffset, long bytesPerRank, ICopyStream stream)
    {
        ulong from = CudaBackend.AsCuda(send).At(sendOffset, bytesPerRank);
        ulong to = CudaBackend.AsCuda(receive).At(receiveOffset, checked(bytesPerRank * Size));
        Enqueue("all-gather", null, () => _comm.AllGather(from, to, bytesPerRank, CudaBackend.AsCuda(stream)));
    }

    public void Send(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream)
    {
        CollectiveArguments.CheckPeer(peer, Rank, Size, _groupDepth > 0);
        ulong address = CudaBackend.AsCuda(buffer).At(offset, length);
        Enqueue("send", peer, () => _comm.Send(address, length, peer, CudaBackend.AsCuda(stream)));
    }

    public void Receive(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream)
    {
        CollectiveArguments.CheckPeer(peer, Rank, Size, _groupDepth > 0);
        ulong address = CudaBackend.AsCuda(buffer).At(offset, length);
        Enqueue("receive", peer, () => _comm.Receive(address, length, peer, CudaBackend.AsCuda(stream)));
    }

    public IDisposable Group()
    {
        var scope = new GroupScope(NcclCommunicator.Group(), this);
        _groupDepth++;
        return scope;
    }

    /// <summary>Polls the event and the communicator's asynchronous error; at the deadline aborts the communicator, which ends its kernels.</summary>
    public void Wait(IDeviceEvent done, int? peer, string what)
    {
        string waitingOn = peer is int p ? $" (waiting on rank {_names[p]})" : "";
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var spinner = new SpinWait();
        while (!done.IsComplete)
        {
            if (_lost?.Invoke() is { } loss)
            {
                Abort();
                throw new CollectiveException($"rank {_names[Rank]}: {what} ended{waitingOn}: {loss.Why}; the communicator was aborted", loss.Rank);
            }
            NcclResult state = _comm.GetAsyncError();
            if (state is not NcclResult.Success and not NcclResult.InProgress)
            {
                Abort();
                throw new CollectiveException($"rank {_names[Rank]}: {what} failed{waitingOn}: NCCL reports {state}; the communicator was aborted", peer is int q ? _names[q] : null);
            }
            if (clock.Elapsed > _timeout)
            {
                Abort();
                throw new CollectiveException(
                    $"rank {_names[Rank]}: {what} did not finish within {_timeout.TotalSeconds:0.#} s{waitingOn}; the communicator was aborted", peer is int q ? _names[q] : null);
            }
            if (clock.ElapsedTicks < System.Diagnostics.Stopwatch.Frequency / 200)
                spinner.SpinOnce(sleep1Threshold: -1); // the first 5 ms: a bucket in flight ends within about one
            else
                Thread.Sleep(1);
        }
    }

    /// <summary>Splits the communicator: members pass color 0 and their place in the list as key, the others no color.</summary>
    public ICollective? Subset(IReadOnlyList<int> ranks)
    {
        CollectiveArguments.CheckSubset(ranks, Size);
        int place = ranks.ToList().IndexOf(Rank);
        NcclCommunicator? split;
        try
        {
            split = _comm.Split(place < 0 ? -1 : 0, Math.Max(place, 0), _timeout);
        }
        catch (Exception e) when (e is NcclException or TimeoutException)
        {
            throw new CollectiveException($"rank {_names[Rank]}: splitting ranks [{string.Join(", ", ranks.Select(r => _names[r]))}] off failed: {e.Message}", null, e);
        }
        return split is null ? null : new NcclCollective(split, place, ranks.Count, _timeout, [.. ranks.Select(r => _names[r])]) { _lost = _lost };
    }

    public void WatchPeers(Func<PeerLoss?> lost) => _lost = lost;

    private string? GiveUp() => _lost?.Invoke()?.Why;

    public void Abort() => _comm.Abort();

    public void Dispose() => _comm.Dispose();

    /// <summary>Issues one NCCL call; its failure becomes a <see cref="CollectiveException"/> naming this rank and the peer.</summary>
    private void Enqueue(string operation, int? peer, Action call)
    {
        try
        {
            call();
            if (_groupDepth == 0 && operation != "group")
                _comm.WaitReady(_timeout, operation, GiveUp); // outside a group, a non-blocking call may still be in progress: NCCL takes no other call until it is not
        }
        catch (OperationCanceledException e)
        {
            throw new CollectiveException($"rank {_names[Rank]}: {e.Message}", _lost?.Invoke()?.Rank, e);
        }
        catch (TimeoutException e)
        {
            throw new CollectiveException($"rank {_names[Rank]}: {e.Message}", peer is int p ? _names[p] : null, e);
        }
        catch (NcclException e)
        {
            string with = peer is null ? "" : $" with rank {_names[peer.Value]}";
            throw new CollectiveException($"rank {_names[Rank]}: NCCL {operation}{with} failed: {e.Message}", peer is int p ? _names[p] : null, e);
        }
    }

    private void WaitGroup()
    {
        try
        {
            _comm.WaitReady(_timeout, "group", GiveUp);
        }
        catch (OperationCanceledException e)
        {
            throw new CollectiveException($"rank {_names[Rank]}: {e.Message}", _lost?.Invoke()?.Rank, e);
        }
        catch (TimeoutException e)
        {
            throw new CollectiveException($"rank {_names[Rank]}: {e.Message}", null, e);
        }
    }

    private sealed class GroupScope(NcclGroup group, NcclCollective owner) : IDisposable
    {
        private NcclGroup _group = group;
        private bool _ended;

        public void Dispose()
        {
            if (_ended)
                return;
            _ended = true;
            owner._groupDepth--;
            owner.Enqueue("group", null, () =>
            {
                _group.Dispose();
                owner.WaitGroup();
            });
        }
    }
}

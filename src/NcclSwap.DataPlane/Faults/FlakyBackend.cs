using NcclSwap.Cuda;

namespace NcclSwap.DataPlane;

/// <summary>
/// A backend that hands everything to another and, when told to, spoils bytes the way failing hardware would:
/// after a copy into a buffer whose name contains a given text, it flips one bit in the middle of the range just
/// written; or refuses to map host memory whose name contains a text, as a driver refuses to page-lock files on
/// disk. For tests of the layers above the seam (verification, re-sending, refusing to activate); it works over
/// either backend, since it reads and writes the byte through the inner backend.
/// </summary>
public sealed class FlakyBackend(IBackend inner) : IBackend
{
    private readonly Lock _lock = new();
    private readonly List<Rule> _rules = [];
    private int _corrupted;
    private string? _unmappable;

    public IBackend Inner { get; } = inner;

    /// <summary>How many copies were spoiled so far.</summary>
    public int Corrupted => Volatile.Read(ref _corrupted);

    /// <summary>Spoils the next <paramref name="count"/> copies into buffers whose name contains <paramref name="target"/>.</summary>
    public void CorruptCopiesInto(string target, int count = 1)
    {
        lock (_lock)
            _rules.Add(new Rule(target, count));
    }

    /// <summary>From now on <see cref="MapHost"/> refuses memory whose name contains <paramref name="name"/> (null: none), with the error CUDA gives.</summary>
    public void RefuseMapHost(string? name) => _unmappable = name;

    /// <summary>Forgets every rule not yet used up.</summary>
    public void Heal()
    {
        lock (_lock)
            _rules.Clear();
    }

    public string Kind => Inner.Kind;

    public string Description => $"{Inner.Description} (flaky: spoils bytes on request)";

    public PinnedBufferPool PinnedPool => Inner.PinnedPool;

    public IDeviceBuffer Allocate(long length) => Inner.Allocate(length);

    public IDeviceBuffer MapHost(nint pointer, long length, bool readOnly, string name) =>
        _unmappable is { } refused && name.Contains(refused, StringComparison.Ordinal)
            ? throw new CudaException(CuResult.InvalidValue, "CUDA_ERROR_INVALID_VALUE", $"invalid argument (flaky backend: {name} refused, as a file on disk is)", "cuMemHostRegister")
            : Inner.MapHost(pointer, length, readOnly, name);

    public IDeviceBuffer OpenIpc(CuIpcMemHandle handle, long offset, long length, string name) => Inner.OpenIpc(handle, offset, length, name);

    public (CuIpcMemHandle Handle, long Offset) ExportIpc(IDeviceBuffer buffer) => Inner.ExportIpc(buffer);

    public (long Free, long Total)? DeviceMemory => Inner.DeviceMemory;

    public Digest[] Digests(IDeviceBuffer buffer, IReadOnlyList<(long Offset, long Length)> ranges) => Inner.Digests(buffer, ranges);

    public ICopyStream CreateStream() => new FlakyStream(this, Inner.CreateStream());

    public IDeviceEvent CreateEvent() => Inner.CreateEvent();

    public void Upload(ReadOnlySpan<byte> source, IDeviceBuffer destination, long offset = 0) => Inner.Upload(source, destination, offset);

    public void Download(IDeviceBuffer source, long offset, Span<byte> destination) => Inner.Download(source, offset, destination);

    public string CreateCollectiveId() => Inner.CreateCollectiveId();

    public ICollective JoinCollective(string id, int rank, int size, TimeSpan timeout) => Inner.JoinCollective(id, rank, size, timeout);

    public void Dispose() => Inner.Dispose();

    private bool Take(IDeviceBuffer destination)
    {
        string name = destination.ToString() ?? "";
        lock (_lock)
        {
            Rule? rule = _rules.FirstOrDefault(r => name.Contains(r.Target, StringComparison.Ordinal));
            if (rule is null)
                return false;
            if (--rule.Left == 0)
                _rules.Remove(rule);
            return true;
        }
    }

    private void Spoil(ICopyStream stream, IDeviceBuffer destination, long offset, long length)
    {
        if (length == 0 || !Take(destination))
            return;
        stream.Synchronize();
        FlipMiddleBit(Inner, destination, offset, length, 0x10);
        Interlocked.Increment(ref _corrupted);
    }

    /// <summary>Flips the bits of <paramref name="mask"/> in the middle byte of [offset, offset+length) of <paramref name="buffer"/>, through <paramref name="backend"/>.</summary>
    internal static void FlipMiddleBit(IBackend backend, IDeviceBuffer buffer, long offset, long length, byte mask)
    {
        long at = offset + length / 2;
        Span<byte> one = stackalloc byte[1];
        backend.Download(buffer, at, one);
        one[0] ^= mask;
        backend.Upload(one, buffer, at);
    }

    private sealed class Rule(string target, int count)
    {
        public string Target { get; } = target;

        public int Left { get; set; } = count;
    }

    private sealed class FlakyStream(FlakyBackend backend, ICopyStream inner) : ICopyStream
    {
        public void CopyAsync(IDeviceBuffer destination, long destinationOffset, PinnedBuffer source, long sourceOffset, long length)
        {
            inner.CopyAsync(destination, destinationOffset, source, sourceOffset, length);
            backend.Spoil(inner, destination, destinationOffset, length);
        }

        public void CopyAsync(PinnedBuffer destination, long destinationOffset, IDeviceBuffer source, long sourceOffset, long length) =>
            inner.CopyAsync(destination, destinationOffset, source, sourceOffset, length);

        public void CopyAsync(IDeviceBuffer destination, long destinationOffset, IDeviceBuffer source, long sourceOffset, long length)
        {
            inner.CopyAsync(destination, destinationOffset, source, sourceOffset, length);
            backend.Spoil(inner, destination, destinationOffset, length);
        }

        public void FillAsync(IDeviceBuffer destination, long offset, long length, byte value) => inner.FillAsync(destination, offset, length, value);

        public void Record(IDeviceEvent @event) => inner.Record(@event);

        public void Wait(IDeviceEvent @event) => inner.Wait(@event);

        public void WaitValue(IDeviceBuffer word, long offset, uint value) => inner.WaitValue(word, offset, value);

        public void WriteValue(IDeviceBuffer word, long offset, uint value) => inner.WriteValue(word, offset, value);

        public void Synchronize() => inner.Synchronize();

        public void Dispose() => inner.Dispose();
    }
}

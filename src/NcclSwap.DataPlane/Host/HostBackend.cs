using System.Runtime.InteropServices;
using NcclSwap.Cuda;

namespace NcclSwap.DataPlane;

/// <summary>
/// The backend without a GPU: "device" memory is page-aligned host memory, a stream runs each operation
/// at once in issue order, and collectives go over loopback TCP between processes.
/// </summary>
public sealed class HostBackend : IBackend
{
    public HostBackend(long maxRetainedPinnedBytes = 1L << 30) =>
        PinnedPool = new PinnedBufferPool(PinnedBuffer.AllocatePageable, maxRetainedPinnedBytes);

    public string Kind => "host";

    public string Description => $"host: CPU memory, loopback TCP collectives ({Environment.ProcessorCount} cores)";

    public PinnedBufferPool PinnedPool { get; }

    public IDeviceBuffer Allocate(long length) => new HostDeviceBuffer(length);

    public ICopyStream CreateStream() => new HostStream();

    public IDeviceEvent CreateEvent() => new HostEvent();

    public IDeviceBuffer MapHost(nint pointer, long length, bool readOnly, string name) => new HostDeviceBuffer(pointer, length, name);

    public IDeviceBuffer OpenIpc(CuIpcMemHandle handle, long offset, long length, string name) =>
        throw new NotSupportedException($"{name} is GPU memory (a CUDA IPC handle), which the host backend cannot open: run the agent with the cuda backend on the machine of that GPU");

    public (CuIpcMemHandle Handle, long Offset) ExportIpc(IDeviceBuffer buffer) =>
        throw new NotSupportedException($"{buffer} is host memory; only the cuda backend exports CUDA IPC handles");

    public (long Free, long Total)? DeviceMemory => null;

    public Digest[] Digests(IDeviceBuffer buffer, IReadOnlyList<(long Offset, long Length)> ranges)
    {
        var at = new nint[ranges.Count];
        for (int i = 0; i < ranges.Count; i++)
        {
            (IDeviceBuffer part, long offset) = SegmentedBuffer.Resolve(buffer, ranges[i].Offset, ranges[i].Length);
            HostDeviceBuffer host = AsHost(part);
            host.CheckRange(offset, ranges[i].Length);
            at[i] = host.Pointer + (nint)offset;
        }
        var digests = new Digest[ranges.Count];
        // Large ranges one at a time, each spread over every core; small ones side by side, one core each.
        const long large = 8L << 20;
        for (int i = 0; i < ranges.Count; i++)
            if (ranges[i].Length >= large)
                digests[i] = BlockDigest.Compute(at[i], ranges[i].Length);
        Parallel.For(0, ranges.Count, i =>
        {
            if (ranges[i].Length < large)
                digests[i] = BlockDigest.Compute(at[i], ranges[i].Length, parallelism: 1);
        });
        return digests;
    }

    public void Upload(ReadOnlySpan<byte> source, IDeviceBuffer destination, long offset = 0) =>
        source.CopyTo(AsHost(destination).GetSpan(offset, source.Length));

    public void Download(IDeviceBuffer source, long offset, Span<byte> destination) =>
        AsHost(source).GetSpan(offset, destination.Length).CopyTo(destination);

    public string CreateCollectiveId() => HostCollective.CreateId();

    public ICollective JoinCollective(string id, int rank, int size, TimeSpan timeout) =>
        HostCollective.Join(id, rank, size, timeout);

    public void Dispose() => PinnedPool.Dispose();

    internal static HostDeviceBuffer AsHost(IDeviceBuffer buffer) => Backend.As<HostDeviceBuffer>(buffer, "host");
}

/// <summary>Page-aligned host memory standing in for device memory, or a view of host memory owned elsewhere.</summary>
public sealed unsafe class HostDeviceBuffer : IDeviceBuffer
{
    private readonly bool _owns;
    private readonly string? _name;
    private int _disposed;

    public HostDeviceBuffer(long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        Length = length;
        Pointer = (nint)NativeMemory.AlignedAlloc(checked((nuint)length), 4096);
        _owns = true;
    }

    /// <summary>A view of <paramref name="length"/> bytes at <paramref name="pointer"/>; Dispose frees nothing.</summary>
    internal HostDeviceBuffer(nint pointer, long length, string name)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        Pointer = pointer;
        Length = length;
        _name = name;
    }

    public long Length { get; }

    public nint Pointer { get; }

    public Span<byte> GetSpan(long offset, long length)
    {
        CheckRange(offset, length);
        if (length > int.MaxValue)
            throw new ArgumentOutOfRangeException(nameof(length), $"range [{offset}, {offset}+{length}) of {this} is too long for one span.");
        return new Span<byte>((byte*)Pointer + offset, (int)length);
    }

    internal void CheckRange(long offset, long length)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        if (offset < 0 || length < 0 || offset > Length || length > Length - offset)
            throw new ArgumentOutOfRangeException(nameof(offset), $"range [{offset}, {offset}+{length}) does not fit in {this}.");
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 0 && _owns)
            NativeMemory.AlignedFree((void*)Pointer);
    }

    public override string ToString() => _name is null ? $"host buffer of {Length} bytes" : $"{_name} ({Length} bytes)";
}

/// <summary>Runs every operation when it is issued, which keeps the stream's order trivially.</summary>
internal sealed class HostStream : ICopyStream
{
    public void CopyAsync(IDeviceBuffer destination, long destinationOffset, PinnedBuffer source, long sourceOffset, long length) =>
        Copy(source.GetSpan(sourceOffset, checked((int)length)), HostBackend.AsHost(destination).GetSpan(destinationOffset, length));

    public void CopyAsync(PinnedBuffer destination, long destinationOffset, IDeviceBuffer source, long sourceOffset, long length) =>
        Copy(HostBackend.AsHost(source).GetSpan(sourceOffset, length), destination.GetSpan(destinationOffset, checked((int)length)));

    public void CopyAsync(IDeviceBuffer destination, long destinationOffset, IDeviceBuffer source, long sourceOffset, long length) =>
        Copy(HostBackend.AsHost(source).GetSpan(sourceOffset, length), HostBackend.AsHost(destination).GetSpan(destinationOffset, length));

    public void FillAsync(IDeviceBuffer destination, long offset, long length, byte value) =>
        HostBackend.AsHost(destination).GetSpan(offset, length).Fill(value);

    public void Record(IDeviceEvent @event) => Backend.As<HostEvent>(@event, "host").Recorded = true;

    public void Wait(IDeviceEvent @event) => Backend.As<HostEvent>(@event, "host");

    public unsafe void WaitValue(IDeviceBuffer word, long offset, uint value)
    {
        uint* at = (uint*)(HostBackend.AsHost(word).Pointer + (nint)offset);
        HostBackend.AsHost(word).CheckRange(offset, sizeof(uint));
        var spin = new SpinWait();
        while ((int)(Volatile.Read(ref *at) - value) < 0)
            spin.SpinOnce(sleep1Threshold: 64);
    }

    public unsafe void WriteValue(IDeviceBuffer word, long offset, uint value)
    {
        HostBackend.AsHost(word).CheckRange(offset, sizeof(uint));
        Volatile.Write(ref *(uint*)(HostBackend.AsHost(word).Pointer + (nint)offset), value);
    }

    public void Synchronize()
    {
    }

    public void Dispose()
    {
    }

    private static void Copy(ReadOnlySpan<byte> from, Span<byte> to) => from.CopyTo(to);
}

/// <summary>Complete as soon as it is recorded, since host streams finish work when it is issued.</summary>
internal sealed class HostEvent : IDeviceEvent
{
    public bool Recorded { get; set; }

    public bool IsComplete => true;

    public void Synchronize()
    {
    }

    public void Dispose()
    {
    }
}

using System.Collections.Concurrent;
using System.Numerics;

namespace NcclSwap.Cuda;

/// <summary>
/// Reuses pinned buffers: page-locking is slow (milliseconds per GiB), so buffers are kept in power-of-two
/// size classes and handed out again. Rented buffers must come back through <see cref="Return"/>; the pool
/// frees what it holds on Dispose and what would take it over <see cref="MaxRetainedBytes"/>.
/// </summary>
public sealed class PinnedBufferPool : IDisposable
{
    /// <summary>The smallest size class.</summary>
    public const long MinimumSize = 64 * 1024;

    private readonly Func<long, PinnedBuffer> _allocate;
    private readonly ConcurrentDictionary<long, ConcurrentBag<PinnedBuffer>> _free = new();
    private readonly ConcurrentDictionary<PinnedBuffer, byte> _rented = new(ReferenceEqualityComparer.Instance);
    private long _retainedBytes;
    private long _allocations;
    private int _disposed;

    /// <param name="allocate">Makes a buffer of exactly the given size (e.g. <see cref="PinnedBuffer.Allocate"/>).</param>
    /// <param name="maxRetainedBytes">How many bytes of returned buffers to keep for reuse.</param>
    public PinnedBufferPool(Func<long, PinnedBuffer> allocate, long maxRetainedBytes)
    {
        _allocate = allocate;
        MaxRetainedBytes = maxRetainedBytes;
    }

    public long MaxRetainedBytes { get; }

    /// <summary>Bytes held for reuse now.</summary>
    public long RetainedBytes => Interlocked.Read(ref _retainedBytes);

    /// <summary>How many buffers the pool has allocated in its life.</summary>
    public long Allocations => Interlocked.Read(ref _allocations);

    /// <summary>A buffer of at least <paramref name="minimumLength"/> bytes (its size class).</summary>
    public PinnedBuffer Rent(long minimumLength)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(minimumLength);
        long size = SizeClass(minimumLength);
        PinnedBuffer? buffer = null;
        while (_free.TryGetValue(size, out var bag) && bag.TryTake(out buffer))
        {
            Interlocked.Add(ref _retainedBytes, -size);
            if (!buffer.IsDisposed)
                break;
            buffer = null;
        }
        if (buffer is null)
        {
            buffer = _allocate(size);
            Interlocked.Increment(ref _allocations);
        }
        _rented[buffer] = 0;
        return buffer;
    }

    /// <summary>Gives a rented buffer back. A buffer that this pool did not rent out is refused.</summary>
    public void Return(PinnedBuffer buffer)
    {
        if (!_rented.TryRemove(buffer, out _))
            throw new ArgumentException($"{buffer} was not rented from this pool, or was already returned.", nameof(buffer));
        if (Volatile.Read(ref _disposed) != 0 || Interlocked.Add(ref _retainedBytes, buffer.Length) > MaxRetainedBytes)
        {
            if (Volatile.Read(ref _disposed) == 0)
                Interlocked.Add(ref _retainedBytes, -buffer.Length);
            buffer.Dispose();
            return;
        }
        _free.GetOrAdd(buffer.Length, _ => new ConcurrentBag<PinnedBuffer>()).Add(buffer);
    }

    /// <summary>Frees the buffers held for reuse; buffers still rented are freed when they come back.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        foreach (var bag in _free.Values)
            while (bag.TryTake(out var buffer))
                buffer.Dispose();
        Interlocked.Exchange(ref _retainedBytes, 0);
    }

    internal static long SizeClass(long length) =>
        length <= MinimumSize ? MinimumSize : (long)BitOperations.RoundUpToPowerOf2((ulong)length);
}

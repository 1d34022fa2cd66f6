namespace NcclSwap.DataPlane;

/// <summary>
/// Several buffers seen as one range of offsets: buffer i covers [At_i, At_i + Length_i), in order, with gaps
/// between them that belong to none. A trainer's tensors rarely share one allocation, so a client's GPU region is
/// its allocations laid out this way. Copies and digests address one segment at a time: <see cref="Resolve"/>
/// turns a range into the segment that holds it, and refuses a range that holds bytes of none or of two; every
/// backend's <see cref="IBackend.Digests"/> takes a segmented buffer so.
/// Dispose disposes every segment.
/// </summary>
public sealed class SegmentedBuffer : IDeviceBuffer
{
    private readonly long[] _starts;
    private readonly IDeviceBuffer[] _buffers;
    private readonly string _name;

    public SegmentedBuffer(IReadOnlyList<(long At, IDeviceBuffer Buffer)> segments, string name)
    {
        if (segments.Count == 0)
            throw new ArgumentException("a segmented buffer needs at least one segment", nameof(segments));
        for (int i = 1; i < segments.Count; i++)
            if (segments[i].At < segments[i - 1].At + segments[i - 1].Buffer.Length)
                throw new ArgumentException($"{name}: segment {i} at {segments[i].At} overlaps the one before", nameof(segments));
        _starts = segments.Select(s => s.At).ToArray();
        _buffers = segments.Select(s => s.Buffer).ToArray();
        _name = name;
        Length = _starts[^1] + _buffers[^1].Length;
    }

    /// <summary>One past the last byte of the last segment.</summary>
    public long Length { get; }

    public int Count => _buffers.Length;

    /// <summary>The segment that holds all of [offset, offset+length), and the offset within it (an empty range: the first).</summary>
    public (IDeviceBuffer Buffer, long Offset) Resolve(long offset, long length)
    {
        if (length == 0 && offset >= 0 && offset <= Length)
            return (_buffers[0], 0); // no bytes: any segment will do
        int i = Array.BinarySearch(_starts, offset);
        if (i < 0)
            i = ~i - 1;
        if (i < 0 || length < 0 || offset - _starts[i] > _buffers[i].Length - length)
            throw new ArgumentOutOfRangeException(nameof(offset), $"range [{offset}, {offset}+{length}) of {this} does not lie within one of its segments");
        return (_buffers[i], offset - _starts[i]);
    }

    /// <summary><see cref="Resolve"/> for a segmented buffer, the buffer itself otherwise.</summary>
    public static (IDeviceBuffer Buffer, long Offset) Resolve(IDeviceBuffer buffer, long offset, long length) =>
        buffer is SegmentedBuffer segmented ? segmented.Resolve(offset, length) : (buffer, offset);

    /// <summary>Whether [offset, offset+length) lies within <paramref name="buffer"/> (within one segment, if it has several).</summary>
    public static bool Holds(IDeviceBuffer buffer, long offset, long length)
    {
        if (buffer is not SegmentedBuffer segmented)
            return offset >= 0 && length >= 0 && offset <= buffer.Length - length;
        try
        {
            segmented.Resolve(offset, length);
            return true;
        }
        catch (ArgumentOutOfRangeException)
        {
            return false;
        }
    }

    /// <summary>Copies a range from one buffer to another, either of which may be segmented.</summary>
    public static void CopyAsync(ICopyStream stream, IDeviceBuffer to, long toOffset, IDeviceBuffer from, long fromOffset, long length)
    {
        (IDeviceBuffer destination, long at) = Resolve(to, toOffset, length);
        (IDeviceBuffer source, long offset) = Resolve(from, fromOffset, length);
        stream.CopyAsync(destination, at, source, offset, length);
    }

    public void Dispose()
    {
        foreach (IDeviceBuffer buffer in _buffers)
            buffer.Dispose();
    }

    public override string ToString() => $"{_name} ({_buffers.Length} segments, {Length} bytes of offsets)";
}

using System.Diagnostics;
using Microsoft.Win32.SafeHandles;
using NcclSwap.Cuda;
using NcclSwap.DataPlane;

namespace NcclSwap.WeightSets;

/// <summary>How far a load is.</summary>
public readonly record struct LoadProgress(long BytesDone, long BytesTotal, TimeSpan Elapsed)
{
    public double BytesPerSecond => Elapsed.TotalSeconds > 0 ? BytesDone / Elapsed.TotalSeconds : 0;

    public override string ToString() =>
        $"{BytesDone / 1e9:0.00} of {BytesTotal / 1e9:0.00} GB ({(BytesTotal == 0 ? 100 : 100.0 * BytesDone / BytesTotal):0}%), {BytesPerSecond / 1e9:0.00} GB/s";
}

/// <summary>A checkpoint's tensor bytes in pinned host memory: one buffer per file, holding its data section.</summary>
public sealed class LoadedCheckpoint : IDisposable
{
    private readonly PinnedBuffer?[] _buffers;
    private readonly Dictionary<string, int> _fileIndex;
    private readonly Action<PinnedBuffer> _release;

    internal LoadedCheckpoint(Checkpoint checkpoint, PinnedBuffer?[] buffers, TimeSpan elapsed, Action<PinnedBuffer> release)
    {
        Checkpoint = checkpoint;
        _buffers = buffers;
        Elapsed = elapsed;
        _release = release;
        _fileIndex = checkpoint.Files.Select((f, i) => (f.Path, i)).ToDictionary(x => x.Path, x => x.i, StringComparer.Ordinal);
    }

    public Checkpoint Checkpoint { get; }

    public TimeSpan Elapsed { get; }

    public double BytesPerSecond => Checkpoint.TotalBytes / Elapsed.TotalSeconds;

    public IReadOnlyList<PinnedBuffer?> Buffers => _buffers;

    /// <summary>The address of the tensor's first byte in pinned memory (valid while this object is).</summary>
    public nint Pointer(TensorInfo tensor)
    {
        PinnedBuffer? buffer = _buffers[_fileIndex[tensor.File]];
        return buffer is null ? 0 : buffer.Pointer + (nint)tensor.Begin;
    }

    /// <summary>The tensor's bytes; tensors of 2 GiB and more must use <see cref="Pointer"/>.</summary>
    public unsafe ReadOnlySpan<byte> Bytes(TensorInfo tensor) => new((void*)Pointer(tensor), checked((int)tensor.Bytes));

    /// <summary>The manifest of these bytes: every tensor's digest, computed in parallel.</summary>
    public Manifest CreateManifest(int parallelism = 0)
    {
        var entries = new ManifestEntry[Checkpoint.Tensors.Count];
        var options = new ParallelOptions { MaxDegreeOfParallelism = parallelism > 0 ? parallelism : Environment.ProcessorCount };
        Parallel.For(0, entries.Length, options, i =>
        {
            TensorInfo t = Checkpoint.Tensors[i];
            entries[i] = new ManifestEntry(t.Name, t.Dtype.Name, t.Shape, t.Bytes, BlockDigest.Compute(Pointer(t), t.Bytes, parallelism: 1));
        });
        return Manifest.Create(entries);
    }

    /// <summary>Gives the buffers back (to their pool, or frees them); idempotent.</summary>
    public void Dispose()
    {
        for (int i = 0; i < _buffers.Length; i++)
        {
            if (Interlocked.Exchange(ref _buffers[i], null) is { } buffer)
                _release(buffer);
        }
    }
}

/// <summary>
/// Reads a checkpoint's data sections straight into pinned buffers (no intermediate copy) with several
/// readers working on fixed-size chunks of all files at once.
/// </summary>
public static class CheckpointLoader
{
    public const int DefaultChunkBytes = 16 << 20;

    /// <summary>Loads into buffers from <paramref name="pool"/>, which get back to it when the result is disposed.</summary>
    public static LoadedCheckpoint Load(Checkpoint checkpoint, PinnedBufferPool pool,
        IProgress<LoadProgress>? progress = null, int readers = 0, int chunkBytes = DefaultChunkBytes) =>
        Load(checkpoint, pool.Rent, progress, readers, chunkBytes, pool.Return);

    /// <param name="allocate">Makes the pinned buffer (of at least the given size) for one file's data, e.g. <see cref="PinnedBuffer.Allocate"/>.</param>
    /// <param name="progress">Told after every chunk.</param>
    /// <param name="readers">Concurrent reads; 0 for one per core, at least 4.</param>
    /// <param name="release">What happens to a buffer when the result is disposed, or when the load fails; Dispose by default.</param>
    public static LoadedCheckpoint Load(Checkpoint checkpoint, Func<long, PinnedBuffer> allocate,
        IProgress<LoadProgress>? progress = null, int readers = 0, int chunkBytes = DefaultChunkBytes, Action<PinnedBuffer>? release = null)
    {
        release ??= buffer => buffer.Dispose();
        var clock = Stopwatch.StartNew();
        var buffers = new PinnedBuffer?[checkpoint.Files.Count];
        var handles = new SafeFileHandle[checkpoint.Files.Count];
        try
        {
            var chunks = new List<(int File, long Offset, int Length)>();
            for (int f = 0; f < checkpoint.Files.Count; f++)
            {
                SafetensorsFile file = checkpoint.Files[f];
                handles[f] = File.OpenHandle(file.Path, FileMode.Open, FileAccess.Read, FileShare.Read, FileOptions.SequentialScan);
                if (RandomAccess.GetLength(handles[f]) != file.DataStart + file.DataLength)
                    throw new IOException($"{file.Path}: the file changed size since its header was read");
                if (file.DataLength > 0)
                    buffers[f] = allocate(file.DataLength);
                for (long offset = 0; offset < file.DataLength; offset += chunkBytes)
                    chunks.Add((f, offset, (int)Math.Min(chunkBytes, file.DataLength - offset)));
            }

            long total = checkpoint.Files.Sum(f => f.DataLength), done = 0;
            var options = new ParallelOptions { MaxDegreeOfParallelism = readers > 0 ? readers : Math.Max(4, Environment.ProcessorCount) };
            try
            {
                Parallel.ForEach(chunks, options, chunk =>
            {
                SafetensorsFile file = checkpoint.Files[chunk.File];
                Span<byte> target = buffers[chunk.File]!.GetSpan(chunk.Offset, chunk.Length);
                long position = file.DataStart + chunk.Offset;
                while (!target.IsEmpty)
                {
                    int read = RandomAccess.Read(handles[chunk.File], target, position);
                    if (read == 0)
                        throw new IOException($"{file.Path}: the file ended at byte {position} while loading it");
                    target = target[read..];
                    position += read;
                }
                long now = Interlocked.Add(ref done, chunk.Length);
                progress?.Report(new LoadProgress(now, total, clock.Elapsed));
                });
            }
            catch (AggregateException e)
            {
                System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(e.InnerExceptions[0]);
            }
            return new LoadedCheckpoint(checkpoint, buffers, clock.Elapsed, release);
        }
        catch
        {
            foreach (PinnedBuffer? buffer in buffers)
                if (buffer is not null)
                    release(buffer);
            throw;
        }
        finally
        {
            foreach (SafeFileHandle? handle in handles)
                handle?.Dispose();
        }
    }
}

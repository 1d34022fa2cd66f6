using System.Text;
using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Versions;

/// <summary>Where a weight set's staging buffers live.</summary>
internal enum StagingPlace
{
    /// <summary>Files in the staging directory, page-locked for the GPU: they survive a restart of the agent.</summary>
    HostFiles,

    /// <summary>Device memory: copies run at device speed, but a restart of the agent loses them.</summary>
    Device,
}

/// <summary>
/// One staging buffer: a file in the staging directory (a tmpfs such as /run or /dev/shm), mapped into the agent
/// and into the backend's address space, or device memory. Files outlive the agent's process, so after a crash or
/// restart the versions they hold can be checked against their manifests and used again (rollback, new consumers,
/// copy-in); device memory does not.
/// </summary>
internal sealed class StagingBuffer : IDisposable
{
    private readonly SharedRegion? _region;

    private StagingBuffer(string path, SharedRegion? region, IDeviceBuffer buffer)
    {
        Path = path;
        _region = region;
        Buffer = buffer;
    }

    /// <summary>The file (or, in device memory, a name that shows in messages).</summary>
    public string Path { get; }

    public string FileName => System.IO.Path.GetFileName(Path);

    public long Length => Buffer.Length;

    public IDeviceBuffer Buffer { get; }

    public StagingPlace Place => _region is null ? StagingPlace.Device : StagingPlace.HostFiles;

    public string ManifestPath => Path + ".manifest";

    /// <summary>A new buffer of <paramref name="length"/> bytes in device memory, known as <paramref name="name"/>.</summary>
    public static StagingBuffer Allocate(string name, long length, IBackend backend) =>
        new(name, null, backend.Allocate(Math.Max(length, 4096)));

    /// <summary>A new file of <paramref name="length"/> bytes (at least one page, so that empty weight sets map too).</summary>
    public static StagingBuffer Create(string path, long length, IBackend backend)
    {
        var region = SharedRegion.Create(path, Math.Max(length, 4096));
        return Wrap(path, region, backend);
    }

    /// <summary>
    /// Whether staging files in <paramref name="directory"/> can be mapped for <paramref name="backend"/> (on CUDA:
    /// page-locked with cuMemHostRegister, which the driver refuses for files on disk), tried with a one-page file made
    /// and removed again: null if they can, else what is wrong and what to do.
    /// </summary>
    public static string? Probe(string directory, IBackend backend)
    {
        string path = System.IO.Path.Combine(directory, $".probe-{Environment.ProcessId}");
        try
        {
            using StagingBuffer probe = Create(path, 4096, backend);
            return null;
        }
        catch (Exception e) when (e is not OutOfMemoryException) // a probe reports; it never stops the agent's start
        {
            return Unmappable(directory, backend, e);
        }
        finally
        {
            try
            {
                File.Delete(path);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // Not made, or not ours to remove: nothing to undo.
            }
        }
    }

    /// <summary>Why a staging file in <paramref name="directory"/> could not be mapped, and what to do.</summary>
    private static string Unmappable(string directory, IBackend backend, Exception e) =>
        $"staging directory '{directory}' cannot hold staging files for {backend.Description}: {e.Message}. " +
        "Staging files must be page-locked for the GPU, which works for a memory filesystem (tmpfs, as /dev/shm and /run are) " +
        "and not for files on disk: set NCCL_SWAP_Agent__StagingDirectory to a directory on tmpfs";

    /// <summary>An existing file, as a previous life of the agent left it.</summary>
    public static StagingBuffer Open(string path, IBackend backend) => Wrap(path, SharedRegion.Open(path), backend);

    private static unsafe StagingBuffer Wrap(string path, SharedRegion region, IBackend backend)
    {
        try
        {
            return new StagingBuffer(path, region, backend.MapHost((nint)region.Pointer, region.Length, readOnly: false, $"staging {System.IO.Path.GetFileName(path)}"));
        }
        catch
        {
            region.Dispose();
            throw;
        }
    }

    /// <summary>Records which version the file holds (its canonical manifest), replacing the file atomically.</summary>
    public void WriteManifest(Manifest manifest)
    {
        if (Place == StagingPlace.Device)
            return; // nothing to find again after a restart
        string partial = ManifestPath + ".partial";
        File.WriteAllBytes(partial, manifest.CanonicalBytes.ToArray());
        File.Move(partial, ManifestPath, overwrite: true);
    }

    public Manifest ReadManifest() => Manifest.Parse(File.ReadAllBytes(ManifestPath));

    public void Dispose()
    {
        Buffer.Dispose();
        _region?.Dispose();
    }

    /// <summary>Disposes the buffer and removes its files.</summary>
    public void Delete()
    {
        Dispose();
        if (Place == StagingPlace.Device)
            return;
        File.Delete(Path);
        File.Delete(ManifestPath);
    }
}

/// <summary>
/// One version's bytes in a staging buffer, packed in manifest order (<see cref="RegionLayout.Packed(Manifest)"/>),
/// with the manifest taken from the publisher's bytes. Reference-counted: whoever may still read it (the active and
/// last good slots, an update in flight, a consumer's copy-in) holds a reference, and the buffer is reused only
/// when the last one is released.
/// </summary>
internal sealed class StagedVersion
{
    private readonly StagingPool _pool;
    private readonly ManualResetEventSlim _settled;
    private int _references = 1;
    private volatile bool _usable;

    /// <param name="filled">False when the bytes are still being copied in (from a flip consumer's slot, after the
    /// version was activated there): readers wait for <see cref="Filled"/>.</param>
    public StagedVersion(ulong version, Manifest manifest, StagingBuffer buffer, StagingPool pool, bool filled = true)
    {
        Version = version;
        Manifest = manifest;
        Layout = RegionLayout.Packed(manifest);
        Buffer = buffer;
        _pool = pool;
        _usable = filled;
        _settled = new ManualResetEventSlim(filled);
    }

    /// <summary>The bytes are in place and checked (<paramref name="usable"/>), or could not be made.</summary>
    public void Filled(bool usable)
    {
        _usable = usable;
        _settled.Set();
    }

    /// <summary>Waits up to <paramref name="timeout"/> for the bytes; false if they could not be made or are not there yet.</summary>
    public bool WaitFilled(TimeSpan timeout) => _settled.Wait(timeout) && _usable;

    public ulong Version { get; }

    public Manifest Manifest { get; }

    public RegionLayout Layout { get; }

    public StagingBuffer Buffer { get; }

    public StagedVersion AddReference()
    {
        if (Interlocked.Increment(ref _references) <= 1)
            throw new InvalidOperationException($"version {Version}'s staging was already released");
        return this;
    }

    public void Release()
    {
        int left = Interlocked.Decrement(ref _references);
        if (left == 0)
            _pool.Return(Buffer);
        else if (left < 0)
            throw new InvalidOperationException($"version {Version}'s staging was released once too often");
    }

    public override string ToString() => $"version {Version} in {Buffer.FileName}";
}

/// <summary>
/// The staging buffers of one weight set: files named <c>PREFIX.N</c> in the staging directory, reused rather than
/// made anew (a fresh file costs a page fault per page on first touch), with at most <see cref="MaxIdle"/> kept idle.
/// </summary>
internal sealed class StagingPool(string directory, string prefix, IBackend backend) : IDisposable
{
    public const int MaxIdle = 2;

    private readonly Lock _lock = new();
    private readonly List<StagingBuffer> _idle = [];
    private readonly HashSet<StagingBuffer> _lent = [];
    private int _next;

    public string Prefix { get; } = prefix;

    /// <summary>Where new buffers go unless told otherwise; buffers already made stay where they are until returned.</summary>
    public StagingPlace Place { get; set; } = StagingPlace.HostFiles;

    public StagingBuffer Acquire(long length, StagingPlace? where = null)
    {
        StagingPlace place = where ?? Place;
        lock (_lock)
        {
            long size = Math.Max(length, 4096);
            StagingBuffer? buffer = _idle.FirstOrDefault(b => b.Length == size && b.Place == place);
            if (buffer is not null)
                _idle.Remove(buffer);
            else if (place == StagingPlace.Device)
                buffer = StagingBuffer.Allocate($"{Prefix}.{_next++} (GPU)", length, backend);
            else
            {
                string path;
                do
                    path = Path.Combine(directory, $"{Prefix}.{_next++}");
                while (File.Exists(path));
                buffer = StagingBuffer.Create(path, length, backend);
            }
            _lent.Add(buffer);
            return buffer;
        }
    }

    /// <summary>Takes over a buffer a previous life of the agent left (see <see cref="StagingBuffer.Open"/>).</summary>
    public void Adopt(StagingBuffer buffer)
    {
        lock (_lock)
            _lent.Add(buffer);
    }

    public void Return(StagingBuffer buffer)
    {
        lock (_lock)
        {
            if (!_lent.Remove(buffer))
                return;
            if (buffer.Place == StagingPlace.HostFiles)
                File.Delete(buffer.ManifestPath); // it no longer holds a version that can be trusted
            // Device memory is scarce: one idle buffer there (the next snapshot's), MaxIdle files.
            if (_idle.Count(b => b.Place == buffer.Place) < (buffer.Place == StagingPlace.Device ? 1 : MaxIdle))
                _idle.Add(buffer);
            else
                buffer.Delete();
        }
    }

    /// <summary>A file name for this weight set that no other set's prefix can produce.</summary>
    public static string PrefixFor(int row, string weightSet)
    {
        var safe = new StringBuilder();
        foreach (char c in weightSet)
            safe.Append(char.IsAsciiLetterOrDigit(c) || c is '-' or '_' ? c : '_');
        return $"{row:D3}-{safe}";
    }

    /// <summary>Unmaps every buffer; the files stay (the state may name them for the next life).</summary>
    public void Dispose()
    {
        lock (_lock)
        {
            foreach (StagingBuffer buffer in _idle)
                buffer.Delete();
            foreach (StagingBuffer buffer in _lent)
                buffer.Dispose();
            _idle.Clear();
            _lent.Clear();
        }
    }
}

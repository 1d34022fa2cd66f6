using System.IO.MemoryMappedFiles;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace NcclSwap.ControlPlane;

/// <summary>
/// Shared memory mapped into this process as a raw pointer: a file (under /dev/shm, say), or an anonymous memfd
/// whose descriptor is handed to other processes over the front door's socket.
/// </summary>
internal sealed unsafe class SharedRegion : IDisposable
{
    private readonly MemoryMappedFile _file;
    private readonly MemoryMappedViewAccessor _view;
    private readonly FileStream? _descriptor;
    private int _disposed;

    private SharedRegion(string path, MemoryMappedFile file, MemoryMappedViewAccessor view, long length, bool writable, FileStream? descriptor = null)
    {
        Path = path;
        _file = file;
        _view = view;
        Length = length;
        IsWritable = writable;
        _descriptor = descriptor;
        byte* pointer = null;
        view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
        Pointer = pointer + view.PointerOffset;
    }

    public string Path { get; }

    public byte* Pointer { get; }

    public long Length { get; }

    public bool IsWritable { get; }

    /// <summary>The memfd behind an anonymous region (valid while the region is), to pass to another process.</summary>
    public int Descriptor => _descriptor is null
        ? throw new InvalidOperationException($"{Path} is a file, not an anonymous region")
        : (int)_descriptor.SafeFileHandle.DangerousGetHandle();

    /// <summary>
    /// An anonymous region of <paramref name="length"/> zero bytes (memfd_create), named for /proc listings. With
    /// <paramref name="sealed"/> its size is sealed (it can neither shrink nor grow), which the agent requires of
    /// any region it maps from a client.
    /// </summary>
    public static SharedRegion CreateAnonymous(string name, long length, bool @sealed = false)
    {
        int fd = Interop.Sys.MemfdCreate(name, Interop.Sys.MfdCloexec | (@sealed ? Interop.Sys.MfdAllowSealing : 0));
        if (fd < 0)
            throw new IOException($"memfd_create({name}) failed (errno {Marshal.GetLastPInvokeError()})");
        var stream = new FileStream(new SafeFileHandle(fd, ownsHandle: true), FileAccess.ReadWrite, bufferSize: 0);
        try
        {
            if (Interop.Sys.Ftruncate(fd, length) != 0)
                throw new IOException($"ftruncate({name}, {length}) failed (errno {Marshal.GetLastPInvokeError()})");
            if (@sealed && Interop.Sys.Fcntl(fd, Interop.Sys.FAddSeals, Interop.Sys.FSealShrink | Interop.Sys.FSealGrow) != 0)
                throw new IOException($"sealing {name} failed (errno {Marshal.GetLastPInvokeError()})");
            var file = MemoryMappedFile.CreateFromFile(stream, null, length, MemoryMappedFileAccess.ReadWrite, HandleInheritability.None, leaveOpen: true);
            return new SharedRegion($"memfd:{name}", file, file.CreateViewAccessor(0, length, MemoryMappedFileAccess.ReadWrite), length, writable: true, stream);
        }
        catch
        {
            stream.Dispose();
            throw;
        }
    }

    /// <summary>Whether the region behind <paramref name="fd"/> is sealed against shrinking (F_SEAL_SHRINK).</summary>
    public static bool IsSealedAgainstShrinking(int fd)
    {
        int seals = Interop.Sys.Fcntl(fd, Interop.Sys.FGetSeals, 0);
        return seals >= 0 && (seals & Interop.Sys.FSealShrink) != 0;
    }

    /// <summary>Maps a descriptor received from another process (this region takes ownership of it).</summary>
    public static SharedRegion FromDescriptor(int fd, string name, bool writable)
    {
        var stream = new FileStream(new SafeFileHandle(fd, ownsHandle: true), writable ? FileAccess.ReadWrite : FileAccess.Read, bufferSize: 0);
        try
        {
            long length = stream.Length;
            var access = writable ? MemoryMappedFileAccess.ReadWrite : MemoryMappedFileAccess.Read;
            var file = MemoryMappedFile.CreateFromFile(stream, null, 0, access, HandleInheritability.None, leaveOpen: true);
            return new SharedRegion(name, file, file.CreateViewAccessor(0, 0, access), length, writable, stream);
        }
        catch
        {
            stream.Dispose();
            throw;
        }
    }

    /// <summary>Creates (or truncates) the file at <paramref name="length"/> zero bytes and maps it.</summary>
    public static SharedRegion Create(string path, long length)
    {
        using (var stream = new FileStream(path, FileMode.Create, FileAccess.ReadWrite, FileShare.ReadWrite))
            stream.SetLength(length);
        return Map(path, length);
    }

    /// <summary>Maps an existing file whole.</summary>
    public static SharedRegion Open(string path) => Map(path, new FileInfo(path).Length);

    /// <summary>
    /// Maps an existing region of the ABI and checks what every such region starts with (an 8-byte magic, then
    /// the 4-byte ABI version), then the rest with <paramref name="validate"/> (null when fine, else what is wrong).
    /// </summary>
    public static SharedRegion Open(string path, int headerBytes, ulong magic, string what, Func<SharedRegion, string?> validate) =>
        Check(Open(path), headerBytes, magic, what, validate);

    /// <summary>The checks of <see cref="Open(string, int, ulong, string, Func{SharedRegion, string?})"/> on a region already mapped; disposes it if they fail.</summary>
    public static SharedRegion Check(SharedRegion region, int headerBytes, ulong magic, string what, Func<SharedRegion, string?> validate)
    {
        string path = region.Path;
        try
        {
            if (region.Length < headerBytes)
                throw new InvalidDataException($"{path}: {region.Length} bytes is too small for {what} header ({headerBytes})");
            ulong found = Volatile.Read(ref *(ulong*)region.Pointer);
            if (found != magic)
                throw new InvalidDataException($"{path}: not an nccl-swap {what} (magic 0x{found:x16})");
            uint version = *(uint*)(region.Pointer + 8);
            if (version != Abi.AbiConstants.AbiVersion)
                throw new InvalidDataException($"{path}: ABI version {version}, this build speaks {Abi.AbiConstants.AbiVersion}");
            if (validate(region) is { } problem)
                throw new InvalidDataException($"{path}: {problem}");
            return region;
        }
        catch
        {
            region.Dispose();
            throw;
        }
    }

    private static SharedRegion Map(string path, long length)
    {
        var stream = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
        var file = MemoryMappedFile.CreateFromFile(stream, null, 0, MemoryMappedFileAccess.ReadWrite, HandleInheritability.None, leaveOpen: false);
        return new SharedRegion(path, file, file.CreateViewAccessor(0, 0, MemoryMappedFileAccess.ReadWrite), length, writable: true);
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _file.Dispose();
        _descriptor?.Dispose();
    }
}

using System.IO.MemoryMappedFiles;

namespace NcclSwap.ControlPlane;

/// <summary>A file (normally under /dev/shm) mapped shared and read-write into this process, as a raw pointer.</summary>
internal sealed unsafe class SharedRegion : IDisposable
{
    private readonly MemoryMappedFile _file;
    private readonly MemoryMappedViewAccessor _view;
    private int _disposed;

    private SharedRegion(string path, MemoryMappedFile file, MemoryMappedViewAccessor view, long length)
    {
        Path = path;
        _file = file;
        _view = view;
        Length = length;
        byte* pointer = null;
        view.SafeMemoryMappedViewHandle.AcquirePointer(ref pointer);
        Pointer = pointer + view.PointerOffset;
    }

    public string Path { get; }

    public byte* Pointer { get; }

    public long Length { get; }

    /// <summary>Creates (or truncates) the file at <paramref name="length"/> zero bytes and maps it.</summary>
    public static SharedRegion Create(string path, long length)
    {
        using (var stream = new FileStream(path, FileMode.Create, FileAccess.ReadWrite, FileShare.ReadWrite))
            stream.SetLength(length);
        return Map(path, length);
    }

    /// <summary>Maps an existing file whole.</summary>
    public static SharedRegion Open(string path) => Map(path, new FileInfo(path).Length);

    private static SharedRegion Map(string path, long length)
    {
        var stream = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
        var file = MemoryMappedFile.CreateFromFile(stream, null, 0, MemoryMappedFileAccess.ReadWrite, HandleInheritability.None, leaveOpen: false);
        return new SharedRegion(path, file, file.CreateViewAccessor(0, 0, MemoryMappedFileAccess.ReadWrite), length);
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        _view.SafeMemoryMappedViewHandle.ReleasePointer();
        _view.Dispose();
        _file.Dispose();
    }
}

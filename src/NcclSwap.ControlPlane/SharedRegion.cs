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

    /// <summary>
    /// Maps an existing region of the ABI and checks what every such region starts with (an 8-byte magic, then
    /// the 4-byte ABI version), then the rest with <paramref name="validate"/> (null when fine, else what is wrong).
    /// </summary>
    public static SharedRegion Open(string path, int headerBytes, ulong magic, string what, Func<SharedRegion, string?> validate)
    {
        SharedRegion region = Open(path);
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

namespace NcclSwap.Cuda;

/// <summary>
/// Device memory of another process, opened from its <see cref="CuIpcMemHandle"/>. The driver maps a
/// handle once per context, so openings are reference-counted here: every <see cref="Open"/> returns its
/// own mapping object, each is disposed once, and the native mapping is closed when the last one is.
/// </summary>
public sealed class IpcMemoryMapping : GpuOwner
{
    private static readonly Lock s_lock = new();
    private static readonly Dictionary<(nint Context, string Handle), Entry> s_open = [];

    private readonly Entry _entry;

    private IpcMemoryMapping(CudaContext context, Entry entry) : base(ownsHandle: true)
    {
        Context = context;
        _entry = entry;
    }

    public CudaContext Context { get; }

    /// <summary>The base address of the mapped allocation in this process.</summary>
    public ulong Address => _entry.Address;

    /// <summary>The size of the mapped allocation.</summary>
    public long Length => _entry.Length;

    /// <summary>How many open mapping objects share this native mapping.</summary>
    public int References
    {
        get
        {
            lock (s_lock)
                return _entry.References;
        }
    }

    /// <summary>How many distinct native mappings this process holds open.</summary>
    public static int OpenNativeMappings
    {
        get
        {
            lock (s_lock)
                return s_open.Count;
        }
    }

    public static unsafe IpcMemoryMapping Open(CudaContext context, CuIpcMemHandle handle)
    {
        var key = (context.Handle, handle.ToHex());
        lock (s_lock)
        {
            if (!s_open.TryGetValue(key, out Entry? entry))
            {
                context.MakeCurrent();
                ulong address;
                Interop.Cuda.IpcOpenMemHandle(&address, handle, Interop.Cuda.IpcMemLazyEnablePeerAccess).ThrowIfFailed();
                (_, long size) = context.GetAddressRange(address);
                entry = new Entry(key, address, size);
                s_open.Add(key, entry);
            }
            entry.References++;
            return new IpcMemoryMapping(context, entry);
        }
    }

    /// <summary>A non-owning device buffer over <paramref name="length"/> bytes at <paramref name="offset"/> of the mapping.</summary>
    public DeviceBuffer View(long offset, long length)
    {
        ThrowIfDisposed();
        ThrowHelper.CheckRange(offset, length, Length, ToString());
        return DeviceBuffer.Borrow(Context, Address + (ulong)offset, length);
    }

    private protected override void Release()
    {
        lock (s_lock)
        {
            if (--_entry.References > 0)
                return;
            s_open.Remove(_entry.Key);
        }
        Context.MakeCurrent();
        Interop.Cuda.IpcCloseMemHandle(_entry.Address).ThrowIfFailed();
    }

    public override string ToString() => $"IPC mapping of {Length} bytes at 0x{Address:x} on {Context.Device}";

    private sealed class Entry((nint, string) key, ulong address, long length)
    {
        public (nint, string) Key { get; } = key;
        public ulong Address { get; } = address;
        public long Length { get; } = length;
        public int References { get; set; }
    }
}

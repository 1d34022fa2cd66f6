using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

/// <summary>How a <see cref="PinnedBuffer"/>'s memory was obtained.</summary>
public enum PinnedKind
{
    /// <summary>Page-locked memory allocated by the driver (<c>cuMemHostAlloc</c>, portable to all contexts).</summary>
    DriverAllocated,

    /// <summary>Memory owned elsewhere, page-locked by <c>cuMemHostRegister</c> and unregistered on Dispose.</summary>
    Registered,

    /// <summary>Page-aligned ordinary memory, for the host backend where there is no GPU to pin for.</summary>
    Pageable,
}

/// <summary>Host memory that GPU copies can read and write asynchronously, exposed as spans.</summary>
public sealed unsafe class PinnedBuffer : GpuOwner
{
    private const int PageSize = 4096;
    private readonly CudaContext? _context;

    private PinnedBuffer(CudaContext? context, nint pointer, long length, PinnedKind kind) : base(ownsHandle: true)
    {
        _context = context;
        Pointer = pointer;
        Length = length;
        Kind = kind;
    }

    public nint Pointer { get; }

    public long Length { get; }

    public PinnedKind Kind { get; }

    /// <summary>Page-locked memory from the driver.</summary>
    public static PinnedBuffer Allocate(CudaContext context, long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        context.MakeCurrent();
        void* pointer;
        Interop.Cuda.MemHostAlloc(&pointer, checked((nuint)length), Interop.Cuda.MemHostAllocPortable).ThrowIfFailed();
        return new PinnedBuffer(context, (nint)pointer, length, PinnedKind.DriverAllocated);
    }

    /// <summary>Page-locks <paramref name="length"/> bytes the caller owns at <paramref name="pointer"/>; Dispose unlocks them and frees nothing.</summary>
    public static PinnedBuffer Register(CudaContext context, nint pointer, long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        context.MakeCurrent();
        Interop.Cuda.MemHostRegister((void*)pointer, checked((nuint)length), Interop.Cuda.MemHostRegisterPortable).ThrowIfFailed();
        return new PinnedBuffer(context, pointer, length, PinnedKind.Registered);
    }

    /// <summary>Page-aligned ordinary memory (the host backend's stand-in for pinned memory).</summary>
    public static PinnedBuffer AllocatePageable(long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        void* pointer = NativeMemory.AlignedAlloc(checked((nuint)length), PageSize);
        return new PinnedBuffer(null, (nint)pointer, length, PinnedKind.Pageable);
    }

    /// <summary>The whole buffer as a span; buffers of 2 GiB and more must use <see cref="GetSpan"/>.</summary>
    public Span<byte> Span => GetSpan(0, checked((int)Length));

    public Span<byte> GetSpan(long offset, int length)
    {
        ThrowIfDisposed();
        ThrowHelper.CheckRange(offset, length, Length, ToString());
        return new Span<byte>((byte*)Pointer + offset, length);
    }

    private protected override void Release()
    {
        switch (Kind)
        {
            case PinnedKind.DriverAllocated:
                _context!.MakeCurrent();
                Interop.Cuda.MemFreeHost((void*)Pointer).ThrowIfFailed();
                break;
            case PinnedKind.Registered:
                _context!.MakeCurrent();
                Interop.Cuda.MemHostUnregister((void*)Pointer).ThrowIfFailed();
                break;
            default:
                NativeMemory.AlignedFree((void*)Pointer);
                break;
        }
    }

    public override string ToString() => $"{Kind} host buffer of {Length} bytes at 0x{Pointer:x}";
}

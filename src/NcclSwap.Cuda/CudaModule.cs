using System.Runtime.InteropServices;
using System.Text;

namespace NcclSwap.Cuda;

/// <summary>A module of kernels loaded from PTX text, JIT-compiled by the driver for the device.</summary>
public sealed class CudaModule : GpuOwner
{
    private CudaModule(CudaContext context, nint handle) : base(ownsHandle: true)
    {
        Context = context;
        Handle = handle;
    }

    public CudaContext Context { get; }

    internal nint Handle { get; }

    public static unsafe CudaModule LoadPtx(CudaContext context, string ptx)
    {
        byte[] image = Encoding.UTF8.GetBytes(ptx + "\0");
        context.MakeCurrent();
        nint handle;
        fixed (byte* p = image)
            Interop.Cuda.ModuleLoadData(&handle, p).ThrowIfFailed();
        return new CudaModule(context, handle);
    }

    public unsafe CudaKernel GetKernel(string name)
    {
        ThrowIfDisposed();
        Context.MakeCurrent();
        byte[] utf8 = Encoding.UTF8.GetBytes(name + "\0");
        nint function;
        fixed (byte* p = utf8)
            Interop.Cuda.ModuleGetFunction(&function, Handle, p).ThrowIfFailed();
        return new CudaKernel(this, function, name);
    }

    private protected override void Release()
    {
        Context.MakeCurrent();
        Interop.Cuda.ModuleUnload(Handle).ThrowIfFailed();
    }

    public override string ToString() => $"module 0x{Handle:x} on {Context.Device}";
}

/// <summary>A kernel of a loaded <see cref="CudaModule"/>; valid while the module is.</summary>
public sealed class CudaKernel
{
    private readonly CudaModule _module;
    private readonly nint _function;

    internal CudaKernel(CudaModule module, nint function, string name)
    {
        _module = module;
        _function = function;
        Name = name;
    }

    public string Name { get; }

    /// <summary>
    /// Launches a 1-D grid. <paramref name="arguments"/> is the kernel's parameters packed in order, each at
    /// its natural alignment (see <see cref="KernelArguments"/>).
    /// </summary>
    public unsafe void Launch(uint gridSize, uint blockSize, CudaStream stream, KernelArguments arguments, uint sharedMemoryBytes = 0)
    {
        _module.ThrowIfDisposed();
        _module.Context.MakeCurrent();
        int count = arguments.Count;
        void** pointers = stackalloc void*[Math.Max(count, 1)];
        fixed (byte* values = arguments.Bytes)
        {
            for (int i = 0; i < count; i++)
                pointers[i] = values + arguments.Offset(i);
            Interop.Cuda.LaunchKernel(_function, gridSize, 1, 1, blockSize, 1, 1, sharedMemoryBytes, stream.Handle, pointers, null)
                .ThrowIfFailed();
        }
    }

    public override string ToString() => $"kernel {Name}";
}

/// <summary>Kernel parameter values, packed for <c>cuLaunchKernel</c>.</summary>
public sealed class KernelArguments
{
    private readonly List<int> _offsets = [];
    private byte[] _bytes = new byte[64];
    private int _length;

    internal int Count => _offsets.Count;

    internal ReadOnlySpan<byte> Bytes => _bytes;

    internal int Offset(int index) => _offsets[index];

    /// <summary>A scalar or pointer, aligned to its size.</summary>
    public unsafe KernelArguments Add<T>(T value) where T : unmanaged => Add(in value, sizeof(T));

    /// <summary>
    /// A struct passed by value, at <paramref name="alignment"/> (its C alignment). Parameters may total 32764 bytes
    /// on CUDA 12.1 and later (Volta and later GPUs); the driver copies them at launch, so the struct may change after.
    /// </summary>
    public unsafe KernelArguments Add<T>(in T value, int alignment) where T : unmanaged
    {
        int size = sizeof(T);
        int offset = (_length + alignment - 1) / alignment * alignment;
        if (offset + size > _bytes.Length)
            Array.Resize(ref _bytes, Math.Max(_bytes.Length * 2, offset + size));
        MemoryMarshal.Write(_bytes.AsSpan(offset), in value);
        _offsets.Add(offset);
        _length = offset + size;
        return this;
    }
}

using System.Diagnostics.CodeAnalysis;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

/// <summary>A CUDA driver call failed. The message holds the native name and text and the failing call.</summary>
public sealed class CudaException : Exception
{
    public CudaException(CuResult result, string errorName, string errorText, string call)
        : base($"{errorName} ({(int)result}): {errorText}; in {call}")
    {
        Result = result;
        ErrorName = errorName;
        Call = call;
    }

    public CuResult Result { get; }

    /// <summary>The driver's name of the error, e.g. <c>CUDA_ERROR_INVALID_VALUE</c>.</summary>
    public string ErrorName { get; }

    /// <summary>The call expression that failed.</summary>
    public string Call { get; }
}

/// <summary>An NCCL call failed. The message holds the native name, NCCL's text, its last error and the failing call.</summary>
public sealed class NcclException : Exception
{
    public NcclException(NcclResult result, string errorText, string? lastError, string call)
        : base($"nccl{result} ({(int)result}): {errorText}"
               + (string.IsNullOrWhiteSpace(lastError) ? "" : $"; last error: {lastError.Trim()}")
               + $"; in {call}")
    {
        Result = result;
        LastError = lastError;
        Call = call;
    }

    public NcclResult Result { get; }

    /// <summary>NCCL's own description of what went wrong (<c>ncclGetLastError</c>), when it has one.</summary>
    public string? LastError { get; }

    public string Call { get; }
}

/// <summary>The CUDA driver or NCCL cannot be used on this machine; the message says why and how to fix it.</summary>
public sealed class GpuUnavailableException(string message) : Exception(message);

internal static class NativeResult
{
    /// <summary>Throws a <see cref="CudaException"/> naming <paramref name="call"/> unless the driver call succeeded.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static void ThrowIfFailed(this CuResult result, [CallerArgumentExpression(nameof(result))] string? call = null)
    {
        if (result != CuResult.Success)
            ThrowCuda(result, call);
    }

    /// <summary>
    /// Throws an <see cref="NcclException"/> naming <paramref name="call"/> unless NCCL succeeded. On a
    /// non-blocking communicator <see cref="NcclResult.InProgress"/> is success for an enqueue; pass
    /// <paramref name="allowInProgress"/> there. <paramref name="comm"/> selects whose last error to report.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static void ThrowIfFailed(this NcclResult result, nint comm = 0, bool allowInProgress = false,
        [CallerArgumentExpression(nameof(result))] string? call = null)
    {
        if (result != NcclResult.Success && !(allowInProgress && result == NcclResult.InProgress))
            ThrowNccl(result, comm, call);
    }

    internal static unsafe string CudaErrorName(CuResult result)
    {
        byte* name = null;
        return Interop.Cuda.GetErrorName(result, &name) == CuResult.Success && name != null
            ? Marshal.PtrToStringUTF8((nint)name)!
            : $"CUresult {(int)result}";
    }

    internal static unsafe string CudaErrorText(CuResult result)
    {
        byte* text = null;
        return Interop.Cuda.GetErrorString(result, &text) == CuResult.Success && text != null
            ? Marshal.PtrToStringUTF8((nint)text)!
            : "unrecognized error code";
    }

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowCuda(CuResult result, string? call) =>
        throw new CudaException(result, CudaErrorName(result), CudaErrorText(result), call ?? "?");

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    private static void ThrowNccl(NcclResult result, nint comm, string? call)
    {
        string text = Marshal.PtrToStringUTF8(Interop.Nccl.GetErrorString(result)) ?? "unknown NCCL error";
        string? last = Marshal.PtrToStringUTF8(Interop.Nccl.GetLastError(comm));
        throw new NcclException(result, text, last, call ?? "?");
    }
}

internal static class ThrowHelper
{
    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    internal static void ObjectDisposed(object owner) => throw new ObjectDisposedException(owner.ToString());

    [DoesNotReturn, MethodImpl(MethodImplOptions.NoInlining)]
    internal static void OutOfRange(string what, long offset, long length, long capacity) =>
        throw new ArgumentOutOfRangeException(what, $"{what}: range [{offset}, {offset}+{length}) does not fit in {capacity} bytes.");

    /// <summary>Checks that [offset, offset+length) lies inside [0, capacity), with overflow-safe arithmetic.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static void CheckRange(long offset, long length, long capacity, string what)
    {
        if (offset < 0 || length < 0 || offset > capacity || length > capacity - offset)
            OutOfRange(what, offset, length, capacity);
    }
}

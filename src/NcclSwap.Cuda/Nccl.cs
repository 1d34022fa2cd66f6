using System.Diagnostics;
using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

/// <summary>The NCCL library: probed once.</summary>
public static class NcclLibrary
{
    private static readonly Lazy<string?> s_failure = new(() =>
        NativeLibraries.Nccl.IsLoaded ? null : "NCCL is not available: " + NativeLibraries.Nccl.Failure);

    public static bool IsSupported => s_failure.Value is null;

    public static string? UnsupportedReason => s_failure.Value;

    public static void EnsureSupported()
    {
        if (s_failure.Value is { } reason)
            throw new GpuUnavailableException(reason);
    }

    /// <summary>NCCL's version code, e.g. 22803.</summary>
    public static unsafe int VersionCode
    {
        get
        {
            EnsureSupported();
            int version;
            Interop.Nccl.GetVersion(&version).ThrowIfFailed();
            return version;
        }
    }

    /// <summary>The version as major.minor.patch.</summary>
    public static string Version
    {
        get
        {
            int code = VersionCode;
            return code >= 10000 ? $"{code / 10000}.{code / 100 % 100}.{code % 100}" : $"{code / 1000}.{code / 100 % 10}.{code % 100}";
        }
    }

    /// <summary>A new unique id; the root rank makes it and every rank passes it to <see cref="NcclCommunicator.InitRank"/>.</summary>
    public static unsafe NcclUniqueId CreateUniqueId()
    {
        EnsureSupported();
        NcclUniqueId id;
        Interop.Nccl.GetUniqueId(&id).ThrowIfFailed();
        return id;
    }
}

/// <summary>
/// One rank's NCCL communicator. Collectives enqueue on a stream and return. A non-blocking communicator
/// (<c>blocking: false</c>) never blocks the host inside NCCL; its state is polled with
/// <see cref="GetAsyncError"/>, and every wait for it has a deadline.
/// </summary>
public sealed unsafe class NcclCommunicator : GpuOwner
{
    // NCCL's asynchronous init and split write the new ncclComm_t through the caller's pointer when
    // their background job ends, after the call has returned. So the handle lives in a native slot that
    // this object owns, never on a stack.
    private readonly nint* _slot;

    private NcclCommunicator(CudaContext context, nint* slot, bool blocking) : base(ownsHandle: true)
    {
        Context = context;
        _slot = slot;
        IsBlocking = blocking;
    }

    private nint Comm => Volatile.Read(ref *_slot);

    private static nint* NewSlot() => (nint*)NativeMemory.AllocZeroed((nuint)sizeof(nint));

    public CudaContext Context { get; }

    public bool IsBlocking { get; }

    /// <summary>
    /// Joins communicator <paramref name="id"/> as <paramref name="rank"/> of <paramref name="ranks"/>, on
    /// <paramref name="context"/>'s device. Blocking init waits for every rank; non-blocking init returns
    /// once the communicator is ready or <paramref name="timeout"/> passed (then it is aborted).
    /// </summary>
    public static unsafe NcclCommunicator InitRank(CudaContext context, int ranks, NcclUniqueId id, int rank,
        bool blocking = true, TimeSpan? timeout = null)
    {
        NcclLibrary.EnsureSupported();
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(ranks);
        if ((uint)rank >= (uint)ranks)
            throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} is not in [0, {ranks}).");
        context.MakeCurrent();
        nint* slot = NewSlot();
        Interop.Nccl.Config config = Interop.Nccl.Config.Create(blocking);
        Interop.Nccl.CommInitRankConfig(slot, ranks, id, rank, &config).ThrowIfFailed(allowInProgress: !blocking);
        var communicator = new NcclCommunicator(context, slot, blocking);
        if (!blocking)
            communicator.WaitReady(timeout ?? TimeSpan.FromMinutes(2), $"init of rank {rank} of {ranks}");
        return communicator;
    }

    public unsafe int Rank
    {
        get
        {
            ThrowIfDisposed();
            int rank;
            Interop.Nccl.CommUserRank(Comm, &rank).ThrowIfFailed(Comm);
            return rank;
        }
    }

    public unsafe int Count
    {
        get
        {
            ThrowIfDisposed();
            int count;
            Interop.Nccl.CommCount(Comm, &count).ThrowIfFailed(Comm);
            return count;
        }
    }

    /// <summary>The CUDA device ordinal this rank runs on.</summary>
    public unsafe int Device
    {
        get
        {
            ThrowIfDisposed();
            int device;
            Interop.Nccl.CommCuDevice(Comm, &device).ThrowIfFailed(Comm);
            return device;
        }
    }

    /// <summary>The communicator's asynchronous state: Success, InProgress, or the error that broke it.</summary>
    public unsafe NcclResult GetAsyncError()
    {
        ThrowIfDisposed();
        NcclResult state;
        Interop.Nccl.CommGetAsyncError(Comm, &state).ThrowIfFailed(Comm);
        return state;
    }

    /// <summary>
    /// Polls until the communicator leaves InProgress; aborts it and throws on error or at the deadline. A group of a
    /// non-blocking communicator is usually in progress for some microseconds after it ends, so the first
    /// milliseconds spin (a 1 ms sleep per group would cap a stream of 256 MiB buckets at a fraction of NVLink).
    /// </summary>
    /// <paramref name="giveUp"/>, polled as well, ends the wait early (aborting the communicator) when it returns a reason:
    /// it throws <see cref="OperationCanceledException"/> with it.
    public void WaitReady(TimeSpan timeout, string what, Func<string?>? giveUp = null)
    {
        var clock = Stopwatch.StartNew();
        var spinner = new SpinWait();
        while (true)
        {
            NcclResult state = GetAsyncError();
            if (state == NcclResult.Success)
                return;
            if (giveUp?.Invoke() is { } reason)
            {
                Abort();
                throw new OperationCanceledException($"NCCL {what} ended: {reason}; the communicator was aborted.");
            }
            if (state != NcclResult.InProgress)
            {
                string? last = Marshal.PtrToStringUTF8(Interop.Nccl.GetLastError(Comm));
                Abort();
                throw new NcclException(state, $"{what} failed", last, "ncclCommGetAsyncError");
            }
            if (clock.Elapsed > timeout)
            {
                Abort();
                throw new TimeoutException($"NCCL {what} did not finish within {timeout.TotalSeconds:0.#} s; the communicator was aborted.");
            }
            if (clock.ElapsedTicks < Stopwatch.Frequency / 200)
                spinner.SpinOnce(sleep1Threshold: -1);
            else
                Thread.Sleep(1);
        }
    }

    /// <summary>
    /// Copies <paramref name="bytes"/> from the root's <paramref name="send"/> to every rank's <paramref name="receive"/>
    /// (the same address on the root means in place).
    /// </summary>
    public void Broadcast(ulong send, ulong receive, long bytes, int root, CudaStream stream)
    {
        Bind();
        Interop.Nccl.Broadcast(send, receive, checked((nuint)bytes), NcclDataType.Uint8, root, Comm, stream.Handle)
            .ThrowIfFailed(Comm, allowInProgress: !IsBlocking);
    }

    /// <summary>Gathers <paramref name="bytesPerRank"/> from every rank; rank r's bytes land at r * bytesPerRank of <paramref name="receive"/>.</summary>
    public void AllGather(ulong send, ulong receive, long bytesPerRank, CudaStream stream)
    {
        Bind();
        Interop.Nccl.AllGather(send, receive, checked((nuint)bytesPerRank), NcclDataType.Uint8, Comm, stream.Handle)
            .ThrowIfFailed(Comm, allowInProgress: !IsBlocking);
    }

    public void Send(ulong send, long bytes, int peer, CudaStream stream)
    {
        Bind();
        Interop.Nccl.Send(send, checked((nuint)bytes), NcclDataType.Uint8, peer, Comm, stream.Handle)
            .ThrowIfFailed(Comm, allowInProgress: !IsBlocking);
    }

    public void Receive(ulong receive, long bytes, int peer, CudaStream stream)
    {
        Bind();
        Interop.Nccl.Recv(receive, checked((nuint)bytes), NcclDataType.Uint8, peer, Comm, stream.Handle)
            .ThrowIfFailed(Comm, allowInProgress: !IsBlocking);
    }

    /// <summary>Starts a group: collectives issued until the returned scope ends run together (e.g. paired sends and receives).</summary>
    public static NcclGroup Group()
    {
        NcclLibrary.EnsureSupported();
        Interop.Nccl.GroupStart().ThrowIfFailed();
        return new NcclGroup();
    }

    /// <summary>
    /// Splits the communicator: ranks that pass the same <paramref name="color"/> form a new one, ordered by
    /// <paramref name="key"/>. A negative color leaves this rank out and returns null. The new communicator
    /// inherits this one's configuration.
    /// </summary>
    public unsafe NcclCommunicator? Split(int color, int key, TimeSpan? timeout = null)
    {
        Bind();
        nint* slot = NewSlot();
        Interop.Nccl.CommSplit(Comm, color < 0 ? -1 : color, key, slot, null).ThrowIfFailed(Comm, allowInProgress: !IsBlocking);
        if (!IsBlocking)
            WaitReady(timeout ?? TimeSpan.FromMinutes(2), $"split (color {color}, key {key})"); // the split job runs on this communicator
        if (Volatile.Read(ref *slot) == 0)
        {
            NativeMemory.Free(slot);
            return null;
        }
        var split = new NcclCommunicator(Context, slot, IsBlocking);
        if (!IsBlocking)
            split.WaitReady(timeout ?? TimeSpan.FromMinutes(2), $"split (color {color}, key {key})");
        return split;
    }

    /// <summary>Aborts in-flight operations and frees the communicator; used on errors and timeouts. Idempotent with Dispose.</summary>
    public void Abort()
    {
        if (TryMarkReleased())
        {
            Context.MakeCurrent();
            NcclResult aborted = Interop.Nccl.CommAbort(Comm);
            NativeMemory.Free(_slot);
            aborted.ThrowIfFailed();
        }
    }

    private void Bind()
    {
        ThrowIfDisposed();
        Context.MakeCurrent();
    }

    private protected override void Release()
    {
        Context.MakeCurrent();
        NcclResult destroyed = Interop.Nccl.CommDestroy(Comm);
        if (destroyed != NcclResult.Success && destroyed != NcclResult.InProgress)
            destroyed = Interop.Nccl.CommAbort(Comm);
        NativeMemory.Free(_slot);
        destroyed.ThrowIfFailed(allowInProgress: true);
    }

    public override string ToString() => $"NCCL communicator on {Context.Device}";
}

/// <summary>The scope of an NCCL group (<c>ncclGroupStart</c> … <c>ncclGroupEnd</c>).</summary>
public struct NcclGroup : IDisposable
{
    private bool _ended;

    public void Dispose()
    {
        if (_ended)
            return;
        _ended = true;
        Interop.Nccl.GroupEnd().ThrowIfFailed(allowInProgress: true);
    }
}

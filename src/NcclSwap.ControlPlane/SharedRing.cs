using System.Diagnostics;
using System.Numerics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane;

/// <summary>
/// A single-producer single-consumer ring of fixed-size entries in shared memory (<c>nccl_swap_ring_header</c>).
/// The producer writes an entry, then release-stores the head; the consumer acquire-loads the head, copies the
/// entry out, then release-stores the tail. A side with nothing to do spins briefly, then sleeps on the futex
/// doorbell, which the other side rings after every step.
/// </summary>
public sealed unsafe class SharedRing : IDisposable
{
    private const int SpinIterations = 64;
    private readonly SharedRegion _region;

    private SharedRing(SharedRegion region) => _region = region;

    public string Path => _region.Path;

    public int Capacity => (int)Header->Capacity;

    public int EntryBytes => (int)Header->EntryBytes;

    /// <summary>How many sides announced that they sleep until the other side acts (the agent's dispatcher does, on request rings).</summary>
    public int Sleepers => (int)Volatile.Read(ref Header->Sleepers);

    /// <summary>Announces a sleep (on a bell, say) before the last look at the ring; <see cref="EndSleep"/> after.</summary>
    public void AnnounceSleep() => Interlocked.Increment(ref Header->Sleepers);

    public void EndSleep() => Interlocked.Decrement(ref Header->Sleepers);

    /// <summary>Entries written and not yet read.</summary>
    public int Count => (int)(Volatile.Read(ref Header->Head) - Volatile.Read(ref Header->Tail));

    private RingHeader* Header => (RingHeader*)_region.Pointer;

    private byte* Slot(uint index) => _region.Pointer + sizeof(RingHeader) + (long)(index & (Header->Capacity - 1)) * Header->EntryBytes;

    public static SharedRing Create(string path, int capacity, int entryBytes) =>
        Initialize(length => SharedRegion.Create(path, length), capacity, entryBytes);

    /// <summary>A ring in an anonymous memfd, to hand to a client over the front door (<see cref="Descriptor"/>).</summary>
    public static SharedRing CreateAnonymous(string name, int capacity, int entryBytes) =>
        Initialize(length => SharedRegion.CreateAnonymous(name, length), capacity, entryBytes);

    /// <summary>A ring whose descriptor came over the front door (takes ownership of it).</summary>
    public static SharedRing FromDescriptor(int fd, string name) => Checked(SharedRegion.FromDescriptor(fd, name, writable: true));

    /// <summary>The memfd of a ring made by <see cref="CreateAnonymous"/>.</summary>
    public int Descriptor => _region.Descriptor;

    private static SharedRing Initialize(Func<long, SharedRegion> map, int capacity, int entryBytes)
    {
        if (capacity <= 0 || !BitOperations.IsPow2(capacity))
            throw new ArgumentException($"ring capacity {capacity} must be a positive power of two", nameof(capacity));
        if (entryBytes <= 0 || entryBytes % 8 != 0)
            throw new ArgumentException($"entry size {entryBytes} must be a positive multiple of 8", nameof(entryBytes));
        SharedRegion region = map(sizeof(RingHeader) + (long)capacity * entryBytes);
        var header = (RingHeader*)region.Pointer;
        header->AbiVersion = AbiConstants.AbiVersion;
        header->Capacity = (uint)capacity;
        header->EntryBytes = (uint)entryBytes;
        Volatile.Write(ref header->Magic, AbiConstants.RingMagic);
        return new SharedRing(region);
    }

    public static SharedRing Open(string path) => Checked(SharedRegion.Open(path));

    private static SharedRing Checked(SharedRegion mapped) =>
        new(SharedRegion.Check(mapped, sizeof(RingHeader), AbiConstants.RingMagic, "ring", region =>
        {
            var header = (RingHeader*)region.Pointer;
            bool fits = header->Capacity != 0 && BitOperations.IsPow2(header->Capacity) && header->EntryBytes != 0 && header->EntryBytes % 8 == 0
                && region.Length >= sizeof(RingHeader) + (long)header->Capacity * header->EntryBytes;
            return fits ? null : $"capacity {header->Capacity} × {header->EntryBytes} bytes does not fit its {region.Length}-byte file";
        }));

    /// <summary>The producer's side: appends <paramref name="entry"/> unless the ring is full.</summary>
    public bool TryWrite(ReadOnlySpan<byte> entry)
    {
        CheckSize(entry.Length);
        uint head = Header->Head; // only this side writes it
        if (head - Volatile.Read(ref Header->Tail) >= Header->Capacity)
            return false;
        entry.CopyTo(new Span<byte>(Slot(head), EntryBytes));
        Volatile.Write(ref Header->Head, head + 1);
        Ring();
        return true;
    }

    /// <summary>The consumer's side: takes the oldest entry, if any.</summary>
    public bool TryRead(Span<byte> entry)
    {
        CheckSize(entry.Length);
        uint tail = Header->Tail; // only this side writes it
        if (Volatile.Read(ref Header->Head) == tail)
            return false;
        new ReadOnlySpan<byte>(Slot(tail), EntryBytes).CopyTo(entry);
        Volatile.Write(ref Header->Tail, tail + 1);
        Ring();
        return true;
    }

    /// <summary>Appends, waiting for room at most <paramref name="timeout"/>; false if there was none.</summary>
    public bool Write(ReadOnlySpan<byte> entry, TimeSpan timeout)
    {
        fixed (byte* e = entry)
            return WaitFor(write: true, e, entry.Length, timeout);
    }

    /// <summary>Takes the oldest entry, waiting for one at most <paramref name="timeout"/>; false if none came.</summary>
    public bool Read(Span<byte> entry, TimeSpan timeout)
    {
        fixed (byte* e = entry)
            return WaitFor(write: false, e, entry.Length, timeout);
    }

    public bool TryWrite<T>(in T entry) where T : unmanaged => TryWrite(MemoryMarshal.AsBytes(new ReadOnlySpan<T>(in entry)));

    public bool Write<T>(in T entry, TimeSpan timeout) where T : unmanaged => Write(MemoryMarshal.AsBytes(new ReadOnlySpan<T>(in entry)), timeout);

    public bool TryRead<T>(out T entry) where T : unmanaged
    {
        entry = default;
        return TryRead(MemoryMarshal.AsBytes(new Span<T>(ref entry)));
    }

    public bool Read<T>(out T entry, TimeSpan timeout) where T : unmanaged
    {
        entry = default;
        return Read(MemoryMarshal.AsBytes(new Span<T>(ref entry)), timeout);
    }

    // A local function, not a lambda: nothing is allocated per call on this hot path.
    private bool WaitFor(bool write, byte* entry, int length, TimeSpan timeout)
    {
        bool Attempt() => write ? TryWrite(new ReadOnlySpan<byte>(entry, length)) : TryRead(new Span<byte>(entry, length));

        // Spin a little, then yield (the other side may have been woken onto this very core), then sleep.
        for (int i = 0; i < SpinIterations; i++)
        {
            if (Attempt())
                return true;
            if (i < SpinIterations / 2)
                Thread.SpinWait(20);
            else
                Thread.Yield();
        }
        var clock = Stopwatch.StartNew();
        uint* doorbell = &Header->Doorbell;
        while (true)
        {
            uint seen = Volatile.Read(ref *doorbell);
            Interlocked.Increment(ref Header->Sleepers);
            try
            {
                // Checked again after announcing the sleep: a step the other side took before it saw us is not missed.
                if (Attempt())
                    return true;
                TimeSpan left = timeout - clock.Elapsed;
                if (left <= TimeSpan.Zero)
                    return false;
                Interop.Sys.Wait(doorbell, seen, left);
            }
            finally
            {
                Interlocked.Decrement(ref Header->Sleepers);
            }
        }
    }

    private void Ring()
    {
        Interlocked.Increment(ref Header->Doorbell);
        if (Volatile.Read(ref Header->Sleepers) != 0)
            Interop.Sys.WakeAll(&Header->Doorbell);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private void CheckSize(int length)
    {
        if (length != Header->EntryBytes)
            throw new ArgumentException($"an entry of {Path} is {Header->EntryBytes} bytes, not {length}");
    }

    public void Dispose() => _region.Dispose();
}

/// <summary>Checks of ring entries received from a client: what is wrong with one, in words, or null.</summary>
public static class Messages
{
    public static string? Validate(in Request request)
    {
        if (request.Magic != AbiConstants.RequestMagic)
            return $"request magic 0x{request.Magic:x8} is not 0x{AbiConstants.RequestMagic:x8}";
        if (!Enum.IsDefined((RequestKind)request.Kind))
            return $"request kind {request.Kind} is unknown";
        if (request.PayloadBytes > AbiConstants.PayloadBytes)
            return $"request payload of {request.PayloadBytes} bytes exceeds {AbiConstants.PayloadBytes}";
        return null;
    }

    public static Request NewRequest(RequestKind kind, ulong id, ulong version = 0, uint weightSet = 0) =>
        new() { Magic = AbiConstants.RequestMagic, Kind = (ushort)kind, Id = id, Version = version, WeightSet = weightSet };

    public static Response NewResponse(in Request request, int status, string? detail = null)
    {
        var response = new Response { Magic = AbiConstants.ResponseMagic, Status = status, Id = request.Id, Version = request.Version };
        if (detail is not null)
        {
            // Truncated to the field at a character boundary.
            System.Text.Unicode.Utf8.FromUtf16(detail, MemoryMarshal.AsBytes(new Span<PayloadBytes>(ref response.Detail)), out _, out int written);
            response.DetailBytes = (uint)written;
        }
        return response;
    }
}

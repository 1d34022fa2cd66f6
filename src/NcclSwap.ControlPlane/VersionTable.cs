using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Text;
using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane;

/// <summary>
/// The version table (<c>nccl_swap_version_table</c>): one row per weight set, written by the agent alone.
/// A consumer's per-step check is <see cref="ReadState"/>, one atomic 8-byte load; the agent publishes an
/// activation with one release store of the packed (version, slot) word after everything else in the row.
/// </summary>
public sealed unsafe class VersionTable : IDisposable
{
    private readonly SharedRegion _region;

    private VersionTable(SharedRegion region) => _region = region;

    public string Path => _region.Path;

    public int Capacity => (int)Header->Capacity;

    private VersionTableHeader* Header => (VersionTableHeader*)_region.Pointer;

    private VersionEntry* Entry(int row)
    {
        if ((uint)row >= (uint)Capacity)
            throw new ArgumentOutOfRangeException(nameof(row), $"row {row} is not in [0, {Capacity}) of {Path}");
        return (VersionEntry*)(_region.Pointer + sizeof(VersionTableHeader)) + row;
    }

    /// <summary>
    /// The agent's side: a new, empty table of <paramref name="capacity"/> rows. It is made beside
    /// <paramref name="path"/> and renamed over it, so clients that still map an older table there keep seeing
    /// its last contents, never a file being truncated under them.
    /// </summary>
    public static VersionTable Create(string path, int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(capacity);
        string partial = path + ".partial";
        var made = SharedRegion.Create(partial, sizeof(VersionTableHeader) + (long)capacity * sizeof(VersionEntry));
        made.Dispose();
        File.Move(partial, path, overwrite: true);
        var region = SharedRegion.Open(path);
        var header = (VersionTableHeader*)region.Pointer;
        header->AbiVersion = AbiConstants.AbiVersion;
        header->Capacity = (uint)capacity;
        header->AgentPid = (ulong)Environment.ProcessId;
        Volatile.Write(ref header->Magic, AbiConstants.TableMagic); // last: a reader that sees the magic sees the rest
        return new VersionTable(region);
    }

    /// <summary>
    /// The agent's side at start: the table a previous life of the agent left at <paramref name="path"/>, kept as
    /// it is (so consumers that still map it see the new agent's activations), or a new one where there is none
    /// or it does not fit (another ABI, another capacity, damaged).
    /// </summary>
    public static VersionTable OpenOrCreate(string path, int capacity)
    {
        if (File.Exists(path))
        {
            try
            {
                VersionTable kept = Open(path);
                if (kept.Capacity == capacity)
                {
                    kept.Header->AgentPid = (ulong)Environment.ProcessId;
                    return kept;
                }
                kept.Dispose();
            }
            catch (InvalidDataException)
            {
            }
        }
        return Create(path, capacity);
    }

    /// <summary>Maps an existing table, checking that it is one, of this ABI version and complete.</summary>
    public static VersionTable Open(string path) => Checked(SharedRegion.Open(path));

    /// <summary>A consumer's read-only view of a table whose descriptor came over the front door (takes ownership of it).</summary>
    public static VersionTable FromDescriptor(int fd) => Checked(SharedRegion.FromDescriptor(fd, "version table (received)", writable: false));

    /// <summary>A read-only descriptor of this table's file, for a client: the caller closes it once sent.</summary>
    public Microsoft.Win32.SafeHandles.SafeFileHandle OpenReadOnlyDescriptor() =>
        File.OpenHandle(Path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);

    private static VersionTable Checked(SharedRegion region) =>
        new(SharedRegion.Check(region, sizeof(VersionTableHeader), AbiConstants.TableMagic, "version table", r =>
        {
            uint capacity = ((VersionTableHeader*)r.Pointer)->Capacity;
            long needed = sizeof(VersionTableHeader) + (long)capacity * sizeof(VersionEntry);
            return r.Length < needed ? $"{capacity} rows need {needed} bytes, the file has {r.Length}" : null;
        }));

    private void RequireWritable()
    {
        if (!_region.IsWritable)
            throw new InvalidOperationException($"{Path} is mapped read-only: only the agent writes the version table");
    }

    /// <summary>The agent's side: claims a free row for weight set <paramref name="name"/>.</summary>
    public int Add(string name)
    {
        RequireWritable();
        byte[] utf8 = Encoding.UTF8.GetBytes(name);
        if (utf8.Length is 0 or >= AbiConstants.NameBytes)
            throw new ArgumentException($"weight-set name '{name}' must be 1 to {AbiConstants.NameBytes - 1} UTF-8 bytes");
        if (Find(name) >= 0)
            throw new ArgumentException($"weight set '{name}' is already in {Path}");
        for (int row = 0; row < Capacity; row++)
        {
            VersionEntry* entry = Entry(row);
            if ((entry->Flags & AbiConstants.EntryInUse) != 0)
                continue;
            *entry = default;
            utf8.CopyTo(new Span<byte>(Unsafe.AsPointer(ref entry->Name), AbiConstants.NameBytes));
            Volatile.Write(ref entry->Flags, AbiConstants.EntryInUse);
            Interlocked.Increment(ref Unsafe.AsRef<ulong>(&Header->Generation));
            return row;
        }
        throw new InvalidOperationException($"{Path} is full: all {Capacity} rows are in use");
    }

    /// <summary>The row of weight set <paramref name="name"/>, or -1.</summary>
    public int Find(string name)
    {
        for (int row = 0; row < Capacity; row++)
            if ((Volatile.Read(ref Entry(row)->Flags) & AbiConstants.EntryInUse) != 0 && Name(row) == name)
                return row;
        return -1;
    }

    public string Name(int row)
    {
        var bytes = new ReadOnlySpan<byte>(Unsafe.AsPointer(ref Entry(row)->Name), AbiConstants.NameBytes);
        int end = bytes.IndexOf((byte)0);
        return Encoding.UTF8.GetString(end < 0 ? bytes : bytes[..end]);
    }

    /// <summary>
    /// The agent's side: makes <paramref name="version"/> in <paramref name="slot"/> the active version of
    /// <paramref name="row"/>. The previous active version becomes the last good one.
    /// </summary>
    public void Activate(int row, ulong version, int slot, ulong manifestDigest)
    {
        ulong previous = Volatile.Read(ref Entry(row)->State);
        Activate(row, version, slot, manifestDigest, previous != 0 ? VersionEntry.UnpackState(previous).Version : Entry(row)->LastGood);
    }

    /// <summary>As <see cref="Activate(int, ulong, int, ulong)"/>, with the last good version given (0 after a rollback: there is none left).</summary>
    public void Activate(int row, ulong version, int slot, ulong manifestDigest, ulong lastGood)
    {
        RequireWritable();
        ArgumentOutOfRangeException.ThrowIfZero(version);
        ulong state = VersionEntry.PackState(version, slot);
        VersionEntry* entry = Entry(row);
        entry->LastGood = lastGood;
        entry->ManifestDigest = manifestDigest;
        entry->ActivatedNs = (ulong)Stopwatch.GetTimestamp();
        Volatile.Write(ref entry->State, state); // the release store consumers synchronise with
        ClearCanary(row); // after the store: a canary that still sees its lane sees this version there too
    }

    /// <summary>The agent's side, at start: puts back a row's active and last good versions from persisted state.</summary>
    public void Restore(int row, ulong version, int slot, ulong manifestDigest, ulong lastGood)
    {
        RequireWritable();
        ulong state = VersionEntry.PackState(version, slot);
        VersionEntry* entry = Entry(row);
        entry->LastGood = lastGood;
        entry->ManifestDigest = manifestDigest;
        entry->ActivatedNs = (ulong)Stopwatch.GetTimestamp();
        Volatile.Write(ref entry->State, state);
        ClearCanary(row); // canaries of a previous life go back to the active version
    }

    /// <summary>The agent's side, at start: a row with no active version (state 0).</summary>
    public void Reset(int row)
    {
        RequireWritable();
        VersionEntry* entry = Entry(row);
        Volatile.Write(ref entry->State, 0UL);
        entry->LastGood = 0;
        entry->ManifestDigest = 0;
        ClearCanary(row);
    }

    /// <summary>
    /// The agent's side: puts <paramref name="state"/> on the consumers of <paramref name="lanes"/> only (canaries):
    /// the state first, then the lanes, so that a consumer that sees its lane sees the state.
    /// </summary>
    public void SetCanary(int row, ulong state, ulong lanes)
    {
        RequireWritable();
        VersionEntry* entry = Entry(row);
        Volatile.Write(ref entry->CanaryState, state);
        Volatile.Write(ref entry->CanaryLanes, lanes);
    }

    /// <summary>The agent's side: no consumer serves a canary version any more (after a promotion's store, or to roll the canaries back).</summary>
    public void ClearCanary(int row)
    {
        RequireWritable();
        VersionEntry* entry = Entry(row);
        Volatile.Write(ref entry->CanaryLanes, 0UL);
        Volatile.Write(ref entry->CanaryState, 0UL);
    }

    /// <summary>The agent's side: the row's <see cref="AbiConstants.EntryPaused"/> flag.</summary>
    public void SetPaused(int row, bool paused)
    {
        RequireWritable();
        VersionEntry* entry = Entry(row);
        uint flags = Volatile.Read(ref entry->Flags);
        Volatile.Write(ref entry->Flags, paused ? flags | AbiConstants.EntryPaused : flags & ~AbiConstants.EntryPaused);
    }

    /// <summary>
    /// A consumer's per-step check: the state word it must serve. One load when no canary runs (the lanes are 0),
    /// then the state; a consumer whose <paramref name="lane"/> is set serves the canary state.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public ulong ReadTarget(int row, int lane)
    {
        VersionEntry* entry = Entry(row);
        if (lane >= 0 && ((Volatile.Read(ref entry->CanaryLanes) >> lane) & 1) != 0 && Volatile.Read(ref entry->CanaryState) is ulong canary and not 0)
            return canary;
        return Volatile.Read(ref entry->State);
    }

    /// <summary>The consumer's per-step check: one atomic load of the packed (version, slot) word.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public ulong ReadState(int row) => Volatile.Read(ref Entry(row)->State);

    public VersionEntry ReadEntry(int row) => *Entry(row);

    public void Dispose() => _region.Dispose();
}

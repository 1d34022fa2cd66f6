using System.Text;
using System.Text.Json;

namespace NcclSwap.ControlPlane.State;

/// <summary>The active version of a weight set: which version, in which slot, with which manifest digest.</summary>
public sealed record ActiveVersion(ulong Version, int Slot, ulong ManifestDigest);

/// <summary>A version's bytes kept in a staging file (in the staging directory), with its manifest beside it.</summary>
public sealed record StagedFile(ulong Version, string File, ulong ManifestDigest);

/// <summary>
/// What the agent must know about one weight set after a restart: its active and last good versions, where
/// their bytes were staged (so they can be checked and used again), and the highest version published.
/// </summary>
public sealed record WeightSetState(string Name, ActiveVersion? Active, ulong LastGood, ulong HighestPublished,
    StagedFile? ActiveStaging = null, StagedFile? LastGoodStaging = null);

/// <summary>Everything the agent persists: its weight sets and how far the audit log has been written.</summary>
public sealed record AgentState(IReadOnlyList<WeightSetState> WeightSets, long AuditPosition)
{
    public const string Format = "nccl-swap-state/1";

    public static AgentState Empty { get; } = new([], 0);

    public byte[] Serialize()
    {
        var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream, new JsonWriterOptions { Indented = true }))
        {
            writer.WriteStartObject();
            writer.WriteString("format", Format);
            writer.WriteNumber("audit_position", AuditPosition);
            writer.WriteStartArray("weight_sets");
            foreach (WeightSetState set in WeightSets)
            {
                writer.WriteStartObject();
                writer.WriteString("name", set.Name);
                if (set.Active is { } active)
                {
                    writer.WriteStartObject("active");
                    writer.WriteNumber("version", active.Version);
                    writer.WriteNumber("slot", active.Slot);
                    writer.WriteString("manifest_digest", active.ManifestDigest.ToString("x16"));
                    writer.WriteEndObject();
                }
                writer.WriteNumber("last_good", set.LastGood);
                writer.WriteNumber("highest_published", set.HighestPublished);
                WriteStaged(writer, "active_staging", set.ActiveStaging);
                WriteStaged(writer, "last_good_staging", set.LastGoodStaging);
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
            writer.WriteEndObject();
        }
        return stream.ToArray();
    }

    private static void WriteStaged(Utf8JsonWriter writer, string name, StagedFile? staged)
    {
        if (staged is null)
            return;
        writer.WriteStartObject(name);
        writer.WriteNumber("version", staged.Version);
        writer.WriteString("file", staged.File);
        writer.WriteString("manifest_digest", staged.ManifestDigest.ToString("x16"));
        writer.WriteEndObject();
    }

    private static StagedFile? ReadStaged(JsonElement set, string name) =>
        set.TryGetProperty(name, out JsonElement s)
            ? new StagedFile(s.GetProperty("version").GetUInt64(), s.GetProperty("file").GetString()!, Hex(s.GetProperty("manifest_digest")))
            : null;

    private static ulong Hex(JsonElement text) => ulong.Parse(text.GetString()!, System.Globalization.NumberStyles.AllowHexSpecifier);

    public static AgentState Parse(ReadOnlySpan<byte> json, string source)
    {
        try
        {
            using JsonDocument document = JsonDocument.Parse(json.ToArray());
            JsonElement root = document.RootElement;
            if (root.GetProperty("format").GetString() != Format)
                throw new InvalidDataException($"{source}: not an nccl-swap state file ({Format})");
            var sets = new List<WeightSetState>();
            foreach (JsonElement set in root.GetProperty("weight_sets").EnumerateArray())
            {
                ActiveVersion? active = set.TryGetProperty("active", out JsonElement a)
                    ? new ActiveVersion(a.GetProperty("version").GetUInt64(), a.GetProperty("slot").GetInt32(), Hex(a.GetProperty("manifest_digest")))
                    : null;
                sets.Add(new WeightSetState(set.GetProperty("name").GetString()!, active, set.GetProperty("last_good").GetUInt64(), set.GetProperty("highest_published").GetUInt64(),
                    ReadStaged(set, "active_staging"), ReadStaged(set, "last_good_staging")));
            }
            if (sets.GroupBy(s => s.Name).FirstOrDefault(g => g.Count() > 1) is { } twice)
                throw new InvalidDataException($"{source}: weight set '{twice.Key}' appears twice");
            return new AgentState(sets, root.GetProperty("audit_position").GetInt64());
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException or OverflowException)
        {
            throw new InvalidDataException($"{source}: the agent's state is damaged: {e.Message}", e);
        }
    }

    public override string ToString() => Encoding.UTF8.GetString(Serialize());
}

/// <summary>
/// Keeps <see cref="AgentState"/> in one file, replaced atomically: the new state is written to a temporary
/// file beside it, flushed to disk, renamed over the old one, and the folder is flushed, so after a crash at
/// any point the file holds either the old state or the new one, never a mixture. <see cref="Save"/> with
/// <c>flush: false</c> leaves the two flushes to a later <see cref="Flush"/>: the rename alone is what a killed
/// process needs (the page cache outlives it); the flushes are for a machine that loses power.
/// A state known ahead (the one an activation will save) can be written and flushed beforehand
/// (<see cref="Prepare"/>), so that saving it is a rename (<see cref="Save(AgentState, PreparedState?, bool)"/>).
/// </summary>
public sealed class StateStore(string path)
{
    private long _prepared;

    public string Path { get; } = path;

    private string Temporary => Path + ".partial";

    /// <summary>The last state saved, or <see cref="AgentState.Empty"/> if there is none; leftover partial and prepared writes are discarded.</summary>
    public AgentState Load()
    {
        // A save that crashed before its rename, or a state prepared for an activation that never came: the saved state stands.
        foreach (string leftover in Directory.Exists(Folder) ? Directory.EnumerateFiles(Folder, System.IO.Path.GetFileName(Temporary) + "*") : [])
            File.Delete(leftover);
        return File.Exists(Path) ? AgentState.Parse(File.ReadAllBytes(Path), Path) : AgentState.Empty;
    }

    public void Save(AgentState state, bool flush = true) => Save(state, null, flush);

    /// <summary>
    /// Saves <paramref name="state"/>: by renaming <paramref name="prepared"/> into place when it holds exactly these
    /// bytes (it is on disk already), else as <see cref="Save(AgentState, bool)"/> does. Either way the prepared file is gone after.
    /// </summary>
    public void Save(AgentState state, PreparedState? prepared, bool flush = true)
    {
        byte[] bytes = state.Serialize();
        if (prepared is not null && prepared.Bytes.AsSpan().SequenceEqual(bytes) && prepared.Take())
        {
            File.Move(prepared.File, Path, overwrite: true);
            if (flush)
                Interop.Sys.FsyncDirectory(Folder);
            return;
        }
        prepared?.Dispose();
        Directory.CreateDirectory(Folder);
        using (var file = new FileStream(Temporary, FileMode.Create, FileAccess.Write, FileShare.None))
        {
            file.Write(bytes);
            if (flush)
                file.Flush(flushToDisk: true);
        }
        File.Move(Temporary, Path, overwrite: true);
        if (flush)
            Interop.Sys.FsyncDirectory(Folder);
    }

    /// <summary>Writes <paramref name="state"/> beside the state file and flushes it, without replacing anything yet.</summary>
    public PreparedState Prepare(AgentState state)
    {
        Directory.CreateDirectory(Folder);
        var prepared = new PreparedState($"{Temporary}.{Environment.ProcessId}.{Interlocked.Increment(ref _prepared)}", state.Serialize());
        using (var file = new FileStream(prepared.File, FileMode.CreateNew, FileAccess.Write, FileShare.None))
        {
            file.Write(prepared.Bytes);
            file.Flush(flushToDisk: true);
        }
        return prepared;
    }

    /// <summary>Flushes the file and its folder to disk: the last <see cref="Save"/> now survives a power loss too.</summary>
    public void Flush()
    {
        using (var file = new FileStream(Path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite))
            file.Flush(flushToDisk: true);
        Interop.Sys.FsyncDirectory(Folder);
    }

    private string Folder => System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(Path))!;
}

/// <summary>A state written and flushed beside the state file by <see cref="StateStore.Prepare"/>; Dispose deletes it unless it was saved.</summary>
public sealed class PreparedState(string file, byte[] bytes) : IDisposable
{
    private int _taken;

    public string File { get; } = file;

    public byte[] Bytes { get; } = bytes;

    /// <summary>Claims the file for a save (once).</summary>
    internal bool Take() => Interlocked.Exchange(ref _taken, 1) == 0;

    public void Dispose()
    {
        if (Take())
            System.IO.File.Delete(File);
    }
}

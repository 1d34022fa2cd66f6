using System.Security.Cryptography;
using System.Text;
using System.Text.Json;

namespace NcclSwap.ControlPlane.Audit;

/// <summary>Who did something: the client's process as the kernel names it (SO_PEERCRED) and its executable when it can be read.</summary>
public readonly record struct AuditActor(int Pid, uint Uid, uint Gid, string? Executable)
{
    public static AuditActor Of(PeerIdentity peer)
    {
        string? executable = null;
        try
        {
            executable = File.ResolveLinkTarget($"/proc/{peer.Pid}/exe", returnFinalTarget: false)?.FullName;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // Gone already, or not ours to read: the ids still say who it was.
        }
        return new AuditActor(peer.Pid, peer.Uid, peer.Gid, executable);
    }
}

/// <summary>What was done: an action on a weight set and version, with the manifest's digest and the outcome.</summary>
public sealed record AuditEvent(string Action, string Outcome, string? WeightSet = null, ulong? Version = null, string? Manifest = null, string? Detail = null);

/// <summary>The result of <see cref="AuditLog.Verify"/>: how many entries were read, and the first bad one, if any.</summary>
public sealed record AuditVerification(long Entries, string? FirstBad)
{
    public bool Intact => FirstBad is null;
}

/// <summary>
/// The agent's audit log: JSON lines, append-only, each entry holding the SHA-256 of the entry before it
/// (<c>previous</c>) and its own (<c>hash</c>, over the line's bytes up to that field), and a sequence number, so that
/// an edited, removed or reordered entry breaks the chain where it happened. Durability: every entry is written and
/// flushed to the disk (fsync) before <see cref="Append"/> returns, so an action the agent has answered is on disk.
/// Rotation: past <see cref="RotateBytes"/> the file is renamed <c>PATH.N</c> (N counting up) and a new one starts,
/// whose first entry holds the hash of the last one before: <see cref="Verify"/> walks <c>PATH.1</c>, <c>PATH.2</c>, …,
/// then <c>PATH</c> as one chain. A partial last line (a crash during a write) is cut off when the log is opened, and
/// that is itself entered. Files are created readable and writable by the agent's user only (0600).
/// </summary>
public sealed class AuditLog : IDisposable
{
    public const string Genesis = "0000000000000000000000000000000000000000000000000000000000000000";
    private const string HashField = ",\"hash\":\"";
    private readonly Lock _lock = new();
    private FileStream _file;
    private long _sequence;
    private string _previous;

    private AuditLog(string path, long rotateBytes, FileStream file, long sequence, string previous)
    {
        Path = path;
        RotateBytes = rotateBytes;
        _file = file;
        _sequence = sequence;
        _previous = previous;
    }

    public string Path { get; }

    public long RotateBytes { get; }

    /// <summary>The sequence number of the last entry written (0: none yet).</summary>
    public long Sequence
    {
        get
        {
            lock (_lock)
                return _sequence;
        }
    }

    /// <summary>Opens (or creates, with its folder) the log at <paramref name="path"/>, continuing its chain.</summary>
    public static AuditLog Open(string path, long rotateBytes = 64L << 20)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(rotateBytes, 4096);
        Directory.CreateDirectory(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!);
        var file = new FileStream(path, Creating(FileMode.OpenOrCreate));
        try
        {
            long cut = CutPartialLine(file);
            (long sequence, string previous) = LastEntry(file, path) ?? LastOfRotated(path) ?? (0, Genesis);
            file.Seek(0, SeekOrigin.End);
            var log = new AuditLog(path, rotateBytes, file, sequence, previous);
            if (cut > 0)
                log.Append(AuditActor.Of(PeerIdentity.OfThisProcess()), new AuditEvent("recover", "cut", Detail: $"a partial last entry of {cut} bytes (a crash during a write) was cut off"));
            return log;
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    /// <summary>Writes one entry, flushed to the disk before it returns; returns its sequence number.</summary>
    public long Append(AuditActor who, AuditEvent what)
    {
        lock (_lock)
        {
            long sequence = _sequence + 1;
            byte[] line = Line(sequence, DateTimeOffset.UtcNow, who, what, _previous, out string hash);
            _file.Write(line);
            _file.Flush(flushToDisk: true);
            _sequence = sequence;
            _previous = hash;
            if (_file.Length >= RotateBytes)
                Rotate();
            return sequence;
        }
    }

    /// <summary>
    /// Checks the whole chain at <paramref name="path"/> (its rotated files first): every entry's hash against its
    /// bytes, its sequence number, and its link to the entry before. Names the first bad entry and why.
    /// </summary>
    public static AuditVerification Verify(string path)
    {
        if (!File.Exists(path) && RotatedFiles(path).Count == 0)
            return new AuditVerification(0, $"{path}: no audit log there");
        long expected = 1, entries = 0;
        string previous = Genesis;
        foreach (string file in RotatedFiles(path).Append(path).Where(File.Exists))
        {
            int lineNumber = 0;
            foreach (string line in File.ReadLines(file))
            {
                lineNumber++;
                string where = $"{file} line {lineNumber}";
                string? problem = Check(line, expected, previous, out long sequence, out string hash);
                if (problem is not null)
                    return new AuditVerification(entries, $"{where}: {problem}");
                entries++;
                expected = sequence + 1;
                previous = hash;
            }
        }
        return new AuditVerification(entries, null);
    }

    /// <summary>Every entry at <paramref name="path"/> (rotated files first), as the JSON objects they are.</summary>
    public static IEnumerable<JsonElement> Read(string path)
    {
        foreach (string file in RotatedFiles(path).Append(path).Where(File.Exists))
            foreach (string line in File.ReadLines(file))
            {
                using JsonDocument entry = JsonDocument.Parse(line);
                yield return entry.RootElement.Clone();
            }
    }

    private static string? Check(string line, long expected, string previous, out long sequence, out string hash)
    {
        sequence = 0;
        hash = "";
        int at = line.LastIndexOf(HashField, StringComparison.Ordinal);
        JsonElement entry;
        try
        {
            using JsonDocument document = JsonDocument.Parse(line);
            entry = document.RootElement.Clone();
            sequence = entry.GetProperty("seq").GetInt64();
            hash = entry.GetProperty("hash").GetString() ?? "";
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
        {
            return $"not an audit entry ({e.Message})";
        }
        if (at < 0 || HashOf(Encoding.UTF8.GetBytes(line[..at])) != hash)
            return $"entry {sequence}: its hash does not match its contents (it was edited)";
        if (sequence > expected)
            return $"entry {sequence} follows entry {expected - 1}: {(sequence - expected == 1 ? $"entry {expected} is" : $"entries {expected}..{sequence - 1} are")} missing (removed)";
        if (sequence < expected)
            return $"entry {sequence} comes after entry {expected - 1} (reordered or repeated)";
        if (entry.GetProperty("previous").GetString() != previous)
            return $"entry {sequence} does not hold the hash of the entry before it (an entry was removed or reordered)";
        return null;
    }

    private static byte[] Line(long sequence, DateTimeOffset time, AuditActor who, AuditEvent what, string previous, out string hash)
    {
        var buffer = new MemoryStream();
        using (var writer = new Utf8JsonWriter(buffer))
        {
            writer.WriteStartObject();
            writer.WriteNumber("seq", sequence);
            writer.WriteString("time", time.ToString("yyyy-MM-ddTHH:mm:ss.fffZ", System.Globalization.CultureInfo.InvariantCulture));
            writer.WriteStartObject("who");
            writer.WriteNumber("uid", who.Uid);
            writer.WriteNumber("gid", who.Gid);
            writer.WriteNumber("pid", who.Pid);
            writer.WriteString("exe", who.Executable);
            writer.WriteEndObject();
            writer.WriteString("action", what.Action);
            writer.WriteString("weight_set", what.WeightSet);
            if (what.Version is ulong version)
                writer.WriteNumber("version", version);
            else
                writer.WriteNull("version");
            writer.WriteString("manifest", what.Manifest);
            writer.WriteString("outcome", what.Outcome);
            writer.WriteString("detail", what.Detail);
            writer.WriteString("previous", previous);
            writer.WriteEndObject();
        }
        byte[] body = buffer.ToArray(); // {...} : the hash covers everything before its own field
        byte[] prefix = body[..^1];
        hash = HashOf(prefix);
        return [.. prefix, .. Encoding.UTF8.GetBytes($"{HashField}{hash}\"}}\n")];
    }

    private static string HashOf(byte[] bytes) => Convert.ToHexStringLower(SHA256.HashData(bytes));

    private void Rotate()
    {
        _file.Dispose();
        List<string> rotated = RotatedFiles(Path);
        File.Move(Path, $"{Path}.{rotated.Count + 1}");
        _file = new FileStream(Path, Creating(FileMode.CreateNew));
    }

    /// <summary>Read and write for the agent's user alone: who did what is not for every local user to read.</summary>
    private static FileStreamOptions Creating(FileMode mode) => new()
    {
        Mode = mode,
        Access = FileAccess.ReadWrite,
        Share = FileShare.Read,
        UnixCreateMode = UnixFileMode.UserRead | UnixFileMode.UserWrite,
    };

    /// <summary>PATH.1, PATH.2, … in order.</summary>
    private static List<string> RotatedFiles(string path)
    {
        var files = new List<string>();
        for (int n = 1; File.Exists($"{path}.{n}"); n++)
            files.Add($"{path}.{n}");
        return files;
    }

    /// <summary>Cuts a last line that has no newline (a write a crash interrupted); returns the bytes cut.</summary>
    private static long CutPartialLine(FileStream file)
    {
        long length = file.Length;
        if (length == 0)
            return 0;
        long end = length;
        var one = new byte[1];
        while (end > 0)
        {
            file.Seek(end - 1, SeekOrigin.Begin);
            file.ReadExactly(one);
            if (one[0] == (byte)'\n')
                break;
            end--;
        }
        if (end == length)
            return 0;
        file.SetLength(end);
        file.Flush(flushToDisk: true);
        return length - end;
    }

    /// <summary>The sequence number and hash of the file's last entry, or null when it has none.</summary>
    private static (long, string)? LastEntry(FileStream file, string path)
    {
        if (file.Length == 0)
            return null;
        long start = Math.Max(0, file.Length - 65536);
        file.Seek(start, SeekOrigin.Begin);
        byte[] tail = new byte[file.Length - start];
        file.ReadExactly(tail);
        string text = Encoding.UTF8.GetString(tail).TrimEnd('\n');
        string last = text[(text.LastIndexOf('\n') + 1)..];
        try
        {
            using JsonDocument entry = JsonDocument.Parse(last);
            return (entry.RootElement.GetProperty("seq").GetInt64(), entry.RootElement.GetProperty("hash").GetString()!);
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException)
        {
            throw new InvalidDataException($"{path}: its last entry is not an audit entry ({e.Message}); run 'nccl-swap audit verify --log {path}'", e);
        }
    }

    private static (long, string)? LastOfRotated(string path)
    {
        List<string> rotated = RotatedFiles(path);
        if (rotated.Count == 0)
            return null;
        using var file = new FileStream(rotated[^1], FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        return LastEntry(file, rotated[^1]);
    }

    public void Dispose()
    {
        lock (_lock)
            _file.Dispose();
    }
}

using NcclSwap.ControlPlane.Audit;

namespace NcclSwap.ControlPlane.Tests;

public sealed class AuditLogTests : IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-audit-").FullName;

    private static readonly AuditActor Trainer = new(4242, 1000, 1000, "/usr/bin/python3");

    private string Write(int entries, string name = "audit.jsonl", long rotateBytes = 64L << 20)
    {
        string path = Path.Combine(_folder, name);
        using AuditLog log = AuditLog.Open(path, rotateBytes);
        for (int i = 1; i <= entries; i++)
            log.Append(Trainer, new AuditEvent("publish", i % 3 == 0 ? "failed" : "activated", "llama", (ulong)i, $"sha256:{i:x64}", $"update {i}"));
        return path;
    }

    private static string[] Lines(string path) => File.ReadAllLines(path);

    [Fact]
    public void An_intact_log_verifies_and_every_entry_says_who_what_and_when()
    {
        string path = Write(12);
        AuditVerification result = AuditLog.Verify(path);
        Assert.True(result.Intact, result.FirstBad);
        Assert.Equal(12, result.Entries);
        var entries = AuditLog.Read(path).ToList();
        Assert.Equal(1000u, entries[4].GetProperty("who").GetProperty("uid").GetUInt32());
        Assert.Equal("/usr/bin/python3", entries[4].GetProperty("who").GetProperty("exe").GetString());
        Assert.Equal(5ul, entries[4].GetProperty("version").GetUInt64());
        Assert.Equal("llama", entries[4].GetProperty("weight_set").GetString());
        Assert.Equal(entries[3].GetProperty("hash").GetString(), entries[4].GetProperty("previous").GetString());
        Assert.Equal(AuditLog.Genesis, entries[0].GetProperty("previous").GetString());
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(path));
        Assert.True(DateTimeOffset.UtcNow - DateTimeOffset.Parse(entries[11].GetProperty("time").GetString()!, System.Globalization.CultureInfo.InvariantCulture) < TimeSpan.FromMinutes(5));

        // Opened again, the chain goes on.
        using (AuditLog log = AuditLog.Open(path))
            Assert.Equal(13, log.Append(Trainer, new AuditEvent("rollback", "activated", "llama", 11)));
        Assert.True(AuditLog.Verify(path).Intact);
    }

    [Theory]
    [InlineData("edit", "line 5: entry 5: its hash does not match its contents (it was edited)")]
    [InlineData("remove", "line 5: entry 6 follows entry 4: entry 5 is missing (removed)")]
    [InlineData("swap", "line 5: entry 6 follows entry 4: entry 5 is missing (removed)")]
    [InlineData("remove-first", "line 1: entry 2 follows entry 0: entry 1 is missing (removed)")]
    [InlineData("rehash", "line 6: entry 6 does not hold the hash of the entry before it")]
    [InlineData("renumber", "line 5: entry 5 does not hold the hash of the entry before it")]
    [InlineData("garbage", "line 3: not an audit entry")]
    public void Each_kind_of_tampering_is_found_and_the_first_bad_entry_named(string tampering, string expected)
    {
        string path = Write(9);
        string[] lines = Lines(path);
        switch (tampering)
        {
            case "edit": // the outcome of entry 5, its hash left as it was
                lines[4] = lines[4].Replace("\"outcome\":\"activated\"", "\"outcome\":\"failed\"", StringComparison.Ordinal);
                break;
            case "remove":
                lines = [.. lines[..4], .. lines[5..]];
                break;
            case "swap":
                (lines[4], lines[5]) = (lines[5], lines[4]);
                break;
            case "remove-first":
                lines = lines[1..];
                break;
            case "rehash": // entry 5 edited and its own hash recomputed: the next entry no longer links to it
                lines[4] = Rehash(lines[4].Replace("\"detail\":\"update 5\"", "\"detail\":\"nothing to see\"", StringComparison.Ordinal));
                break;
            case "renumber": // entry 5 removed and the later ones renumbered and rehashed: the link from 4 breaks
                lines = [.. lines[..4], .. lines[5..].Select(l => Rehash(Renumber(l)))];
                break;
            case "garbage":
                lines[2] = "{not json";
                break;
        }
        File.WriteAllLines(path, lines);
        AuditVerification result = AuditLog.Verify(path);
        Assert.False(result.Intact);
        Assert.Contains(expected, result.FirstBad);
        Assert.Contains(path, result.FirstBad);
    }

    /// <summary>An attacker's recomputation of an entry's own hash (the chain's next link still holds the old one).</summary>
    private static string Rehash(string line)
    {
        int at = line.LastIndexOf(",\"hash\":\"", StringComparison.Ordinal);
        string hash = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(System.Text.Encoding.UTF8.GetBytes(line[..at])));
        return $"{line[..at]},\"hash\":\"{hash}\"}}";
    }

    private static string Renumber(string line)
    {
        var m = System.Text.RegularExpressions.Regex.Match(line, "^\\{\"seq\":(\\d+),");
        long seq = long.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
        return $"{{\"seq\":{seq - 1},{line[m.Length..]}";
    }

    [Fact]
    public void Rotation_keeps_one_chain_across_files_and_tampering_in_a_rotated_file_is_found()
    {
        string path = Write(60, rotateBytes: 4096);
        Assert.True(File.Exists(path + ".1") && File.Exists(path + ".2"), "expected at least two rotated files");
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(path));
        AuditVerification result = AuditLog.Verify(path);
        Assert.True(result.Intact, result.FirstBad);
        Assert.Equal(60, result.Entries);
        using (AuditLog log = AuditLog.Open(path, 4096))
            Assert.Equal(61, log.Append(Trainer, new AuditEvent("publish", "activated", "llama", 61)));
        Assert.True(AuditLog.Verify(path).Intact);

        string[] first = Lines(path + ".1");
        first[1] = first[1].Replace("\"uid\":1000", "\"uid\":0", StringComparison.Ordinal);
        File.WriteAllLines(path + ".1", first);
        AuditVerification tampered = AuditLog.Verify(path);
        Assert.Contains($"{path}.1 line 2: entry 2: its hash does not match its contents", tampered.FirstBad);
    }

    [Fact]
    public void A_partial_last_line_from_a_crash_is_cut_and_the_cut_itself_is_entered()
    {
        string path = Write(5);
        const string Partial = "{\"seq\":6,\"time\":\"2026-11-25T";
        File.AppendAllText(path, Partial);
        using (AuditLog log = AuditLog.Open(path))
            Assert.Equal(7, log.Append(Trainer, new AuditEvent("publish", "activated", "llama", 6)));
        AuditVerification result = AuditLog.Verify(path);
        Assert.True(result.Intact, result.FirstBad);
        var recovered = AuditLog.Read(path).ElementAt(5);
        Assert.Equal("recover", recovered.GetProperty("action").GetString());
        Assert.Contains($"partial last entry of {Partial.Length} bytes", recovered.GetProperty("detail").GetString());
    }

    [Fact]
    public void Entries_appended_from_many_threads_form_one_chain()
    {
        string path = Path.Combine(_folder, "threads.jsonl");
        using (AuditLog log = AuditLog.Open(path))
            Parallel.For(0, 200, new ParallelOptions { MaxDegreeOfParallelism = 8 }, i => log.Append(Trainer, new AuditEvent("ack", "ok", "llama", (ulong)i)));
        AuditVerification result = AuditLog.Verify(path);
        Assert.True(result.Intact, result.FirstBad);
        Assert.Equal(200, result.Entries);
    }

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}

public sealed class AgentAuditTests
{
    private static readonly NcclSwap.WeightSets.SyntheticModel Model = NcclSwap.WeightSets.SyntheticModel.Tiny;

    [Fact]
    public async Task The_agent_enters_who_published_what_the_outcome_and_every_refusal_and_the_chain_verifies()
    {
        await using TestAgent agent = TestAgent.Start();
        NcclSwap.WeightSets.RegionLayout layout = Model.Layout();
        using (var publisher = PublisherClient.Connect(agent.SocketPath, "llama", layout))
        {
            NcclSwap.WeightSets.SyntheticModel.Fill(1, layout, publisher.Tensors.Pointer);
            Assert.True(publisher.Publish(1, wait: true).Ok);
        }
        // The outcome is entered by the thread that ended the update, which may answer the publisher first.
        string path = agent.Core!.Options.AuditLogPath;
        agent.WaitFor(() => AuditLog.Read(path).Count() >= 2, TimeSpan.FromSeconds(10), "the publish's two audit entries");
        using (ChannelClient consumer = ChannelClient.Connect(agent.SocketPath, Role.Consumer, "llama"))
        {
            Abi.Response refused = consumer.Call(consumer.NewRequest(Abi.RequestKind.Publish, 2), TimeSpan.FromSeconds(10));
            Assert.Equal(Abi.Status.NotPermitted, refused.Status);
        }
        Assert.Equal(Path.Combine(agent.Folder, "state", "audit.jsonl"), path);
        agent.WaitFor(() => AuditLog.Read(path).Count() >= 3, TimeSpan.FromSeconds(10), "three audit entries");

        var entries = AuditLog.Read(path).ToList();
        string Describe(System.Text.Json.JsonElement e) => $"{e.GetProperty("action").GetString()} {e.GetProperty("outcome").GetString()}";
        Assert.Equal(["publish requested", "publish activated", "publish denied"], entries.Select(Describe));
        uint me = TestAgent.MyUid();
        Assert.All(entries, e => Assert.Equal(me, e.GetProperty("who").GetProperty("uid").GetUInt32()));
        Assert.Equal(1ul, entries[1].GetProperty("version").GetUInt64());
        Assert.Equal(Environment.ProcessId, entries[0].GetProperty("who").GetProperty("pid").GetInt32());
        Assert.Equal(Environment.ProcessPath, entries[0].GetProperty("who").GetProperty("exe").GetString());
        Assert.Contains("consumer", entries[2].GetProperty("detail").GetString());
        Assert.True(AuditLog.Verify(path).Intact);
    }
}

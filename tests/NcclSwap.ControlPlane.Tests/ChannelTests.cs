using System.Runtime.InteropServices;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.Testing;

namespace NcclSwap.ControlPlane.Tests;

public sealed class ChannelTests : IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-shm-").FullName;

    private string PathOf(string name) => Path.Combine(_folder, name);

    [Fact]
    public void A_consumer_process_sees_every_activation_whole_and_in_order()
    {
        using VersionTable table = VersionTable.Create(PathOf("table"), capacity: 8);
        table.Add("other");
        int row = table.Add("llama");
        const ulong last = 200_000;
        using PeerProcess reader = PeerHost.Start(ChannelPeers.TableReader, table.Path, "llama", $"{last}");
        reader.WaitForLine("ready", TimeSpan.FromSeconds(60));
        for (ulong version = 1; version <= last; version++)
            table.Activate(row, version, (int)(version % 2), manifestDigest: version * 31);
        Assert.True(reader.WaitForExit(TimeSpan.FromSeconds(60)) == 0, reader.ToString());
        Assert.Contains("seen ", reader.Output);

        VersionEntry entry = table.ReadEntry(row);
        Assert.Equal((last, (int)(last % 2)), VersionEntry.UnpackState(entry.State));
        Assert.Equal(last - 1, entry.LastGood);
        Assert.Equal(last * 31, entry.ManifestDigest);
        Assert.Equal(0UL, table.ReadState(table.Find("other")));
    }

    [Fact]
    public void A_restarted_agent_keeps_the_table_readers_map_and_a_new_table_never_truncates_an_old_one_under_them()
    {
        string path = PathOf("table");
        using VersionTable first = VersionTable.Create(path, capacity: 4);
        int row = first.Add("llama");
        first.Activate(row, 7, 1, 70);
        var descriptor = first.OpenReadOnlyDescriptor();
        int fd = (int)descriptor.DangerousGetHandle();
        descriptor.SetHandleAsInvalid(); // the reader owns it now
        using VersionTable reader = VersionTable.FromDescriptor(fd);

        using (VersionTable kept = VersionTable.OpenOrCreate(path, capacity: 4)) // the next life of the agent
        {
            Assert.Equal(row, kept.Find("llama"));
            Assert.Equal(VersionEntry.PackState(7, 1), kept.ReadState(row));
            kept.Activate(row, 8, 0, 80);
            Assert.Equal(VersionEntry.PackState(8, 0), reader.ReadState(row)); // the reader sees the new life's activations
        }

        using (VersionTable resized = VersionTable.OpenOrCreate(path, capacity: 16)) // another capacity: a new file
        {
            Assert.Equal(16, resized.Capacity);
            Assert.Equal(-1, resized.Find("llama"));
            Assert.Equal(VersionEntry.PackState(8, 0), reader.ReadState(row)); // the old one stays whole for whoever maps it
        }
        File.WriteAllBytes(path, TestData.Random(4096, seed: 2));
        using (VersionTable replaced = VersionTable.OpenOrCreate(path, capacity: 4)) // damaged: a new file
            Assert.Equal(0UL, replaced.ReadState(0));
    }

    [Fact]
    public void Table_rows_are_named_unique_and_bounded()
    {
        using VersionTable table = VersionTable.Create(PathOf("table"), capacity: 2);
        Assert.Equal(0, table.Add("a"));
        Assert.Equal(1, table.Add("b"));
        Assert.Equal("b", table.Name(1));
        Assert.Contains("already", Assert.Throws<ArgumentException>(() => table.Add("a")).Message);
        Assert.Contains("is full", Assert.Throws<InvalidOperationException>(() => table.Add("c")).Message);
        Assert.Throws<ArgumentException>(() => table.Add(new string('x', 64)));
        Assert.Throws<ArgumentOutOfRangeException>(() => table.ReadState(2));
        Assert.Throws<ArgumentOutOfRangeException>(() => table.Activate(0, 0, 0, 0));
        Assert.Equal(0UL, table.ReadState(0)); // the refused activation changed nothing

        using VersionTable second = VersionTable.Open(table.Path);
        table.Activate(0, 5, 1, 9);
        Assert.Equal(VersionEntry.PackState(5, 1), second.ReadState(0));
    }

    [Fact]
    public void Files_that_are_not_tables_or_rings_are_refused_by_name()
    {
        string junk = PathOf("junk");
        File.WriteAllBytes(junk, TestData.Random(4096, seed: 1));
        Assert.Contains("not an nccl-swap version table", Assert.Throws<InvalidDataException>(() => VersionTable.Open(junk)).Message);
        Assert.Contains("not an nccl-swap ring", Assert.Throws<InvalidDataException>(() => SharedRing.Open(junk)).Message);
        string tiny = PathOf("tiny");
        File.WriteAllBytes(tiny, [1, 2, 3]);
        Assert.Contains("too small", Assert.Throws<InvalidDataException>(() => VersionTable.Open(tiny)).Message);

        using (VersionTable.Create(PathOf("cut"), 4))
        {
        }
        using (var stream = new FileStream(PathOf("cut"), FileMode.Open))
            stream.SetLength(100);
        Assert.Contains("rows need", Assert.Throws<InvalidDataException>(() => VersionTable.Open(PathOf("cut"))).Message);
    }

    [Fact]
    public void A_ring_carries_100k_requests_to_another_process_in_order_through_wraps_and_waits()
    {
        const int count = 100_000;
        using SharedRing ring = SharedRing.Create(PathOf("ring"), capacity: 64, entryBytes: Marshal.SizeOf<Request>());
        using PeerProcess consumer = PeerHost.Start(ChannelPeers.RingConsumer, ring.Path, $"{count}");
        consumer.WaitForLine("ready", TimeSpan.FromSeconds(60));
        var random = new Random(7);
        for (int i = 0; i < count; i++)
        {
            Request request = Messages.NewRequest(RequestKind.Publish, (ulong)i);
            request.PayloadBytes = (uint)random.Next(0, AbiConstants.PayloadBytes + 1);
            random.NextBytes(MemoryMarshal.AsBytes(new Span<PayloadBytes>(ref request.Payload)));
            request.Version = ChannelPeers.Checksum(request);
            if (i == count / 2)
                Thread.Sleep(300); // the consumer drains the ring and goes to sleep on the doorbell
            Assert.True(ring.Write(request, TimeSpan.FromSeconds(30)), $"no room for request {i} within 30 s");
        }
        Assert.True(consumer.WaitForExit(TimeSpan.FromSeconds(60)) == 0, consumer.ToString());
        Assert.Contains($"received {count}", consumer.Output);
        Assert.Equal(0, ring.Count);
    }

    [Fact]
    public void A_full_ring_refuses_and_an_empty_one_times_out()
    {
        using SharedRing ring = SharedRing.Create(PathOf("ring"), capacity: 2, entryBytes: 16);
        byte[] entry = TestData.Random(16, seed: 2);
        Assert.True(ring.TryWrite(entry));
        Assert.True(ring.TryWrite(entry));
        Assert.False(ring.TryWrite(entry));
        Assert.False(ring.Write(entry, TimeSpan.FromMilliseconds(50)));
        byte[] back = new byte[16];
        Assert.True(ring.TryRead(back));
        Assert.Equal(entry, back);
        Assert.True(ring.TryRead(back));
        var clock = System.Diagnostics.Stopwatch.StartNew();
        Assert.False(ring.Read(back, TimeSpan.FromMilliseconds(200)));
        Assert.InRange(clock.ElapsedMilliseconds, 150, 5000);
        Assert.Throws<ArgumentException>(() => ring.TryWrite(new byte[8]));
        Assert.Throws<ArgumentException>(() => SharedRing.Create(PathOf("bad"), 3, 16));
    }

    [Fact]
    public void Malformed_requests_are_described()
    {
        Request good = Messages.NewRequest(RequestKind.Ack, 1);
        Assert.Null(Messages.Validate(good));
        Assert.Contains("magic", Messages.Validate(good with { Magic = 0 }));
        Assert.Contains("kind 99 is unknown", Messages.Validate(good with { Kind = 99 }));
        Assert.Contains("exceeds 96", Messages.Validate(good with { PayloadBytes = 97 }));
        Response refused = Messages.NewResponse(good, -22, new string('é', 100));
        Assert.Equal(-22, refused.Status);
        Assert.Equal(1UL, refused.Id);
        Assert.Equal(96u, refused.DetailBytes); // 48 two-byte characters: cut at a character boundary
    }

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}

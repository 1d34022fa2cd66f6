using System.Diagnostics;
using NcclSwap.Testing;

namespace NcclSwap.DataPlane.Tests;

public class HostCollectiveTests
{
    private static readonly TimeSpan Generous = TimeSpan.FromSeconds(60);

    [Theory]
    [InlineData(2, 65_537)]
    [InlineData(3, 1_048_573)]
    public void Ranks_in_threads_exchange_exact_bytes(int size, int bytes)
    {
        int seed = TestData.NewSeed();
        using var backend = new HostBackend();
        string id = backend.CreateCollectiveId();
        byte[][] results = new byte[size][];
        Parallel.For(0, size, new ParallelOptions { MaxDegreeOfParallelism = size }, rank =>
        {
            using ICollective collective = backend.JoinCollective(id, rank, size, Generous);
            Assert.Equal(rank, collective.Rank);
            Assert.Equal(size, collective.Size);
            results[rank] = CollectivePeer.Exchange(backend, collective, seed, bytes);
        });
        for (int rank = 0; rank < size; rank++)
            Assert.True(CollectivePeer.Expected(rank, size, seed, bytes).AsSpan().SequenceEqual(results[rank]), $"rank {rank}, seed {seed}");
    }

    [Theory]
    [InlineData(2)]
    [InlineData(4)]
    public void Ranks_in_separate_processes_exchange_exact_bytes(int size)
    {
        int seed = TestData.NewSeed();
        const int bytes = 3_000_017;
        string id = HostCollective.CreateId();
        string folder = Directory.CreateTempSubdirectory("nccl-swap-collective-").FullName;
        var peers = new List<PeerProcess>();
        try
        {
            for (int rank = 0; rank < size; rank++)
                peers.Add(CollectivePeer.Start(id, rank, size, seed, bytes, "exchange", Path.Combine(folder, $"rank{rank}")));
            foreach (PeerProcess peer in peers)
                Assert.True(peer.WaitForExit(Generous) == 0, peer.ToString());
            for (int rank = 0; rank < size; rank++)
            {
                byte[] got = File.ReadAllBytes(Path.Combine(folder, $"rank{rank}"));
                Assert.True(CollectivePeer.Expected(rank, size, seed, bytes).AsSpan().SequenceEqual(got), $"rank {rank}, seed {seed}");
            }
        }
        finally
        {
            peers.ForEach(p => p.Dispose());
            Directory.Delete(folder, recursive: true);
        }
    }

    /// <summary>Rank 0 here, rank 1 in a process that joins and then never takes part.</summary>
    private static (ICollective Collective, PeerProcess Peer) JoinWithStalledPeer(HostBackend backend, TimeSpan timeout)
    {
        string id = backend.CreateCollectiveId();
        PeerProcess peer = CollectivePeer.Start(id, 1, 2, 1, 1, "stall", "/dev/null");
        ICollective collective = backend.JoinCollective(id, 0, 2, timeout);
        peer.WaitForLine("joined", Generous);
        return (collective, peer);
    }

    [Fact]
    public void A_killed_peer_ends_the_transfer_with_an_error_naming_it()
    {
        using var backend = new HostBackend();
        (ICollective collective, PeerProcess peer) = JoinWithStalledPeer(backend, TimeSpan.FromSeconds(30));
        using var _ = collective;
        using var __ = peer;

        // 256 MiB cannot sit in socket buffers, so the send is still in flight when the peer dies.
        const int bytes = 256 << 20;
        using IDeviceBuffer buffer = backend.Allocate(bytes);
        backend.Upload(TestData.Random(1 << 20, seed: 9), buffer);
        using ICopyStream stream = backend.CreateStream();
        var clock = Stopwatch.StartNew();
        using var killer = new Timer(_ => peer.Process.Kill(), null, dueTime: 300, period: Timeout.Infinite);
        var e = Assert.Throws<CollectiveException>(() => collective.Broadcast(buffer, 0, bytes, root: 0, stream));
        Assert.Equal(1, e.Peer);
        Assert.Contains("rank 1", e.Message);
        Assert.Contains($"pid {peer.Process.Id}", e.Message);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), $"took {clock.Elapsed}");

        // The collective is broken from then on, and says so.
        var again = Assert.Throws<CollectiveException>(() => collective.Send(buffer, 0, 1, 1, stream));
        Assert.Contains("unusable", again.Message);
    }

    [Fact]
    public void A_stalled_peer_misses_the_deadline_and_is_named()
    {
        using var backend = new HostBackend();
        (ICollective collective, PeerProcess peer) = JoinWithStalledPeer(backend, TimeSpan.FromSeconds(5));
        using var _ = collective;
        using var __ = peer;
        using IDeviceBuffer buffer = backend.Allocate(1000);
        byte[] before = TestData.Random(1000, seed: 4);
        backend.Upload(before, buffer);
        using ICopyStream stream = backend.CreateStream();
        var clock = Stopwatch.StartNew();
        var e = Assert.Throws<CollectiveException>(() => collective.Receive(buffer, 0, 1000, 1, stream));
        Assert.Equal(1, e.Peer);
        Assert.Contains("rank 1", e.Message);
        Assert.Contains("did not send SendReceive data within 5 s", e.Message);
        Assert.InRange(clock.Elapsed.TotalSeconds, 4.5, 20);
        byte[] after = new byte[1000];
        backend.Download(buffer, 0, after);
        Assert.Equal(before, after);
    }

    [Fact]
    public void A_peer_the_watch_declares_lost_ends_a_wait_in_flight_and_every_later_call_naming_it()
    {
        using var backend = new HostBackend();
        (ICollective collective, PeerProcess peer) = JoinWithStalledPeer(backend, TimeSpan.FromSeconds(30));
        using var _ = collective;
        using var __ = peer;
        PeerLoss? lost = null;
        collective.WatchPeers(() => lost);
        using IDeviceBuffer buffer = backend.Allocate(1000);
        using ICopyStream stream = backend.CreateStream();
        var clock = Stopwatch.StartNew();
        var declare = new Thread(() =>
        {
            Thread.Sleep(500);
            lost = new PeerLoss(1, "rank 1 (a test's peer) sent nothing for 5 s");
        });
        declare.Start();
        var e = Assert.Throws<CollectiveException>(() => collective.Receive(buffer, 0, 1000, 1, stream));
        declare.Join();
        Assert.Equal(1, e.Peer);
        Assert.Contains("sent nothing for 5 s", e.Message);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(10), $"the wait ended after {clock.Elapsed}, not at the loss (the deadline is 30 s)");
        var later = Assert.Throws<CollectiveException>(() => collective.Send(buffer, 0, 1000, 1, stream));
        Assert.Equal(1, later.Peer);
        Assert.Contains("sent nothing for 5 s", later.Message);
    }

    [Fact]
    public void Mismatched_operations_are_reported_not_misread()
    {
        using var backend = new HostBackend();
        string id = backend.CreateCollectiveId();
        string? error = null;
        Parallel.For(0, 2, new ParallelOptions { MaxDegreeOfParallelism = 2 }, rank =>
        {
            using ICollective collective = backend.JoinCollective(id, rank, 2, Generous);
            using IDeviceBuffer buffer = backend.Allocate(4096);
            using ICopyStream stream = backend.CreateStream();
            if (rank == 0)
            {
                collective.Send(buffer, 0, 100, 1, stream);
            }
            else
            {
                var e = Assert.Throws<CollectiveException>(() => collective.Receive(buffer, 0, 4096, 0, stream));
                error = e.Message;
            }
        });
        Assert.Contains("expected SendReceive of 4096 bytes from rank 0", error);
        Assert.Contains("it sent SendReceive of 100 bytes", error);
    }

    [Fact]
    public void Ranks_that_disagree_on_the_size_are_refused_by_the_root()
    {
        using var backend = new HostBackend();
        string id = backend.CreateCollectiveId();
        Exception? firstError = null;
        var first = new Thread(() => firstError = Record.Exception(() => backend.JoinCollective(id, 0, 2, TimeSpan.FromSeconds(3))));
        first.Start();
        Thread.Sleep(200);
        var e = Assert.Throws<CollectiveException>(() => backend.JoinCollective(id, 1, 3, TimeSpan.FromSeconds(10)));
        Assert.Contains("says the collective has 3 ranks, but rank 0 said 2", e.Message);
        first.Join();
        var timedOut = Assert.IsType<CollectiveException>(firstError);
        Assert.Contains("did not send the member table within 3 s", timedOut.Message);
    }

    [Fact]
    public void Bad_roots_and_peers_are_refused_before_anything_is_sent()
    {
        using var backend = new HostBackend();
        using ICollective single = backend.JoinCollective(backend.CreateCollectiveId(), 0, 1, Generous);
        using IDeviceBuffer buffer = backend.Allocate(64);
        using ICopyStream stream = backend.CreateStream();
        Assert.Contains("root 1 is not a rank of this collective of 1",
            Assert.Throws<ArgumentOutOfRangeException>(() => single.Broadcast(buffer, 0, 64, 1, stream)).Message);
        Assert.Contains("rank 0 cannot send to or receive from itself outside a group",
            Assert.Throws<ArgumentException>(() => single.Send(buffer, 0, 64, 0, stream)).Message);
        Assert.Contains("names a rank twice", Assert.Throws<ArgumentException>(() => single.Subset([0, 0])).Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => single.Subset([1]));
        // A group whose sends to itself and receives from itself do not pair is refused, naming the counts.
        var unpaired = Assert.Throws<CollectiveException>(() =>
        {
            using (single.Group())
                single.Send(buffer, 0, 64, 0, stream);
        });
        Assert.Contains("sent to this rank itself 1 time(s) but received from it 0 time(s)", unpaired.Message);
        Assert.Throws<ArgumentOutOfRangeException>(() => single.Receive(buffer, 0, 64, -1, stream));
        single.Broadcast(buffer, 0, 64, 0, stream); // still usable: a broadcast of one rank moves nothing
    }

    [Theory]
    [InlineData("nccl:00")]
    [InlineData("tcp:not-an-address")]
    public void Bad_ids_are_refused(string id)
    {
        using var backend = new HostBackend();
        var e = Assert.Throws<ArgumentException>(() => backend.JoinCollective(id, 0, 1, TimeSpan.FromSeconds(1)));
        Assert.Contains(id, e.Message);
    }
}

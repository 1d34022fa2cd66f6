using NcclSwap.Cuda;
using NcclSwap.DataPlane;
using NcclSwap.Testing;

namespace NcclSwap.Gpu.Tests;

public class NcclTests
{
    [Fact]
    public void One_rank_inits_by_unique_id_and_broadcasts_and_all_gathers()
    {
        using CudaContext context = Gpu.RequireNccl();
        NcclUniqueId id = NcclLibrary.CreateUniqueId();
        using var comm = NcclCommunicator.InitRank(context, 1, id, 0);
        Assert.Equal(0, comm.Rank);
        Assert.Equal(1, comm.Count);
        Assert.Equal(0, comm.Device);

        const int size = 3_000_007;
        byte[] data = TestData.Random(size, seed: 61);
        using var send = DeviceBuffer.Allocate(context, size);
        using var receive = DeviceBuffer.Allocate(context, size);
        using var gathered = DeviceBuffer.Allocate(context, size);
        using var stream = CudaStream.Create(context);
        send.CopyFrom(data);
        receive.Fill(0xCC);
        gathered.Fill(0xDD);
        comm.Broadcast(send.Address, receive.Address, size, root: 0, stream);
        comm.AllGather(send.Address, gathered.Address, size, stream);
        stream.Synchronize();
        Assert.Equal(NcclResult.Success, comm.GetAsyncError());

        byte[] back = new byte[size];
        receive.CopyTo(back);
        Assert.Equal(data, back);
        gathered.CopyTo(back);
        Assert.Equal(data, back);
    }

    [Fact]
    public void Non_blocking_init_split_grouped_send_receive_and_abort()
    {
        using CudaContext context = Gpu.RequireNccl();
        var comm = NcclCommunicator.InitRank(context, 1, NcclLibrary.CreateUniqueId(), 0, blocking: false, TimeSpan.FromSeconds(60));
        Assert.False(comm.IsBlocking);
        Assert.Equal(NcclResult.Success, comm.GetAsyncError());

        using (NcclCommunicator? split = comm.Split(color: 0, key: 0, TimeSpan.FromSeconds(60)))
        {
            Assert.NotNull(split);
            Assert.Equal(1, split.Count);
            const int size = 1_048_579;
            byte[] data = TestData.Random(size, seed: 62);
            using var a = DeviceBuffer.Allocate(context, size);
            using var b = DeviceBuffer.Allocate(context, size);
            using var stream = CudaStream.Create(context);
            a.CopyFrom(data);
            b.Fill(0xCC);
            using (NcclCommunicator.Group())
            {
                split.Send(a.Address, size, peer: 0, stream);
                split.Receive(b.Address, size, peer: 0, stream);
            }
            split.WaitReady(TimeSpan.FromSeconds(60), "grouped send/receive");
            stream.Synchronize();
            byte[] back = new byte[size];
            b.CopyTo(back);
            Assert.Equal(data, back);
        }
        Assert.Null(comm.Split(color: -1, key: 0, TimeSpan.FromSeconds(60)));

        comm.Abort();
        comm.Abort();
        comm.Dispose();
        Assert.True(comm.IsDisposed);
        Assert.Throws<ObjectDisposedException>(() => comm.GetAsyncError());
    }

    [Fact]
    public void The_cuda_backend_collective_moves_bytes_through_the_seam()
    {
        using CudaContext probe = Gpu.RequireNccl();
        using var backend = new CudaBackend(0);
        using ICollective collective = backend.JoinCollective(backend.CreateCollectiveId(), 0, 1, TimeSpan.FromSeconds(60));
        const int size = 2_000_003;
        byte[] data = TestData.Random(size, seed: 63);
        using IDeviceBuffer buffer = backend.Allocate(size);
        using IDeviceBuffer gathered = backend.Allocate(size);
        using ICopyStream stream = backend.CreateStream();
        backend.Upload(data, buffer);
        collective.Broadcast(buffer, 0, size, 0, stream);
        collective.AllGather(buffer, 0, gathered, 0, size, stream);
        stream.Synchronize();
        byte[] back = new byte[size];
        backend.Download(gathered, 0, back);
        Assert.Equal(data, back);

        // Bad arguments are refused before NCCL sees them, and the collective stays usable.
        var root = Assert.Throws<ArgumentOutOfRangeException>(() => collective.Broadcast(buffer, 0, size, 5, stream));
        Assert.Contains("root 5 is not a rank of this collective of 1", root.Message);
        Assert.Throws<ArgumentException>(() => collective.Send(buffer, 0, 16, 0, stream));
        Assert.Throws<ArgumentOutOfRangeException>(() => collective.AllGather(buffer, 1, gathered, 0, size, stream));
        byte[] next = TestData.Random(size, seed: 64);
        backend.Upload(next, buffer);
        collective.AllGather(buffer, 0, gathered, 0, size, stream);
        stream.Synchronize();
        backend.Download(gathered, 0, back);
        Assert.Equal(next, back);
    }

    [Fact]
    public void Ranks_on_separate_gpus_in_separate_processes_exchange_exact_bytes()
    {
        Gpu.RequireNccl().Dispose();
        int size = Math.Min(CudaDriver.DeviceCount, 8);
        Assert.SkipWhen(size < 2, $"needs 2 GPUs for 2 NCCL ranks (NCCL refuses two ranks on one GPU); this machine has {size}");
        int seed = TestData.NewSeed();
        const int bytes = 64 * 1_048_576 + 7;
        string id = "nccl:" + NcclLibrary.CreateUniqueId().ToHex(); // this process hosts NCCL's bootstrap root
        string folder = Directory.CreateTempSubdirectory("nccl-swap-nccl-").FullName;
        var peers = new List<PeerProcess>();
        try
        {
            for (int rank = 0; rank < size; rank++)
                peers.Add(DataPlane.Tests.CollectivePeer.Start(id, rank, size, seed, bytes, "exchange", Path.Combine(folder, $"rank{rank}"), $"cuda:{rank}"));
            foreach (PeerProcess peer in peers)
                Assert.True(peer.WaitForExit(TimeSpan.FromMinutes(3)) == 0, peer.ToString());
            for (int rank = 0; rank < size; rank++)
            {
                byte[] got = File.ReadAllBytes(Path.Combine(folder, $"rank{rank}"));
                Assert.True(DataPlane.Tests.CollectivePeer.Expected(rank, size, seed, bytes).AsSpan().SequenceEqual(got), $"rank {rank} of {size}, seed {seed}");
            }
        }
        finally
        {
            peers.ForEach(p => p.Dispose());
            Directory.Delete(folder, recursive: true);
        }
    }
}

using System.Globalization;
using NcclSwap.Testing;

namespace NcclSwap.DataPlane.Tests;

/// <summary>
/// One rank of a multi-process collective test, run in its own process. Scenarios:
/// <c>exchange</c> runs a broadcast, an all-gather, a ring of paired sends and receives, a send to itself and a
/// broadcast on a subset of the ranks, and writes what it received to a file; <c>stall</c> joins and then never takes part. The backend is <c>host</c> or
/// <c>cuda:N</c> (device N, NCCL), so the same rank runs in the CPU tests and in the GPU suite.
/// </summary>
internal static class CollectivePeer
{
    public const string Role = "collective";

    public static PeerProcess Start(string id, int rank, int size, int seed, int bytes, string scenario, string output, string backend = "host") =>
        PeerHost.Start(Role, id, $"{rank}", $"{size}", $"{seed}", $"{bytes}", scenario, output, backend);

    public static int Run(string[] args)
    {
        string id = args[0];
        int rank = int.Parse(args[1], CultureInfo.InvariantCulture);
        int size = int.Parse(args[2], CultureInfo.InvariantCulture);
        int seed = int.Parse(args[3], CultureInfo.InvariantCulture);
        int bytes = int.Parse(args[4], CultureInfo.InvariantCulture);
        string scenario = args[5];
        string output = args[6];
        string kind = args[7];

        using IBackend backend = kind.StartsWith("cuda:", StringComparison.Ordinal)
            ? new CudaBackend(int.Parse(kind["cuda:".Length..], CultureInfo.InvariantCulture))
            : new HostBackend();
        using ICollective collective = backend.JoinCollective(id, rank, size, TimeSpan.FromSeconds(30));
        Console.WriteLine("joined");
        if (scenario == "stall")
        {
            Thread.Sleep(Timeout.Infinite);
            return 0;
        }
        byte[] received = Exchange(backend, collective, seed, bytes);
        File.WriteAllBytes(output, received);
        Console.WriteLine("done");
        return 0;
    }

    /// <summary>
    /// What <see cref="Exchange"/> must produce on <paramref name="rank"/>: broadcast | all-gather | ring receive |
    /// its own bytes sent to itself | the subset's broadcast (the last rank's bytes on the last rank and rank 0; a rank
    /// outside the subset keeps what it had).
    /// </summary>
    public static byte[] Expected(int rank, int size, int seed, int bytes)
    {
        var expected = new List<byte>();
        expected.AddRange(TestData.Random(bytes, seed));
        for (int r = 0; r < size; r++)
            expected.AddRange(TestData.Random(bytes, seed + 1 + r));
        expected.AddRange(TestData.Random(bytes, seed + 1000 + (rank + size - 1) % size));
        expected.AddRange(TestData.Random(bytes, seed + 1000 + rank));
        expected.AddRange(rank == 0 || rank == size - 1 ? TestData.Random(bytes, seed + 2000 + size - 1) : TestData.Random(bytes, seed + 2000 + rank));
        return [.. expected];
    }

    public static byte[] Exchange(IBackend backend, ICollective collective, int seed, int bytes)
    {
        int rank = collective.Rank, size = collective.Size;
        using ICopyStream stream = backend.CreateStream();

        using IDeviceBuffer broadcast = backend.Allocate(bytes);
        backend.Upload(rank == 0 ? TestData.Random(bytes, seed) : TestData.Random(bytes, seed ^ 0x5555), broadcast);
        collective.Broadcast(broadcast, 0, bytes, root: 0, stream);

        using IDeviceBuffer mine = backend.Allocate(bytes);
        using IDeviceBuffer gathered = backend.Allocate((long)bytes * size);
        backend.Upload(TestData.Random(bytes, seed + 1 + rank), mine);
        collective.AllGather(mine, 0, gathered, 0, bytes, stream);

        using IDeviceBuffer outgoing = backend.Allocate(bytes);
        using IDeviceBuffer incoming = backend.Allocate(bytes);
        backend.Upload(TestData.Random(bytes, seed + 1000 + rank), outgoing);
        using (collective.Group())
        {
            collective.Send(outgoing, 0, bytes, (rank + 1) % size, stream);
            collective.Receive(incoming, 0, bytes, (rank + size - 1) % size, stream);
        }
        stream.Synchronize();

        using IDeviceBuffer self = backend.Allocate(bytes);
        using (collective.Group())
        {
            collective.Send(outgoing, 0, bytes, rank, stream);
            collective.Receive(self, 0, bytes, rank, stream);
        }

        // The last rank and rank 0, in that order: the last rank is the subset's root.
        using IDeviceBuffer subsetBytes = backend.Allocate(bytes);
        backend.Upload(TestData.Random(bytes, seed + 2000 + rank), subsetBytes);
        using (ICollective? subset = collective.Subset(size == 1 ? [0] : [size - 1, 0]))
        {
            if (subset is not null)
            {
                using (subset.Group())
                    subset.Broadcast(subsetBytes, 0, bytes, root: 0, stream);
            }
            stream.Synchronize();
        }

        byte[] result = new byte[bytes * (size + 4)];
        backend.Download(broadcast, 0, result.AsSpan(0, bytes));
        backend.Download(gathered, 0, result.AsSpan(bytes, bytes * size));
        backend.Download(incoming, 0, result.AsSpan(bytes * (size + 1), bytes));
        backend.Download(self, 0, result.AsSpan(bytes * (size + 2), bytes));
        backend.Download(subsetBytes, 0, result.AsSpan(bytes * (size + 3), bytes));
        return result;
    }
}

using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace NcclSwap.DataPlane;

/// <summary>
/// The host backend's collective: one TCP connection between every pair of ranks, set up through a
/// rendezvous root as NCCL's bootstrap does. The id (<c>tcp:HOST:PORT</c>) names the root, which the
/// process calling <see cref="CreateId"/> runs in the background until every rank has joined.
/// </summary>
public sealed class HostCollective : ICollective
{
    internal const string Scheme = "tcp:";
    private const int Magic = 0x4E535750; // "NSWP"
    private const int HeaderBytes = 16;

    private readonly Socket?[] _peers;
    private readonly PeerInfo[] _members;
    private readonly TimeSpan _timeout;
    private readonly List<Transfer> _pending = [];
    private int _groupDepth;
    private volatile string? _broken;
    private volatile PeerLoss? _lostPeer;
    private Timer? _watch;

    private HostCollective(int rank, PeerInfo[] members, Socket?[] peers, TimeSpan timeout)
    {
        Rank = rank;
        _members = members;
        _peers = peers;
        _timeout = timeout;
    }

    public int Rank { get; }

    public int Size => _members.Length;

    /// <summary>Starts a rendezvous root on loopback and returns its id.</summary>
    public static string CreateId(TimeSpan? lifetime = null)
    {
        var root = new RendezvousRoot(lifetime ?? TimeSpan.FromMinutes(10));
        return $"{Scheme}{root.EndPoint}";
    }

    public static HostCollective Join(string id, int rank, int size, TimeSpan timeout)
    {
        ArgumentNullException.ThrowIfNull(id);
        if (!id.StartsWith(Scheme, StringComparison.Ordinal) || !IPEndPoint.TryParse(id[Scheme.Length..], out IPEndPoint? root))
            throw new ArgumentException($"'{id}' is not a host collective id (expected tcp:ADDRESS:PORT).", nameof(id));
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(size);
        if ((uint)rank >= (uint)size)
            throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} is not in [0, {size}).");

        var deadline = Stopwatch.StartNew();
        TimeSpan Left() => timeout - deadline.Elapsed > TimeSpan.Zero ? timeout - deadline.Elapsed : TimeSpan.Zero;

        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start(size);
        int myPort = ((IPEndPoint)listener.LocalEndpoint).Port;

        PeerInfo[] members;
        using (Socket bootstrap = Connect(root, Left(), $"the rendezvous root {root}", null))
        using (var stream = new NetworkStream(bootstrap))
        {
            bootstrap.ReceiveTimeout = (int)Math.Max(1, Left().TotalMilliseconds);
            var writer = new BinaryWriter(stream);
            writer.Write(Magic);
            writer.Write(rank);
            writer.Write(size);
            new PeerInfo(myPort, Environment.ProcessId, Environment.MachineName).Write(writer);
            writer.Flush();
            var reader = new BinaryReader(stream, Encoding.UTF8);
            try
            {
                if (reader.ReadInt32() != 0)
                    throw new CollectiveException($"rank {rank}: the rendezvous root {root} refused to join: {reader.ReadString()}", null);
                members = new PeerInfo[size];
                for (int r = 0; r < size; r++)
                    members[r] = PeerInfo.Read(reader);
            }
            catch (IOException e)
            {
                throw new CollectiveException(
                    $"rank {rank}: the rendezvous root {root} did not send the member table within {timeout.TotalSeconds:0.#} s (are all {size} ranks started?)", null, e);
            }
        }

        var peers = new Socket?[size];
        try
        {
            // Higher ranks connect to lower ones, so every pair has exactly one connection.
            for (int peer = 0; peer < rank; peer++)
            {
                Socket socket = Connect(new IPEndPoint(IPAddress.Loopback, members[peer].Port), Left(), $"rank {peer} ({members[peer]})", peer);
                socket.Send(BitConverter.GetBytes(rank));
                peers[peer] = socket;
            }
            for (int accepted = rank + 1; accepted < size; accepted++)
            {
                using var cancel = new CancellationTokenSource(Left());
                Socket socket;
                try
                {
                    socket = listener.AcceptSocketAsync(cancel.Token).AsTask().GetAwaiter().GetResult();
                }
                catch (OperationCanceledException)
                {
                    int[] missing = Enumerable.Range(rank + 1, size - rank - 1).Where(p => peers[p] is null).ToArray();
                    throw new CollectiveException(
                        $"rank {rank}: rank {missing[0]} ({members[missing[0]]}) did not connect within {timeout.TotalSeconds:0.#} s", missing[0]);
                }
                byte[] who = new byte[4];
                socket.ReceiveTimeout = (int)Math.Max(1, Left().TotalMilliseconds);
                ReceiveExactly(socket, who, peer: null, rank, "the handshake");
                int peerRank = BitConverter.ToInt32(who);
                if (peerRank <= rank || peerRank >= size || peers[peerRank] is not null)
                    throw new CollectiveException($"rank {rank}: unexpected handshake from rank {peerRank}", peerRank);
                peers[peerRank] = socket;
            }
        }
        catch
        {
            foreach (Socket? socket in peers)
                socket?.Dispose();
            throw;
        }

        foreach (Socket? socket in peers)
        {
            if (socket is null)
                continue;
            socket.NoDelay = true;
            socket.SendBufferSize = socket.ReceiveBufferSize = 4 << 20;
            socket.SendTimeout = socket.ReceiveTimeout = (int)Math.Min(int.MaxValue, timeout.TotalMilliseconds);
        }
        return new HostCollective(rank, members, peers, timeout);
    }

    public void Broadcast(IDeviceBuffer buffer, long offset, long length, int root, ICopyStream stream)
    {
        CollectiveArguments.CheckRank(root, Size, "root");
        Span<byte> span = HostBackend.AsHost(buffer).GetSpan(offset, length);
        var transfers = new List<Transfer>();
        unsafe
        {
            fixed (byte* p = span)
            {
                if (Rank == root)
                {
                    for (int peer = 0; peer < Size; peer++)
                        if (peer != Rank)
                            transfers.Add(new Transfer(Operation.Broadcast, peer, Send: true, (nint)p, length));
                }
                else
                {
                    transfers.Add(new Transfer(Operation.Broadcast, root, Send: false, (nint)p, length));
                }
            }
        }
        Issue(transfers);
    }

    public void AllGather(IDeviceBuffer send, long sendOffset, IDeviceBuffer receive, long receiveOffset, long bytesPerRank, ICopyStream stream)
    {
        Span<byte> mine = HostBackend.AsHost(send).GetSpan(sendOffset, bytesPerRank);
        HostDeviceBuffer target = HostBackend.AsHost(receive);
        target.GetSpan(receiveOffset, checked(bytesPerRank * Size)); // the whole range must fit
        mine.CopyTo(target.GetSpan(receiveOffset + Rank * bytesPerRank, bytesPerRank));
        var transfers = new List<Transfer>();
        unsafe
        {
            fixed (byte* own = mine)
            {
                for (int peer = 0; peer < Size; peer++)
                {
                    if (peer == Rank)
                        continue;
                    transfers.Add(new Transfer(Operation.AllGather, peer, Send: true, (nint)own, bytesPerRank));
                    fixed (byte* slot = target.GetSpan(receiveOffset + peer * bytesPerRank, bytesPerRank))
                        transfers.Add(new Transfer(Operation.AllGather, peer, Send: false, (nint)slot, bytesPerRank));
                }
            }
        }
        Issue(transfers);
    }

    public unsafe void Send(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream)
    {
        CollectiveArguments.CheckPeer(peer, Rank, Size, _groupDepth > 0);
        fixed (byte* p = HostBackend.AsHost(buffer).GetSpan(offset, length))
            Issue([new Transfer(Operation.SendReceive, peer, Send: true, (nint)p, length)]);
    }

    public unsafe void Receive(IDeviceBuffer buffer, long offset, long length, int peer, ICopyStream stream)
    {
        CollectiveArguments.CheckPeer(peer, Rank, Size, _groupDepth > 0);
        fixed (byte* p = HostBackend.AsHost(buffer).GetSpan(offset, length))
            Issue([new Transfer(Operation.SendReceive, peer, Send: false, (nint)p, length)]);
    }

    public IDisposable Group()
    {
        ThrowIfBroken();
        _groupDepth++;
        return new GroupScope(this);
    }

    public void Abort()
    {
        _broken ??= "the collective was aborted";
        foreach (Socket? socket in _peers)
            socket?.Dispose();
    }

    /// <summary>Polls <paramref name="lost"/> every 100 ms; once it names a rank, closes the links, so that transfers in flight end naming it.</summary>
    public void WatchPeers(Func<PeerLoss?> lost)
    {
        _watch?.Dispose();
        _watch = new Timer(_ =>
        {
            if (_lostPeer is null && lost() is { } loss)
            {
                _lostPeer = loss;
                Abort();
            }
        }, null, TimeSpan.FromMilliseconds(100), TimeSpan.FromMilliseconds(100));
    }

    public void Dispose()
    {
        _watch?.Dispose();
        Abort();
    }

    private void EndGroup()
    {
        if (--_groupDepth > 0)
            return;
        Transfer[] work = [.. _pending];
        _pending.Clear();
        Execute(work);
    }

    // Host buffers are unmanaged memory, so the raw pointers taken above stay valid after `fixed` ends.
    private void Issue(List<Transfer> transfers)
    {
        ThrowIfBroken();
        if (_groupDepth > 0)
            _pending.AddRange(transfers);
        else
            Execute(transfers);
    }

    /// <summary>Runs transfers: those to one peer in one direction in issue order, the rest concurrently.</summary>
    private void Execute(IReadOnlyList<Transfer> transfers)
    {
        CopyToSelf(transfers.Where(t => t.Peer == Rank).ToList());
        transfers = transfers.Where(t => t.Peer != Rank).ToList();
        if (transfers.Count == 0)
            return;
        Task[] lanes = transfers
            .GroupBy(t => (t.Peer, t.Send))
            .Select(lane => Task.Factory.StartNew(() =>
            {
                foreach (Transfer transfer in lane)
                    Run(transfer);
            }, TaskCreationOptions.LongRunning))
            .ToArray();
        try
        {
            Task.WaitAll(lanes);
        }
        catch (AggregateException e)
        {
            Exception first = e.Flatten().InnerExceptions.OrderBy(x => x is CollectiveException { Peer: not null } ? 0 : 1).First();
            throw first is CollectiveException ? first : new CollectiveException($"rank {Rank}: {first.Message}", null, first);
        }
    }

    /// <summary>A group's sends to this rank itself, each copied into its receive from itself, in order.</summary>
    private unsafe void CopyToSelf(List<Transfer> transfers)
    {
        List<Transfer> sends = transfers.Where(t => t.Send).ToList(), receives = transfers.Where(t => !t.Send).ToList();
        if (sends.Count != receives.Count)
            throw new CollectiveException($"rank {Rank}: a group sent to this rank itself {sends.Count} time(s) but received from it {receives.Count} time(s)", Rank);
        for (int i = 0; i < sends.Count; i++)
        {
            if (sends[i].Length != receives[i].Length)
                throw new CollectiveException(
                    $"rank {Rank}: send {i} to itself has {sends[i].Length} bytes but the receive it pairs with has {receives[i].Length}", Rank);
            Buffer.MemoryCopy((void*)sends[i].Pointer, (void*)receives[i].Pointer, receives[i].Length, sends[i].Length);
        }
    }

    private unsafe void Run(Transfer t)
    {
        Socket socket = _peers[t.Peer] ?? throw new InvalidOperationException($"no connection to rank {t.Peer}");
        Span<byte> header = stackalloc byte[HeaderBytes];
        try
        {
            if (t.Send)
            {
                BitConverter.TryWriteBytes(header, (int)t.Operation);
                BitConverter.TryWriteBytes(header[4..], Rank);
                BitConverter.TryWriteBytes(header[8..], t.Length);
                SendAll(socket, header);
                for (long done = 0; done < t.Length;)
                {
                    int chunk = (int)Math.Min(t.Length - done, 1 << 30);
                    SendAll(socket, new ReadOnlySpan<byte>((byte*)t.Pointer + done, chunk));
                    done += chunk;
                }
            }
            else
            {
                ReceiveExactly(socket, header, t.Peer, Rank, t.Operation.ToString());
                var operation = (Operation)BitConverter.ToInt32(header);
                long length = BitConverter.ToInt64(header[8..]);
                if (operation != t.Operation || length != t.Length)
                    throw new CollectiveException(
                        $"rank {Rank}: expected {t.Operation} of {t.Length} bytes from rank {t.Peer} ({_members[t.Peer]}) but it sent {operation} of {length} bytes: the ranks issued different operations", t.Peer);
                for (long done = 0; done < t.Length;)
                {
                    int chunk = (int)Math.Min(t.Length - done, 1 << 30);
                    ReceiveExactly(socket, new Span<byte>((byte*)t.Pointer + done, chunk), t.Peer, Rank, t.Operation.ToString());
                    done += chunk;
                }
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or IOException)
        {
            _broken ??= $"an earlier {t.Operation} with rank {t.Peer} failed";
            if (_lostPeer is { } loss)
                throw new CollectiveException($"rank {Rank}: {t.Operation} with rank {t.Peer} ended: {loss.Why}", loss.Rank, e);
            string what = e is SocketException { SocketErrorCode: SocketError.TimedOut or SocketError.WouldBlock }
                ? $"rank {t.Peer} ({_members[t.Peer]}) did not {(t.Send ? "take" : "send")} {t.Operation} data within {_timeout.TotalSeconds:0.#} s"
                : $"the link to rank {t.Peer} ({_members[t.Peer]}) failed during {t.Operation}: {e.Message}";
            Abort();
            throw new CollectiveException($"rank {Rank}: {what}", t.Peer, e);
        }
        catch (CollectiveException e)
        {
            _broken ??= $"an earlier {t.Operation} with rank {t.Peer} failed";
            Abort();
            if (_lostPeer is { } loss && e.Peer != loss.Rank)
                throw new CollectiveException($"rank {Rank}: {t.Operation} with rank {t.Peer} ended: {loss.Why}", loss.Rank, e);
            throw;
        }
    }

    private static void SendAll(Socket socket, ReadOnlySpan<byte> data)
    {
        while (!data.IsEmpty)
            data = data[socket.Send(data)..];
    }

    private static void ReceiveExactly(Socket socket, Span<byte> data, int? peer, int rank, string operation)
    {
        while (!data.IsEmpty)
        {
            int got = socket.Receive(data);
            if (got == 0)
                throw new CollectiveException(
                    $"rank {rank}: {(peer is null ? "a peer" : $"rank {peer}")} closed its connection during {operation} (its process ended or aborted)", peer);
            data = data[got..];
        }
    }

    private static Socket Connect(IPEndPoint endPoint, TimeSpan timeout, string what, int? peer)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            var socket = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                using var cancel = new CancellationTokenSource(timeout - clock.Elapsed > TimeSpan.Zero ? timeout - clock.Elapsed : TimeSpan.Zero);
                socket.ConnectAsync(endPoint, cancel.Token).AsTask().GetAwaiter().GetResult();
                return socket;
            }
            catch (Exception e) when (e is SocketException or OperationCanceledException)
            {
                socket.Dispose();
                if (clock.Elapsed >= timeout)
                    throw new CollectiveException($"could not connect to {what} at {endPoint} within {timeout.TotalSeconds:0.#} s: {e.Message}", peer, e);
                Thread.Sleep(20);
            }
        }
    }

    private void ThrowIfBroken()
    {
        if (_lostPeer is { } loss)
            throw new CollectiveException($"rank {Rank}: the collective was aborted: {loss.Why}", loss.Rank);
        if (_broken is { } why)
            throw new CollectiveException($"rank {Rank}: the collective is unusable ({why}); dispose it and join a new one", null);
    }

    private enum Operation
    {
        Broadcast = 1,
        AllGather = 2,
        SendReceive = 3,
    }

    private readonly record struct Transfer(Operation Operation, int Peer, bool Send, nint Pointer, long Length);

    private sealed class GroupScope(HostCollective owner) : IDisposable
    {
        private bool _ended;

        public void Dispose()
        {
            if (_ended)
                return;
            _ended = true;
            owner.EndGroup();
        }
    }

    /// <summary>Where a rank listens and which process it is, for connecting and for error messages.</summary>
    internal readonly record struct PeerInfo(int Port, int ProcessId, string Host)
    {
        public void Write(BinaryWriter writer)
        {
            writer.Write(Port);
            writer.Write(ProcessId);
            writer.Write(Host);
        }

        public static PeerInfo Read(BinaryReader reader) => new(reader.ReadInt32(), reader.ReadInt32(), reader.ReadString());

        public override string ToString() => $"pid {ProcessId} on {Host}, port {Port}";
    }

    /// <summary>Collects one hello per rank, then sends every rank the member table (or the reason it cannot join).</summary>
    private sealed class RendezvousRoot
    {
        private readonly TcpListener _listener = new(IPAddress.Loopback, 0);

        public RendezvousRoot(TimeSpan lifetime)
        {
            _listener.Start();
            EndPoint = (IPEndPoint)_listener.LocalEndpoint;
            _ = Task.Run(() => Serve(lifetime));
        }

        public IPEndPoint EndPoint { get; }

        private async Task Serve(TimeSpan lifetime)
        {
            var joined = new SortedDictionary<int, (Socket Socket, PeerInfo Info)>();
            int size = -1;
            using var cancel = new CancellationTokenSource(lifetime);
            try
            {
                while (size < 0 || joined.Count < size)
                {
                    Socket socket = await _listener.AcceptSocketAsync(cancel.Token);
                    socket.ReceiveTimeout = 10_000;
                    var stream = new NetworkStream(socket);
                    var reader = new BinaryReader(stream, Encoding.UTF8, leaveOpen: true);
                    string? refusal = null;
                    int rank = -1, claimedSize = -1;
                    PeerInfo info = default;
                    try
                    {
                        if (reader.ReadInt32() != Magic)
                            refusal = "not an nccl-swap host collective hello";
                        else
                        {
                            rank = reader.ReadInt32();
                            claimedSize = reader.ReadInt32();
                            info = PeerInfo.Read(reader);
                        }
                    }
                    catch (IOException)
                    {
                        socket.Dispose();
                        continue;
                    }
                    if (refusal is null && size >= 0 && claimedSize != size)
                        refusal = $"rank {rank} ({info}) says the collective has {claimedSize} ranks, but rank {joined.Keys.First()} said {size}";
                    else if (refusal is null && (rank < 0 || rank >= claimedSize))
                        refusal = $"rank {rank} is not in [0, {claimedSize})";
                    else if (refusal is null && joined.ContainsKey(rank))
                        refusal = $"rank {rank} joined twice ({joined[rank].Info} and {info})";
                    if (refusal is not null)
                    {
                        var writer = new BinaryWriter(stream);
                        writer.Write(1);
                        writer.Write(refusal);
                        writer.Flush();
                        socket.Dispose();
                        continue;
                    }
                    size = claimedSize;
                    joined[rank] = (socket, info);
                }
                var table = new MemoryStream();
                var tableWriter = new BinaryWriter(table);
                tableWriter.Write(0);
                foreach (var (_, (_, info)) in joined)
                    info.Write(tableWriter);
                tableWriter.Flush();
                foreach (var (_, (socket, _)) in joined)
                    socket.Send(table.ToArray());
            }
            catch (Exception e) when (e is OperationCanceledException or SocketException or IOException)
            {
                // Ranks that did join time out with a message naming the root; nothing else to report here.
            }
            finally
            {
                foreach (var (_, (socket, _)) in joined)
                    socket.Dispose();
                _listener.Stop();
            }
        }
    }
}

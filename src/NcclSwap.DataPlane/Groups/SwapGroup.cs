using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace NcclSwap.DataPlane;

/// <summary>
/// This agent's part of a swap group: one rank, backend and collective per GPU it drives (<see cref="SwapGroupConfig"/>).
/// <see cref="Form"/> bootstraps it the way NCCL expects: member 0 (the root) listens at the configured address, every
/// member reports there (its host, process and devices, checked against the configuration), and once all have, the
/// root hands every member the id of a new collective (an NCCL unique id on GPUs) and the table of who is where; each
/// member then joins with all its ranks at once, a thread per GPU. Errors name the member, host and ranks at fault.
/// <see cref="RunOnEachRank{T}"/> runs work on every local rank; a failure on any aborts the group and leaves it
/// unusable: form a new one for the next update (the abort and re-create that a dead peer calls for).
/// </summary>
public sealed class SwapGroup : IDisposable
{
    private const int Magic = 0x4E534752; // "NSGR"
    private readonly (string Host, int Pid)[] _table;
    private readonly GroupWatch _watch;
    private volatile string? _broken;

    private SwapGroup(SwapGroupConfig config, int member, IReadOnlyList<LocalRank> ranks, (string, int)[] table, GroupWatch watch)
    {
        Config = config;
        Member = member;
        Ranks = ranks;
        _table = table;
        _watch = watch;
        foreach (LocalRank rank in ranks)
            rank.Collective.WatchPeers(() => Lost);
    }

    /// <summary>
    /// A member found gone while the group lives (its process ended, it aborted its part, or it fell silent for half the
    /// group's timeout), named by its first rank; the local collectives' waits end with it. Null while all are there.
    /// </summary>
    public PeerLoss? Lost => _watch.Lost is { } loss
        ? new PeerLoss(Config.FirstRank[loss.Member], $"{Describe(Config.FirstRank[loss.Member])} {loss.Why}")
        : null;

    public SwapGroupConfig Config { get; }

    /// <summary>This agent's index in <see cref="SwapGroupConfig.Members"/>.</summary>
    public int Member { get; }

    /// <summary>This agent's ranks, in device order.</summary>
    public IReadOnlyList<LocalRank> Ranks { get; }

    public bool IsBroken => _broken is not null;

    /// <summary>One rank of the group that this agent drives.</summary>
    public sealed record LocalRank(int Rank, int Device, IBackend Backend, ICollective Collective);

    /// <summary>"rank 3 (member 1 on node-b, pid 4242, device 1)": the configured host, and the machine's own name where it differs.</summary>
    public string Describe(int rank)
    {
        (int member, int device) = Config.Locate(rank);
        string host = Config.Members[member].Host;
        string reported = _table[member].Host == host ? "" : $" ({_table[member].Host})";
        return $"rank {rank} (member {member} on {host}{reported}, pid {_table[member].Pid}, device {device})";
    }

    /// <summary>
    /// Joins the group as member <paramref name="member"/>: reports to the root (which member 0 runs) and joins the
    /// collective with a rank per device, each on <paramref name="backendFor"/>(device). Waits at most the configured
    /// timeout for the other members.
    /// </summary>
    public static SwapGroup Form(SwapGroupConfig config, int member, Func<int, IBackend> backendFor)
    {
        if ((uint)member >= (uint)config.Members.Count)
            throw new ArgumentOutOfRangeException(nameof(member), $"swap group '{config.Name}' has members 0..{config.Members.Count - 1}, not {member}");
        var backends = new List<IBackend>();
        Rendezvous? rendezvous = null;
        GroupWatch? watch = null;
        try
        {
            foreach (int device in config.Members[member].Devices)
                backends.Add(backendFor(device));
            if (member == 0)
                rendezvous = new Rendezvous(config, backends[0].CreateCollectiveId());
            (string id, (string, int)[] table, Socket link) = Report(config, member);
            // From here the members watch over each other through the links they reported on (GroupWatch).
            TimeSpan silence = GroupWatch.SilenceFor(config.Timeout);
            GroupWatch.Root? root = rendezvous is null ? null : new GroupWatch.Root(rendezvous.Finish(), silence);
            watch = new GroupWatch(link, silence, root);
            var ranks = JoinAll(config, member, backends, id, table);
            backends.Clear(); // the ranks own them now
            var group = new SwapGroup(config, member, ranks, table, watch);
            watch = null;
            return group;
        }
        finally
        {
            watch?.Dispose();
            rendezvous?.Dispose();
            foreach (IBackend backend in backends)
                backend.Dispose();
        }
    }

    /// <summary>
    /// Runs <paramref name="work"/> on every local rank, each on a thread of its own, and returns the results by local
    /// rank. Each rank ends on its own deadline when a peer dies or stalls (an abort from another thread could free an
    /// NCCL communicator under a rank still polling it). The first failure is thrown naming the rank (and, for a
    /// collective failure, the peer at fault) with its member, host and device; the group is aborted and unusable
    /// afterwards: form a new one.
    /// </summary>
    public T[] RunOnEachRank<T>(Func<LocalRank, T> work)
    {
        if (_broken is { } why)
            throw new InvalidOperationException($"swap group '{Config.Name}' was aborted ({why}); form it again");
        var results = new T[Ranks.Count];
        var failures = new (Exception Error, int Order)?[Ranks.Count];
        int order = 0;
        var threads = Ranks.Select((rank, i) => new Thread(() =>
        {
            try
            {
                results[i] = work(rank);
            }
            catch (Exception e)
            {
                failures[i] = (e, Interlocked.Increment(ref order));
            }
        }) { IsBackground = true, Name = $"swap rank {rank.Rank}" }).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        int first = -1;
        for (int i = 0; i < failures.Length; i++)
            if (failures[i] is { } f && (first < 0 || f.Order < failures[first]!.Value.Order))
                first = i;
        if (first >= 0)
        {
            Abort($"{Describe(Ranks[first].Rank)} failed");
            throw Explain(Ranks[first].Rank, failures[first]!.Value.Error);
        }
        return results;
    }

    /// <summary>Aborts every local collective: operations in flight end here, and peers waiting on them see the links close.</summary>
    public void Abort(string why)
    {
        if (_broken is null)
            _watch.Abort(why); // the other members end their waits now rather than at their deadline
        _broken ??= why;
        foreach (LocalRank rank in Ranks)
        {
            try
            {
                rank.Collective.Abort();
            }
            catch (Exception e) when (e is CollectiveException or InvalidOperationException or ObjectDisposedException)
            {
                // Already aborted or broken: nothing left in flight.
            }
        }
    }

    private Exception Explain(int rank, Exception failure)
    {
        string where = $"swap group '{Config.Name}', {Describe(rank)}";
        return failure switch
        {
            CollectiveException { Peer: int peer } c when peer >= 0 && peer < Config.Size =>
                new CollectiveException($"{where}: {c.Message} [the peer: {Describe(peer)}]", peer, c),
            CollectiveException c => new CollectiveException($"{where}: {c.Message}", null, c),
            InvalidDataException d => new InvalidDataException($"{where}: {d.Message}", d),
            _ => new InvalidOperationException($"{where}: {failure.Message}", failure),
        };
    }

    public void Dispose()
    {
        foreach (LocalRank rank in Ranks)
        {
            rank.Collective.Dispose();
            rank.Backend.Dispose();
        }
        _watch.Dispose();
    }

    /// <summary>
    /// Tells the root who this member is; returns the collective's id, the member table and the link to the root (kept
    /// open for <see cref="GroupWatch"/>), or throws the root's reason.
    /// </summary>
    private static (string Id, (string Host, int Pid)[] Table, Socket Link) Report(SwapGroupConfig config, int member)
    {
        var clock = Stopwatch.StartNew();
        TimeSpan Left() => config.Timeout - clock.Elapsed > TimeSpan.Zero ? config.Timeout - clock.Elapsed : TimeSpan.Zero;
        Socket socket = ConnectToRoot(config, member, Left);
        bool kept = false;
        try
        {
            var report = Report(config, member, socket, Left);
            kept = true;
            return (report.Id, report.Table, socket);
        }
        finally
        {
            if (!kept)
                socket.Dispose();
        }
    }

    private static (string Id, (string Host, int Pid)[] Table) Report(SwapGroupConfig config, int member, Socket socket, Func<TimeSpan> left)
    {
        var stream = new NetworkStream(socket, ownsSocket: false);
        var writer = new BinaryWriter(stream, Encoding.UTF8);
        writer.Write(Magic);
        writer.Write(config.Name);
        writer.Write(member);
        writer.Write(Environment.MachineName);
        writer.Write(Environment.ProcessId);
        writer.Write(config.Members[member].Devices.Count);
        foreach (int device in config.Members[member].Devices)
            writer.Write(device);
        writer.Flush();
        // The root answers once every member has reported, or at its deadline with the members still missing.
        socket.ReceiveTimeout = (int)Math.Max(1, left().TotalMilliseconds + 5_000);
        var reader = new BinaryReader(stream, Encoding.UTF8);
        try
        {
            if (reader.ReadInt32() != 0)
                throw new CollectiveException($"swap group '{config.Name}', member {member}: the root at {config.Root} refused: {reader.ReadString()}", null);
            string id = reader.ReadString();
            var table = new (string, int)[config.Members.Count];
            for (int m = 0; m < table.Length; m++)
                table[m] = (reader.ReadString(), reader.ReadInt32());
            return (id, table);
        }
        catch (IOException e)
        {
            throw new CollectiveException(
                $"swap group '{config.Name}', member {member}: the root at {config.Root} did not answer within {config.Timeout.TotalSeconds:0.#} s (its process ended, or it is stuck)", null, e);
        }
    }

    private static Socket ConnectToRoot(SwapGroupConfig config, int member, Func<TimeSpan> left)
    {
        while (true)
        {
            var socket = new Socket(config.Root.AddressFamily, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true };
            try
            {
                using var cancel = new CancellationTokenSource(left());
                socket.ConnectAsync(config.Root, cancel.Token).AsTask().GetAwaiter().GetResult();
                return socket;
            }
            catch (Exception e) when (e is SocketException or OperationCanceledException)
            {
                socket.Dispose();
                if (left() <= TimeSpan.Zero)
                    throw new CollectiveException(
                        $"swap group '{config.Name}', member {member}: could not reach the root (member 0, {config.Members[0].Host}) at {config.Root} within {config.Timeout.TotalSeconds:0.#} s: {e.Message}", null, e);
                Thread.Sleep(50);
            }
        }
    }

    /// <summary>Joins the collective with every local rank at once (NCCL's init waits for all ranks, the local ones included).</summary>
    private static List<LocalRank> JoinAll(SwapGroupConfig config, int member, List<IBackend> backends, string id, (string, int)[] table)
    {
        int count = backends.Count;
        var joined = new ICollective?[count];
        var failures = new Exception?[count];
        var threads = Enumerable.Range(0, count).Select(i => new Thread(() =>
        {
            try
            {
                joined[i] = backends[i].JoinCollective(id, config.FirstRank[member] + i, config.Size, config.Timeout);
            }
            catch (Exception e)
            {
                failures[i] = e;
            }
        }) { IsBackground = true }).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        if (failures.FirstOrDefault(f => f is not null) is { } failure)
        {
            foreach (ICollective? collective in joined)
                collective?.Dispose();
            string members = string.Join(", ", table.Select((m, i) => $"{i}: {m.Item1} pid {m.Item2}"));
            throw new CollectiveException($"swap group '{config.Name}', member {member}: joining the collective failed ({members}): {failure.Message}", null, failure);
        }
        return Enumerable.Range(0, count).Select(i => new LocalRank(config.FirstRank[member] + i, config.Members[member].Devices[i], backends[i], joined[i]!)).ToList();
    }

    /// <summary>The root's side of the bootstrap: collects every member's report, checks it, and answers all at once.</summary>
    private sealed class Rendezvous : IDisposable
    {
        private readonly TcpListener _listener;
        private readonly CancellationTokenSource _stop = new();
        private readonly Task<Socket[]?> _serving;

        public Rendezvous(SwapGroupConfig config, string id)
        {
            _listener = new TcpListener(config.Root);
            _listener.Server.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
            try
            {
                _listener.Start();
            }
            catch (SocketException e)
            {
                throw new CollectiveException($"swap group '{config.Name}': member 0 cannot listen at {config.Root}: {e.Message}", null, e);
            }
            _serving = Task.Run(() => Serve(config, id));
        }

        /// <summary>
        /// Once this member has its answer: the links of every member, in member order, kept open for the group's watch;
        /// the listener is closed (a group formed later listens afresh).
        /// </summary>
        public Socket[] Finish()
        {
            Socket[]? links = _serving.GetAwaiter().GetResult();
            _listener.Stop();
            return links ?? throw new InvalidOperationException("the rendezvous did not complete, though this member was answered");
        }

        /// <summary>Returns the members' links once all have their answer, or null when the group did not form.</summary>
        private async Task<Socket[]?> Serve(SwapGroupConfig config, string id)
        {
            var reported = new Dictionary<int, (Socket Socket, string Host, int Pid)>();
            var waiting = new List<Socket>();
            using var deadline = CancellationTokenSource.CreateLinkedTokenSource(_stop.Token);
            deadline.CancelAfter(config.Timeout);
            try
            {
                while (reported.Count < config.Members.Count)
                {
                    Socket socket = await _listener.AcceptSocketAsync(deadline.Token);
                    waiting.Add(socket);
                    socket.ReceiveTimeout = 10_000;
                    var reader = new BinaryReader(new NetworkStream(socket), Encoding.UTF8);
                    string? refusal;
                    int member = -1;
                    string host = "?";
                    int pid = 0;
                    try
                    {
                        if (reader.ReadInt32() != Magic)
                            refusal = "not an nccl-swap swap group report";
                        else
                        {
                            string name = reader.ReadString();
                            member = reader.ReadInt32();
                            host = reader.ReadString();
                            pid = reader.ReadInt32();
                            int[] devices = new int[reader.ReadInt32()];
                            for (int d = 0; d < devices.Length; d++)
                                devices[d] = reader.ReadInt32();
                            string who = (uint)member < (uint)config.Members.Count ? $"member {member} ({config.Members[member].Host}; {host} pid {pid})" : $"{host} pid {pid}";
                            refusal = name != config.Name ? $"{who} reports for group '{name}', this is '{config.Name}'"
                                : (uint)member >= (uint)config.Members.Count ? $"{who} says it is member {member}; the group has {config.Members.Count}"
                                : reported.TryGetValue(member, out var first) ? $"member {member} reported twice ({first.Host} pid {first.Pid}, then {host} pid {pid})"
                                : !devices.SequenceEqual(config.Members[member].Devices) ? $"{who} drives devices [{string.Join(", ", devices)}]; the configuration says [{string.Join(", ", config.Members[member].Devices)}]"
                                : null;
                        }
                    }
                    catch (IOException)
                    {
                        refusal = "its report did not arrive whole";
                    }
                    if (refusal is not null)
                    {
                        Answer(socket, refusal);
                        waiting.Remove(socket);
                        continue;
                    }
                    reported[member] = (socket, host, pid);
                }
                var table = new MemoryStream();
                var writer = new BinaryWriter(table, Encoding.UTF8);
                writer.Write(0);
                writer.Write(id);
                for (int m = 0; m < config.Members.Count; m++)
                {
                    writer.Write(reported[m].Host);
                    writer.Write(reported[m].Pid);
                }
                writer.Flush();
                foreach (var (socket, _, _) in reported.Values)
                    socket.Send(table.ToArray());
                Socket[] links = Enumerable.Range(0, config.Members.Count).Select(m => reported[m].Socket).ToArray();
                foreach (Socket link in links)
                    waiting.Remove(link);
                return links;
            }
            catch (OperationCanceledException)
            {
                var missing = Enumerable.Range(0, config.Members.Count).Where(m => !reported.ContainsKey(m))
                    .Select(m => $"member {m} ({config.Members[m].Host}, ranks {config.FirstRank[m]}..{config.FirstRank[m] + config.Members[m].Devices.Count - 1})");
                string why = $"{string.Join(", ", missing)} did not report within {config.Timeout.TotalSeconds:0.#} s";
                foreach (var (socket, _, _) in reported.Values)
                    Answer(socket, why);
            }
            catch (SocketException)
            {
                // The listener closed: the member that runs the root gave up.
            }
            catch (ObjectDisposedException)
            {
                // The same, seen by a pending accept.
            }
            finally
            {
                foreach (Socket socket in waiting)
                    socket.Dispose();
            }
            return null;
        }

        private static void Answer(Socket socket, string refusal)
        {
            try
            {
                var writer = new BinaryWriter(new NetworkStream(socket), Encoding.UTF8);
                writer.Write(1);
                writer.Write(refusal);
                writer.Flush();
            }
            catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
            {
                // That member is gone already.
            }
            socket.Dispose();
        }

        public void Dispose()
        {
            // Member 0 has its answer (or gave up): everyone else has had theirs by then.
            _stop.Cancel();
            _listener.Stop();
            try
            {
                _serving.Wait(TimeSpan.FromSeconds(5));
            }
            catch (AggregateException)
            {
            }
            _stop.Dispose();
        }
    }
}

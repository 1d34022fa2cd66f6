using System.Diagnostics;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Versions;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane;

/// <summary>
/// An inference engine's side. Its weights are its own shared memory: two slots (flip) or one set of buffers
/// (copy-in), registered once. At every step boundary the engine calls <see cref="Step"/>: when nothing is new that
/// is one atomic load of the version table; when a new version is active it switches slots and acknowledges
/// (flip), or has the agent copy it in while it does not read (copy-in). Then it reads <see cref="Weights"/>.
/// </summary>
/// <remarks>
/// If the agent goes away, the consumer keeps serving what it has and stops following the table (a table seen
/// without a live session could name a slot the agent never filled for it); a watcher thread reconnects, telling
/// the new agent what it serves. A copy-in interrupted by the agent's death leaves the buffers unknown:
/// <see cref="Serving"/> is then 0 and the engine must not read them until the next copy-in.
/// </remarks>
public sealed class ConsumerClient : IDisposable
{
    private readonly string _socketPath;
    private readonly string _weightSet;
    private readonly TimeSpan _timeout;
    private readonly WeightRegion[] _regions;
    private readonly Lock _gate = new();
    private readonly Thread _watcher;
    private readonly List<ChannelClient> _retired = []; // an engine thread may still be reading their tables
    private volatile ChannelClient _channel;
    private volatile bool _disposed;
    private ulong _serving;

    private ConsumerClient(string socketPath, string weightSet, ConsumerMode mode, WeightRegion[] regions, TimeSpan timeout, ChannelClient channel)
    {
        _socketPath = socketPath;
        _weightSet = weightSet;
        Mode = mode;
        _regions = regions;
        _timeout = timeout;
        _channel = channel;
        _watcher = new Thread(Watch) { IsBackground = true, Name = $"nccl-swap consumer of {weightSet}" };
        _watcher.Start();
    }

    public ConsumerMode Mode { get; }

    public RegionLayout Layout => _regions[0].Layout;

    /// <summary>The state word of the version these weights hold (0: none, or unknown after an interrupted copy-in).</summary>
    public ulong Serving => Volatile.Read(ref _serving);

    public ulong Version => VersionEntry.UnpackState(Serving).Version;

    /// <summary>The weights to read for the version served (flip: the slot it names).</summary>
    public WeightRegion Weights => Mode == ConsumerMode.Flip ? _regions[VersionEntry.UnpackState(Serving).Slot] : _regions[0];

    /// <summary>How long the last switch kept the engine from its next step (copy-in: the copy; flip: the switch).</summary>
    public TimeSpan LastPause { get; private set; }

    public long Switches { get; private set; }

    /// <summary>Whether a live session with the agent exists now.</summary>
    public bool Connected => !_disposed && _channel.IsAlive;

    /// <summary>Sessions opened so far (1, plus one per reconnection).</summary>
    public int Sessions { get; private set; } = 1;

    /// <summary>The last thing that went wrong (a refused reconnection, a failed copy-in), for logs.</summary>
    public string? LastError { get; private set; }

    public static ConsumerClient Connect(string socketPath, string weightSet, RegionLayout layout, ConsumerMode mode, TimeSpan? timeout = null)
    {
        WeightRegion[] regions = mode == ConsumerMode.Flip
            ? [WeightRegion.Create("slot0", layout), WeightRegion.Create("slot1", layout)]
            : [WeightRegion.Create("weights", layout)];
        try
        {
            TimeSpan wait = timeout ?? TimeSpan.FromSeconds(120);
            ChannelClient channel = Register(socketPath, weightSet, mode, regions, serving: 0, wait);
            return new ConsumerClient(socketPath, weightSet, mode, regions, wait, channel);
        }
        catch
        {
            foreach (WeightRegion region in regions)
                region.Dispose();
            throw;
        }
    }

    private static ChannelClient Register(string socketPath, string weightSet, ConsumerMode mode, WeightRegion[] regions, ulong serving, TimeSpan timeout) =>
        ChannelClient.Connect(socketPath, Role.Consumer, weightSet, timeout,
            new RegistrationRequest(regions[0].Layout, regions, mode == ConsumerMode.Flip ? "flip" : "copy-in", serving));

    /// <summary>
    /// The per-step check. Returns true when the weights now hold a different version than before the call. The
    /// engine calls it where it does not read the weights (between steps).
    /// </summary>
    public bool Step()
    {
        ChannelClient channel = _channel;
        ulong state = channel.Table.ReadTarget(channel.Row, channel.Lane);
        if (state == Volatile.Read(ref _serving) || state == 0)
            return false;
        return Switch(channel, state);
    }

    private bool Switch(ChannelClient channel, ulong state)
    {
        lock (_gate)
        {
            if (channel != _channel || !channel.IsAlive)
                return false; // the watcher reconnects; until then, keep serving what we have
            var clock = Stopwatch.StartNew();
            channel.DrainResponses();
            if (Mode == ConsumerMode.Flip)
            {
                Volatile.Write(ref _serving, state);
                channel.Send(channel.NewRequest(RequestKind.Ack, state), TimeSpan.FromSeconds(1));
            }
            else if (!CopyIn(channel))
                return false;
            LastPause = clock.Elapsed;
            Switches++;
            return true;
        }
    }

    private bool CopyIn(ChannelClient channel)
    {
        ulong before = _serving;
        try
        {
            Response response = channel.Call(channel.NewRequest(RequestKind.CopyIn), _timeout);
            if (response.Status == Status.Ok)
            {
                Volatile.Write(ref _serving, response.Version);
                return response.Version != before;
            }
            LastError = $"copy-in: {Status.Name(response.Status)}: {ChannelClient.Detail(response)}";
            if (response.Status == Status.Corrupt)
                Volatile.Write(ref _serving, 0); // the agent wrote, and what it wrote is wrong
            return before != _serving;
        }
        catch (Exception e) when (e is ChannelClosedException or TimeoutException)
        {
            LastError = $"copy-in: {e.Message}";
            Volatile.Write(ref _serving, 0); // the copy may have stopped half way
            return before != 0;
        }
    }

    /// <summary>
    /// Tells the agent what this consumer served since its last report (<paramref name="counters"/>, emptied), on the
    /// version it serves now: the rollout policy compares canaries with the others by these. Report at least every
    /// 65535 requests (a latency bucket holds no more).
    /// </summary>
    public Response Report(ServingCounters counters)
    {
        ChannelClient channel = _channel;
        Request request = channel.NewRequest(RequestKind.Report, Serving);
        ReportPayload payload = counters.Take();
        System.Runtime.InteropServices.MemoryMarshal.Write(request.Payload, in payload);
        request.PayloadBytes = (uint)System.Runtime.InteropServices.Marshal.SizeOf<ReportPayload>();
        return channel.Call(request, _timeout);
    }

    /// <summary>Waits for the session to end, then reconnects (every 100 ms until it works), telling the agent what it serves.</summary>
    private void Watch()
    {
        while (!_disposed)
        {
            _channel.WaitUntilClosed();
            while (!_disposed)
            {
                Thread.Sleep(100);
                try
                {
                    lock (_gate)
                    {
                        if (_disposed)
                            return;
                        ChannelClient fresh = Register(_socketPath, _weightSet, Mode, _regions, _serving, _timeout);
                        _retired.Add(_channel);
                        _channel = fresh;
                        Sessions++;
                    }
                    break;
                }
                catch (Exception e) when (e is ChannelRefusedException or IOException or System.Net.Sockets.SocketException or TimeoutException or System.Text.Json.JsonException)
                {
                    LastError = $"reconnecting: {e.Message}";
                }
            }
        }
    }

    public void Dispose()
    {
        lock (_gate)
        {
            _disposed = true;
            _channel.Dispose(); // ends the watcher's wait
        }
        _watcher.Join();
        foreach (ChannelClient retired in _retired)
            retired.Dispose();
        foreach (WeightRegion region in _regions)
            region.Dispose();
    }
}

/// <summary>An engine's counters between two reports (<see cref="ConsumerClient.Report"/>): requests, errors, latencies, quality scores.</summary>
public sealed class ServingCounters
{
    private ReportPayload _payload;

    /// <summary>One request served in <paramref name="milliseconds"/>; <paramref name="error"/> if it failed; its quality score if the engine has one.</summary>
    public void Served(double milliseconds, bool error = false, double? quality = null)
    {
        int bucket = ReportPayload.BucketOf(milliseconds);
        if (_payload.Latency[bucket] == ushort.MaxValue)
            throw new InvalidOperationException($"a latency bucket is full ({ushort.MaxValue} requests): report before counting more");
        _payload.Latency[bucket]++;
        _payload.Requests++;
        if (error)
            _payload.Errors++;
        if (quality is { } score)
        {
            _payload.QualityCount++;
            _payload.QualitySum += (float)score;
        }
    }

    public uint Requests => _payload.Requests;

    internal ReportPayload Take()
    {
        ReportPayload taken = _payload;
        _payload = default;
        return taken;
    }
}

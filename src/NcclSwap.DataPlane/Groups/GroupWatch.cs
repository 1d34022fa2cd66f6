using System.Diagnostics;
using System.Net.Sockets;
using System.Text;

namespace NcclSwap.DataPlane;

/// <summary>
/// Who is still there while a swap group lives, over the links its members reported to the root on. Each member
/// sends the root "beat" every <see cref="Beat"/> and the root sends each member the same; a member says "leave"
/// before it closes its link after its work, or "abort REASON" when its part failed. The root declares a member lost
/// when its link closes without a leave (its process ended, its host went away), when it aborts, or when it has sent
/// nothing for the silence limit (stopped or stuck), and tells every other member "lost M REASON"; a member that stops
/// hearing from the root declares member 0 lost the same way. <see cref="Lost"/> is polled by the collectives' waits,
/// which then end with an error naming that member's rank instead of waiting out their deadline.
/// </summary>
internal sealed class GroupWatch : IDisposable
{
    public static readonly TimeSpan Beat = TimeSpan.FromMilliseconds(200);

    private readonly Socket _link;
    private readonly StreamWriter _writer;
    private readonly TimeSpan _silence;
    private readonly Root? _root;
    private readonly Thread _reader, _beater;
    private readonly CancellationTokenSource _stop = new();
    private volatile Loss? _lost;
    private volatile bool _rootEnded;

    /// <summary>Member <c>Member</c> is gone: <c>Why</c> reads after its name ("its link closed …").</summary>
    public sealed record Loss(int Member, string Why);

    /// <summary>Watches over <paramref name="link"/> (this member's report socket, kept open); <paramref name="root"/> is the root's side when this member runs it.</summary>
    public GroupWatch(Socket link, TimeSpan silence, Root? root)
    {
        _link = link;
        _silence = silence;
        _root = root;
        var stream = new NetworkStream(link, ownsSocket: false);
        _writer = new StreamWriter(stream, new UTF8Encoding(false)) { AutoFlush = true, NewLine = "\n" };
        link.ReceiveTimeout = (int)silence.TotalMilliseconds;
        _reader = new Thread(() => Read(new StreamReader(stream, Encoding.UTF8))) { IsBackground = true, Name = "swap group watch" };
        _beater = new Thread(() => { while (!_stop.Token.WaitHandle.WaitOne(Beat)) Say("beat"); }) { IsBackground = true, Name = "swap group beat" };
        _reader.Start();
        _beater.Start();
    }

    /// <summary>The first member found gone, or null.</summary>
    public Loss? Lost => _lost;

    /// <summary>The silence after which a member counts as lost: half the group's timeout, within 2..10 s.</summary>
    public static TimeSpan SilenceFor(TimeSpan timeout) => TimeSpan.FromTicks(Math.Clamp(timeout.Ticks / 2, TimeSpan.FromSeconds(2).Ticks, TimeSpan.FromSeconds(10).Ticks));

    /// <summary>Tells the others (through the root) that this member's part failed.</summary>
    public void Abort(string why) => Say($"abort {why.ReplaceLineEndings(" ")}");

    private void Say(string line)
    {
        try
        {
            lock (_writer)
                _writer.WriteLine(line);
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException)
        {
            // The link is gone: the reader reports it.
        }
    }

    private void Read(StreamReader reader)
    {
        try
        {
            while (!_stop.IsCancellationRequested)
            {
                string? line = reader.ReadLine();
                if (line is null)
                {
                    if (!_stop.IsCancellationRequested && !_rootEnded)
                        _lost ??= new Loss(0, "closed its link (its process ended, or its host is unreachable)");
                    return;
                }
                if (line == "end")
                    _rootEnded = true; // the root's work is done and it closes next: no loss
                else if (line.StartsWith("lost ", StringComparison.Ordinal) && line.Split(' ', 3) is [_, var m, var why] && int.TryParse(m, out int member))
                    _lost ??= new Loss(member, why);
            }
        }
        catch (IOException e) when (e.InnerException is SocketException { SocketErrorCode: SocketError.TimedOut or SocketError.WouldBlock })
        {
            if (!_stop.IsCancellationRequested)
                _lost ??= new Loss(0, $"sent nothing for {_silence.TotalSeconds:0.#} s (stopped, or stuck)");
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException)
        {
            if (!_stop.IsCancellationRequested && !_rootEnded)
                _lost ??= new Loss(0, $"closed its link ({e.Message})");
        }
    }

    /// <summary>Ends the watch: tells the root this member leaves (its work is done), then the root, if this member runs it, ends its side.</summary>
    public void Dispose()
    {
        Say("leave");
        _stop.Cancel();
        _beater.Join();
        _root?.Dispose();
        _link.Dispose();
        _reader.Join(TimeSpan.FromSeconds(2));
        _stop.Dispose();
    }

    /// <summary>The root's side: a reader per member link, and a thread that beats and looks for silent members.</summary>
    internal sealed class Root : IDisposable
    {
        private readonly Socket[] _links;
        private readonly StreamWriter[] _writers;
        private readonly long[] _heard;
        private readonly bool[] _gone;
        private readonly TimeSpan _silence;
        private readonly CancellationTokenSource _stop = new();
        private readonly List<Thread> _threads = [];

        public Root(IReadOnlyList<Socket> links, TimeSpan silence)
        {
            _links = [.. links];
            _silence = silence;
            _writers = _links.Select(l => new StreamWriter(new NetworkStream(l, ownsSocket: false), new UTF8Encoding(false)) { AutoFlush = true, NewLine = "\n" }).ToArray();
            _heard = _links.Select(_ => Stopwatch.GetTimestamp()).ToArray();
            _gone = new bool[_links.Length];
            for (int m = 0; m < _links.Length; m++)
            {
                int member = m;
                _threads.Add(new Thread(() => Listen(member)) { IsBackground = true, Name = $"swap group root: member {member}" });
            }
            _threads.Add(new Thread(Tend) { IsBackground = true, Name = "swap group root" });
            _threads.ForEach(t => t.Start());
        }

        private void Listen(int member)
        {
            var reader = new StreamReader(new NetworkStream(_links[member], ownsSocket: false), Encoding.UTF8);
            try
            {
                while (true)
                {
                    string? line = reader.ReadLine();
                    Interlocked.Exchange(ref _heard[member], Stopwatch.GetTimestamp());
                    if (line is null)
                    {
                        Declare(member, "closed its link (its process ended, or its host is unreachable)");
                        return;
                    }
                    if (line == "leave")
                    {
                        lock (_gone)
                            _gone[member] = true; // done with its work: not a loss
                        return;
                    }
                    if (line.StartsWith("abort ", StringComparison.Ordinal))
                        Declare(member, $"aborted its part: {line["abort ".Length..]}");
                }
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException)
            {
                Declare(member, $"closed its link ({e.Message})");
            }
        }

        private void Tend()
        {
            while (!_stop.Token.WaitHandle.WaitOne(Beat))
            {
                for (int m = 0; m < _links.Length; m++)
                {
                    TimeSpan quiet = Stopwatch.GetElapsedTime(Interlocked.Read(ref _heard[m]));
                    if (quiet > _silence)
                        Declare(m, $"sent nothing for {quiet.TotalSeconds:0.#} s (stopped, or stuck)");
                    else
                        Tell(m, "beat");
                }
            }
        }

        /// <summary>Member <paramref name="member"/> is lost: every other member hears it once.</summary>
        private void Declare(int member, string why)
        {
            if (_stop.IsCancellationRequested)
                return;
            lock (_gone)
            {
                if (_gone[member])
                    return;
                _gone[member] = true;
            }
            for (int m = 0; m < _links.Length; m++)
                if (m != member)
                    Tell(m, $"lost {member} {why.ReplaceLineEndings(" ")}");
        }

        private void Tell(int member, string line)
        {
            lock (_gone)
                if (_gone[member])
                    return;
            try
            {
                lock (_writers[member])
                    _writers[member].WriteLine(line);
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException or SocketException)
            {
                // Its reader declares it.
            }
        }

        public void Dispose()
        {
            for (int m = 0; m < _links.Length; m++)
                Tell(m, "end");
            _stop.Cancel();
            foreach (Socket link in _links)
                link.Dispose();
            foreach (Thread thread in _threads)
                thread.Join(TimeSpan.FromSeconds(2));
            _stop.Dispose();
        }
    }
}

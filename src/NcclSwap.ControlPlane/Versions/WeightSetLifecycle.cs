using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using Microsoft.Win32.SafeHandles;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Signing;
using NcclSwap.ControlPlane.State;
using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane.Versions;

/// <summary>
/// The life cycle of one weight set's versions: publishers' snapshots, the update queue, staging into every flip
/// consumer's free slot, verification against the manifest, the activation store, copy-ins, rollback, and the
/// rule that memory is written only once no live consumer can read it.
/// </summary>
/// <remarks>
/// Locks, always taken in this order: <c>_membership</c> (who is registered; held by a joining consumer while the
/// agent fills its slot, and by the activation) → <c>_refs</c> (which staged versions are active and last good,
/// and the table's word). <c>_queue</c> guards the pending publish and rollbacks. One worker thread runs updates one
/// at a time, so versions never interleave.
/// </remarks>
internal sealed partial class WeightSetLifecycle : IDisposable
{
    private const int HistoryLimit = 4096;

    private readonly VersionManager _manager;
    private readonly StagingPool _pool;
    private readonly Lock _membership = new();
    private readonly Lock _refs = new();
    private readonly Lock _snapshot = new();
    private readonly object _queue = new();
    private readonly Lock _history = new();
    private readonly AutoResetEvent _acknowledged = new(false);
    private readonly List<UpdateOutcome> _outcomes = [];
    private readonly Queue<Job> _rollbacks = new();
    private readonly Thread _worker;

    private RegionLayout? _layout; // the weight set's tensors, packed as staging holds them
    private PublisherRegistration? _publisher;
    private ConsumerRegistration[] _consumers = [];
    private StagedVersion? _active;
    private StagedVersion? _lastGood;
    private ulong _activeState;
    private ulong _lastGoodVersion;
    private ulong _highestPublished;
    private Job? _pending;
    private volatile bool _stopping;
    private bool _busy; // the worker runs an update (under _queue)
    private int _background; // snapshots and copy-ins running on the thread pool
    private WeightSetState _persisted;
    private string? _placement; // where staging went and why, decided at the first snapshot
    private bool _shadowLastGood; // the last good version moves from device memory to a host file
    private double _copyRate; // bytes per second of the last copy of a whole version

    public WeightSetLifecycle(VersionManager manager, string name, int row, WeightSetState? persisted)
    {
        _manager = manager;
        Name = name;
        Row = row;
        _pool = new StagingPool(manager.Options.StagingDirectory, StagingPool.PrefixFor(row, name), manager.Backend);
        _persisted = new WeightSetState(name, null, 0, 0);
        if (persisted is not null)
            Recover(persisted);
        else
            manager.Table.Reset(row);
        _worker = new Thread(Work) { IsBackground = true, Name = $"nccl-swap updates of {name}" };
        _worker.Start();
    }

    public string Name { get; }

    public int Row { get; }

    /// <summary>What the state file holds for this weight set (replaced, never changed in place).</summary>
    public WeightSetState Persisted => Volatile.Read(ref _persisted);

    /// <summary>The staging files this weight set's persisted state names.</summary>
    public IEnumerable<string> StagingFiles =>
        new[] { Persisted.ActiveStaging?.File, Persisted.LastGoodStaging?.File }.OfType<string>();

    public IReadOnlyList<UpdateOutcome> History
    {
        get
        {
            lock (_history)
                return [.. _outcomes];
        }
    }

    public IReadOnlyList<ConsumerRegistration> Consumers => Volatile.Read(ref _consumers);

    private IBackend Backend => _manager.Backend;

    private ILogger Log => _manager.Log;

    // ---------------------------------------------------------------------------------------------------------
    // Sessions

    public (SessionWelcome Welcome, Registration? Registration) Open(SessionInfo session, Hello hello, IReadOnlyList<SafeFileHandle> descriptors)
    {
        if (hello.Layout is null)
            return (new SessionWelcome(Row, ActiveState), null); // a session that registers nothing: ping, status
        RegionLayout layout = hello.Layout;
        var regions = new List<ClientRegion>();
        ConsumerGate? gate = null;
        int used = 0; // descriptors taken over so far
        try
        {
            bool writable = session.Role == Role.Consumer;
            foreach (RegionSpec spec in hello.Regions)
                regions.Add(spec.IsDevice
                    ? ClientRegion.Open(spec, layout, Backend)
                    : ClientRegion.Map(descriptors[used++], spec.Name, writable, layout.Length, Backend));
            if (hello.Gate is { } g)
                gate = new ConsumerGate(ClientRegion.Map(descriptors[used++], g.Name, writable: true, Marshal.SizeOf<Gate>(), Backend));
        }
        catch
        {
            foreach (ClientRegion region in regions)
                region.Dispose();
            foreach (SafeFileHandle descriptor in descriptors.Skip(used))
                descriptor.Dispose();
            throw;
        }

        Registration registration = session.Role == Role.Publisher
            ? new PublisherRegistration(session, layout, regions[0])
            : new ConsumerRegistration(session, layout, hello.Mode, [.. regions], gate, hello.Serving);
        try
        {
            lock (_membership)
            {
                if (_layout is not null && _layout.Mismatch(layout) is { } problem)
                    throw new SessionRefusedException($"its tensors do not match weight set '{Name}': {problem}");
                ulong state;
                if (registration is PublisherRegistration publisher)
                {
                    if (_publisher is { IsGone: false } other)
                        throw new SessionRefusedException($"weight set '{Name}' already has a publisher: {other}");
                    _publisher = publisher;
                    state = ActiveState;
                }
                else
                {
                    var consumer = (ConsumerRegistration)registration;
                    state = Join(consumer);
                    AssignLane(consumer);
                    _consumers = [.. _consumers, consumer];
                }
                _layout ??= layout.Pack();
                Log.LogInformation("{Set}: {Who} registered {Tensors} tensors ({Bytes} bytes){Mode}", Name, registration, layout.Tensors.Count, layout.TotalBytes,
                    registration is ConsumerRegistration c ? $", {(c.Mode == ConsumerMode.Flip ? "flip" : "copy-in")}, serving {Describe(c.Serving)}" : "");
                return (new SessionWelcome(Row, state, registration is ConsumerRegistration { Lane: int lane } ? lane : -1), registration);
            }
        }
        catch
        {
            registration.Leave();
            throw;
        }
    }

    /// <summary>
    /// Brings a joining consumer to where it can follow the table: a flip consumer that does not serve the active
    /// version gets it in the slot the table names (never the slot it reads). Held under <c>_membership</c>, so no
    /// activation can happen meanwhile.
    /// </summary>
    private ulong Join(ConsumerRegistration consumer)
    {
        ulong state;
        StagedVersion? active;
        lock (_refs)
        {
            state = _activeState;
            active = _active?.AddReference();
        }
        try
        {
            ulong serving = consumer.Serving;
            if (consumer.Mode == ConsumerMode.CopyIn || serving == state)
                return state; // a copy-in consumer asks for the active version itself, at a step boundary
            (ulong version, int slot) = VersionEntry.UnpackState(state);
            if (state == 0)
            {
                if (consumer.MayRead(0))
                    throw new SessionRefusedException($"it serves {Describe(serving)}, which this agent does not know, from slot 0, where the first version will go: register serving nothing (0), or from slot 1");
                return state;
            }
            if (consumer.MayRead(slot))
                throw new SessionRefusedException($"it serves {Describe(serving)} from slot {slot}, where active version {version} must go: register serving nothing (0) while it does not read its slots, or after switching to the other slot");
            if (active is null)
                throw new SessionRefusedException($"the bytes of active version {version} of '{Name}' were lost when the agent restarted, so they cannot be given to a new consumer; the next version published can");
            var clock = Stopwatch.StartNew();
            if (Deliver(active, consumer, slot, null) is { } failure)
                throw new SessionRefusedException($"filling its slot {slot} with version {version} failed: {failure}");
            Log.LogInformation("{Set}: filled slot {Slot} of {Who} with version {Version} in {Ms:0.0} ms", Name, slot, consumer, version, clock.Elapsed.TotalMilliseconds);
            consumer.Activated(state); // from its first step it may switch to the active version
            return state;
        }
        finally
        {
            active?.Release();
        }
    }

    public void Close(SessionInfo session)
    {
        Registration? left = null;
        lock (_membership)
        {
            if (_publisher?.Session.Id == session.Id)
            {
                left = _publisher;
                _publisher = null;
            }
            else if (_consumers.FirstOrDefault(c => c.Session.Id == session.Id) is { } consumer)
            {
                left = consumer;
                _consumers = _consumers.Where(c => c != consumer).ToArray();
            }
        }
        if (left is null)
            return;
        left.Leave();
        _acknowledged.Set(); // an update waiting for it to stop reading a slot need wait no more
        Log.LogInformation("{Set}: {Who} left{Reason}", Name, left, session.EndReason is { } why ? $" ({why})" : "");
    }

    private void Evict(ConsumerRegistration consumer, string reason)
    {
        lock (_membership)
            _consumers = _consumers.Where(c => c != consumer).ToArray();
        consumer.Leave();
        _manager.EndSession(consumer.Session.Id, reason);
        Log.LogWarning("{Set}: ended {Who}: {Reason}", Name, consumer, reason);
    }

    // ---------------------------------------------------------------------------------------------------------
    // Requests

    public ulong ActiveState
    {
        get
        {
            lock (_refs)
                return _activeState;
        }
    }

    public Response? Handle(SessionInfo session, in Request request, Registration? registration, RequestDispatcher dispatcher)
    {
        switch ((RequestKind)request.Kind)
        {
            case RequestKind.Publish:
                return Publish(registration as PublisherRegistration, request, dispatcher);
            case RequestKind.Ack:
                return Acknowledge(registration as ConsumerRegistration, request);
            case RequestKind.CopyIn:
                if (registration is not ConsumerRegistration { Mode: ConsumerMode.CopyIn } copyIn)
                    return Messages.NewResponse(request, Abi.Status.Invalid, "copy-in is for consumers registered in copy-in mode");
                Request copy = request;
                if (copyIn.Gate is { } gate)
                {
                    if (request.Version is 0 or > uint.MaxValue)
                        return Messages.NewResponse(request, Abi.Status.Invalid, $"a gated copy-in's version must be its sequence number in [1, 2^32), not {request.Version}");
                    Background(() => CopyInGated(copyIn, gate, copy, dispatcher));
                }
                else
                    Background(() => CopyIn(copyIn, copy, dispatcher));
                return null;
            case RequestKind.Rollback:
                return Rollback(session, request, dispatcher);
            case RequestKind.Status:
                return StatusOf(request);
            case RequestKind.Report:
                return Report(registration as ConsumerRegistration, request);
            default:
                return Messages.NewResponse(request, Abi.Status.Ok);
        }
    }

    private Response? Publish(PublisherRegistration? publisher, Request request, RequestDispatcher dispatcher)
    {
        if (publisher is null)
            return Messages.NewResponse(request, Abi.Status.Invalid, "this session registered no tensors to publish");
        ulong version = request.Version;
        if (version == 0 || version >= 1UL << 56)
            return Messages.NewResponse(request, Abi.Status.Invalid, $"version {version} is not in [1, 2^56)");
        lock (_queue)
        {
            if (_stopping)
                return Messages.NewResponse(request, Abi.Status.Canceled, "the agent is stopping");
            if (version <= _highestPublished)
            {
                string stale = $"version {version} is not newer than {_highestPublished}, already published (a replay, or a publisher out of step)";
                _manager.ReportRefused(publisher.Session, request, stale);
                return Messages.NewResponse(request, Abi.Status.Stale, stale);
            }
            _highestPublished = version;
        }
        var outcome = new UpdateOutcome(Name, version, rollback: false, publisher.Layout.TotalBytes);
        Record(outcome);
        bool wait = (request.Flags & AbiConstants.PublishWait) != 0;
        var job = new Job(outcome, null, publisher.Session.Id, request, wait ? dispatcher : null);
        Background(() => Snapshot(publisher, job, dispatcher));
        return null;
    }

    /// <summary>Runs <paramref name="work"/> on the thread pool, counted so that <see cref="Dispose"/> can wait for it.</summary>
    private void Background(Action work)
    {
        Interlocked.Increment(ref _background);
        ThreadPool.UnsafeQueueUserWorkItem(_ =>
        {
            try
            {
                work();
            }
            finally
            {
                Interlocked.Decrement(ref _background);
            }
        }, null);
    }

    /// <summary>
    /// Takes the publisher's version in: when the weight set has flip consumers, the worker copies the publisher's
    /// tensors straight into their free slots (one copy, not two) and answers once they hold them; otherwise the
    /// bytes are copied into a staging buffer here, digested as they are read (the manifest), while it waits.
    /// Then the version is queued (under supersede, replacing the one still waiting) and the publisher answered.
    /// </summary>
    private void Snapshot(PublisherRegistration publisher, Job job, RequestDispatcher dispatcher)
    {
        UpdateOutcome outcome = job.Outcome;
        job = job with { Publisher = publisher, Answer = job.WaitFor is null ? new SnapshotAnswer(dispatcher) : null };
        try
        {
            lock (_snapshot)
            {
                if (_manager.Options.Policy == UpdatePolicy.Queue)
                    lock (_queue)
                        while (_pending is not null && !_stopping)
                            Monitor.Wait(_queue);
                if (_stopping)
                    throw new UpdateException(Abi.Status.Canceled, "the agent is stopping", UpdateResult.Abandoned);
                // Straight into the slots only when the worker would start at once and no flip consumer reads the
                // slot: the publisher then waits for one copy and its check, never for another update or a consumer.
                bool direct = SlotsFree() && (_manager.Options.PolicyFor(Name).Canary is null || ActiveState == 0);
                lock (_queue)
                    direct &= !_busy && _pending is null;
                if (!direct)
                    job = job with { Source = TakeSnapshot(publisher, job) };
                Job? superseded;
                lock (_queue)
                {
                    superseded = _pending;
                    _pending = job;
                    Monitor.PulseAll(_queue);
                }
                if (superseded is not null)
                    Finish(superseded, UpdateResult.Superseded, Abi.Status.Canceled, $"superseded by version {outcome.Version}");
                if (direct)
                    return; // the worker answers once the bytes are in the slots
            }
            Log.LogDebug("{Set}: version {Version} snapshotted ({Bytes} bytes) in {Ms:0.00} ms", Name, outcome.Version, outcome.Bytes, outcome.Snapshot.TotalMilliseconds);
            Answer(job, Abi.Status.Ok, $"snapshot taken in {outcome.Snapshot.TotalMilliseconds:0.00} ms");
        }
        catch (Exception e)
        {
            (int status, string detail, UpdateResult result) = Failure(e, "snapshot");
            Finish(job, result, status, detail);
        }
    }

    /// <summary>Whether the weight set has flip consumers and none of them may read the slot the next version goes to.</summary>
    private bool SlotsFree()
    {
        ulong current = ActiveState;
        int slot = current == 0 ? 0 : 1 - VersionEntry.UnpackState(current).Slot;
        var flips = Consumers.Where(c => c.Mode == ConsumerMode.Flip).ToList();
        return flips.Count > 0 && flips.All(c => !c.MayRead(slot));
    }

    /// <summary>Copies the publisher's tensors into a new staging buffer, digesting them as they are read (the manifest).</summary>
    private StagedVersion TakeSnapshot(PublisherRegistration publisher, Job job)
    {
        UpdateOutcome outcome = job.Outcome;
        if (!publisher.TryEnter())
            throw new UpdateException(Abi.Status.Canceled, "the publisher left before its snapshot was taken", UpdateResult.Abandoned);
        StagingBuffer? buffer = null;
        try
        {
            var clock = Stopwatch.StartNew();
            RegionLayout packed = _layout!;
            _placement ??= Place(publisher, packed.Length);
            buffer = AcquireStaging(packed.Length);
            outcome.Started();
            // The manifest: the digests of the publisher's bytes, taken as they are copied.
            Manifest manifest = publisher.Layout.ToManifest(Backend.CopyAndDigest(buffer.Buffer, publisher.Region.Buffer, RegionLayout.TensorRuns(publisher.Layout, packed)));
            outcome.Snapshot = clock.Elapsed;
            Authenticate(job, manifest);
            _copyRate = outcome.Bytes / Math.Max(clock.Elapsed.TotalSeconds, 1e-9);
            var staged = new StagedVersion(outcome.Version, manifest, buffer, _pool);
            buffer = null;
            return staged;
        }
        finally
        {
            publisher.Exit();
            if (buffer is not null)
                _pool.Return(buffer);
        }
    }

    /// <summary>
    /// Checks a published version's signature against the weight set's trusted keys, once its manifest (the digests
    /// of the bytes the agent took) is known and before anything is staged to consumers: a version that is unsigned
    /// where a signature is required, signed by a key not trusted for the set, or whose signature does not match its
    /// weight set, version and manifest, is refused. Every publish passes here, whoever sends it.
    /// </summary>
    private void Authenticate(Job job, Manifest manifest)
    {
        UpdateOutcome outcome = job.Outcome;
        outcome.ManifestSha256 = manifest.Sha256;
        WeightSetPolicy policy = _manager.Options.PolicyFor(Name);
        (ulong KeyId, byte[] Signature)? signature;
        try
        {
            signature = VersionSignature.Read(job.Request);
        }
        catch (FormatException e)
        {
            throw Refused(e.Message);
        }
        if (signature is not { } signed)
        {
            if (policy.RequireSignature)
                throw Refused($"version {outcome.Version} is unsigned, and '{Name}' takes only versions signed by a trusted key");
            return;
        }
        string id = VersionSignature.IdText(signed.KeyId);
        if (policy.TrustedKeys.Count == 0)
        {
            Log.LogWarning("{Set}: version {Version} is signed by key {Key}, but no key is trusted for '{Set}': the signature is not checked", Name, outcome.Version, id, Name);
            return;
        }
        TrustedKey key = policy.TrustedKeys.FirstOrDefault(k => k.Id == signed.KeyId)
            ?? throw Refused($"version {outcome.Version} is signed by key {id}, which is not trusted for '{Name}' (trusted: {string.Join(", ", policy.TrustedKeys.Select(k => VersionSignature.IdText(k.Id)))})");
        if (!key.Verify(Name, outcome.Version, manifest.Sha256, signed.Signature))
            throw Refused($"the signature by key {id} does not match '{Name}' version {outcome.Version} with manifest sha256 {manifest.Sha256} (forged, or made for other bytes, another version or another weight set)");
        outcome.Signer = id;
    }

    private static UpdateException Refused(string why) => new(Abi.Status.NotPermitted, why, UpdateResult.Refused);

    /// <summary>Answers a publisher that waits for its snapshot only (once; later answers are dropped).</summary>
    private static void Answer(Job job, int status, string detail) =>
        job.Answer?.Give(job.Session, Messages.NewResponse(job.Request, status, detail));

    /// <summary>
    /// Decides where staging goes (<see cref="StagingPlacement"/>). Automatically: device memory when the
    /// publisher's tensors are on the GPU and three buffers (the active version, the last good one and the next)
    /// fit with room to spare; when only two fit, device memory with the last good version moved to a page-locked
    /// host file after each activation (a rollback then copies over the host link); otherwise page-locked host
    /// files, where every copy to or from the GPU runs at the host link's speed. Says what it chose and why.
    /// </summary>
    private string Place(PublisherRegistration publisher, long length)
    {
        StagingPlacement wanted = _manager.Options.Placement;
        string placement;
        if (wanted != StagingPlacement.Auto)
        {
            _pool.Place = wanted == StagingPlacement.Host ? StagingPlace.HostFiles : StagingPlace.Device;
            _shadowLastGood = wanted == StagingPlacement.GpuWithHostShadow;
            placement = wanted switch
            {
                StagingPlacement.Host => "staging in page-locked host files (as configured)",
                StagingPlacement.Gpu => "staging in GPU memory (as configured)",
                _ => "staging in GPU memory, the last good version in a page-locked host file (as configured)",
            };
        }
        else
        {
            string why;
            if (!publisher.Region.IsDevice)
                why = "the publisher's tensors are in host memory";
            else if (Backend.DeviceMemory is not { } memory)
                why = "this backend has no device memory";
            else
            {
                long spare = Math.Max(1L << 30, memory.Total / 20);
                string of = $"of {Units.Bytes(memory.Free)} free";
                if (memory.Free - checked(3 * length) >= spare)
                {
                    _pool.Place = StagingPlace.Device;
                    placement = $"staging in GPU memory: 3 × {Units.Bytes(length)} {of}";
                    Log.LogInformation("{Set}: {Placement}; a restart of the agent loses it (consumers keep their own copies)", Name, placement);
                    return placement;
                }
                if (memory.Free - checked(2 * length) >= spare)
                {
                    _pool.Place = StagingPlace.Device;
                    _shadowLastGood = true;
                    placement = $"staging in GPU memory: 2 × {Units.Bytes(length)} {of}; the last good version in a page-locked host file (a rollback copies over the host link)";
                    Log.LogInformation("{Set}: {Placement}", Name, placement);
                    PrepareShadow(length);
                    return placement;
                }
                why = $"2 × {Units.Bytes(length)} would leave less than {Units.Bytes(spare)} {of}";
            }
            _pool.Place = StagingPlace.HostFiles;
            placement = $"staging in page-locked host files ({why}): copies between them and the GPU run at the host link's speed";
        }
        Log.LogInformation("{Set}: {Placement}", Name, placement);
        if (_shadowLastGood)
            PrepareShadow(length);
        return placement;
    }

    /// <summary>
    /// Makes and pins the host file the first shadow goes to, now: pinning gigabytes takes seconds and holds the
    /// driver meanwhile, which must not happen while a consumer's stream waits for a copy-in.
    /// </summary>
    private void PrepareShadow(long length)
    {
        var clock = Stopwatch.StartNew();
        try
        {
            _pool.Return(_pool.Acquire(length, StagingPlace.HostFiles));
            Log.LogInformation("{Set}: a page-locked host file for the last good version made ready in {Ms:0} ms", Name, clock.Elapsed.TotalMilliseconds);
        }
        catch (Exception e) when (e is IOException or NcclSwap.Cuda.CudaException or UnauthorizedAccessException)
        {
            Log.LogWarning("{Set}: no host file for the last good version could be made ready ({Reason}); it stays in GPU memory until one can", Name, e.Message);
        }
    }

    /// <summary>A staging buffer where <see cref="Place"/> said; if the device has no room for this one, a host file.</summary>
    private StagingBuffer AcquireStaging(long length)
    {
        try
        {
            return _pool.Acquire(length);
        }
        catch (NcclSwap.Cuda.CudaException e) when (_pool.Place == StagingPlace.Device)
        {
            Log.LogWarning("{Set}: no room in GPU memory for a staging buffer ({Reason}); this version is staged in a page-locked host file", Name, e.Message);
            return _pool.Acquire(length, StagingPlace.HostFiles);
        }
    }

    /// <summary>
    /// With a host shadow: moves the last good version from device memory to a page-locked host file (copied,
    /// checked against its manifest, recorded in the state file), freeing its device buffer for the next version.
    /// On the worker, after an activation; if anything fails, the last good version stays where it was.
    /// </summary>
    private void ShadowLastGood()
    {
        if (!_shadowLastGood)
            return;
        StagedVersion? lastGood;
        lock (_refs)
            lastGood = _lastGood is { Buffer.Place: StagingPlace.Device } device ? device.AddReference() : null;
        if (lastGood is null)
            return;
        StagingBuffer? shadow = null;
        try
        {
            var clock = Stopwatch.StartNew();
            shadow = _pool.Acquire(lastGood.Layout.Length, StagingPlace.HostFiles);
            Copy(lastGood.Buffer.Buffer, shadow.Buffer, [new CopyRun(0, 0, lastGood.Layout.Length)]);
            List<string> bad = Mismatches(shadow.Buffer, lastGood.Layout, lastGood.Manifest);
            if (bad.Count > 0)
                throw new InvalidDataException($"tensor '{bad[0]}' does not match its digest in the shadow");
            shadow.WriteManifest(lastGood.Manifest);
            var shadowed = new StagedVersion(lastGood.Version, lastGood.Manifest, shadow, _pool);
            shadow = null;
            bool moved = false;
            lock (_refs)
            {
                if (_lastGood == lastGood)
                {
                    _lastGood = shadowed;
                    _persisted = _persisted with { LastGoodStaging = Staged(shadowed) };
                    moved = true;
                }
            }
            if (!moved)
            {
                shadowed.Release(); // it stopped being last good meanwhile (a rollback, a newer activation)
                return;
            }
            lastGood.Release(); // the reference _lastGood held
            _manager.SaveState();
            Log.LogInformation("{Set}: last good version {Version} moved to host memory ({File}) in {Ms:0.0} ms", Name, lastGood.Version, shadowed.Buffer.FileName, clock.Elapsed.TotalMilliseconds);
        }
        catch (Exception e) when (e is IOException or InvalidDataException or NcclSwap.Cuda.CudaException or UnauthorizedAccessException)
        {
            if (shadow is not null)
                _pool.Return(shadow);
            Log.LogWarning("{Set}: the last good version {Version} stays in GPU memory: {Reason}", Name, lastGood.Version, e.Message);
        }
        finally
        {
            lastGood.Release();
        }
    }

    private Response Acknowledge(ConsumerRegistration? consumer, in Request request)
    {
        if (consumer is not { Mode: ConsumerMode.Flip })
            return Messages.NewResponse(request, Abi.Status.Invalid, "acknowledgements are for consumers registered in flip mode");
        // An acknowledgement may arrive after the next activation (the consumer switched, then the agent went on:
        // it may, since it writes only the slot nobody reads); it is recorded all the same, being true when sent.
        ulong state = request.Version;
        ulong active = ActiveState;
        if (state != active && !WasActivated(state) && !IsCanaryState(state))
            return Messages.NewResponse(request, Abi.Status.Invalid, $"acknowledged {Describe(state)}, which was never active; the active one is {Describe(active)}");
        consumer.Acknowledge(state);
        _acknowledged.Set();
        return Messages.NewResponse(request, Abi.Status.Ok);
    }

    private bool WasActivated(ulong state)
    {
        lock (_history)
            for (int i = _outcomes.Count - 1; i >= 0; i--)
                if (_outcomes[i].Result == UpdateResult.Activated && _outcomes[i].State == state)
                    return true;
        return false;
    }

    private void CopyIn(ConsumerRegistration consumer, Request request, RequestDispatcher dispatcher)
    {
        (ulong state, StagedVersion? source) = TargetOf(consumer);
        Response response;
        try
        {
            if (state == 0)
                response = Messages.NewResponse(request, Abi.Status.NotFound, $"no version of '{Name}' is active yet");
            else if (source is null || !source.WaitFilled(_manager.Options.AckTimeout))
                response = Messages.NewResponse(request, Abi.Status.NotFound, $"the staged bytes of version {VersionEntry.UnpackState(state).Version} are gone (a restart, or a copy that failed); the next version will do");
            else if (!consumer.TryEnter())
                return; // it left: nobody to answer
            else
            {
                string? failure;
                var clock = Stopwatch.StartNew();
                try
                {
                    failure = Deliver(source, consumer, 0, null);
                }
                finally
                {
                    consumer.Exit();
                }
                if (failure is null)
                {
                    consumer.Acknowledge(state);
                    _manager.Metrics.CopiedIn(Name, clock.Elapsed);
                    response = Messages.NewResponse(request with { Version = state }, Abi.Status.Ok, $"copied in {clock.Elapsed.TotalMilliseconds:0.00} ms");
                }
                else
                {
                    response = Messages.NewResponse(request, Abi.Status.Corrupt, failure);
                    Log.LogError("{Set}: copy-in of version {Version} into {Who} failed: {Failure}", Name, source.Version, consumer, failure);
                }
            }
        }
        catch (Exception e)
        {
            response = Messages.NewResponse(request, Abi.Status.Busy, $"copy-in failed: {e.Message}");
            Log.LogError(e, "{Set}: copy-in into {Who} failed", Name, consumer);
        }
        finally
        {
            source?.Release();
        }
        dispatcher.Reply(consumer.Session.Id, response);
    }

    /// <summary>
    /// A copy-in whose consumer does not wait: the agent's stream waits for the consumer's stream to write
    /// "quiesced" = N in the gate, copies the active version in, and writes "done" = N, which the consumer's stream
    /// waits for; so the engine's pause is the copy alone. The bytes are checked after "done" (the check is not
    /// part of the pause): a mismatch is answered as corrupt and the consumer copies in again at its next step.
    /// Whatever happens, "done" is written, so that the consumer's stream never waits forever.
    /// </summary>
    private void CopyInGated(ConsumerRegistration consumer, ConsumerGate gate, Request request, RequestDispatcher dispatcher)
    {
        uint sequence = (uint)request.Version;
        (ulong state, StagedVersion? source) = TargetOf(consumer);
        bool released = false; // "done" written (or queued on a stream that completed)
        Response? response = null;
        try
        {
            if (state == 0 || source is null || !source.WaitFilled(_manager.Options.AckTimeout))
                response = Messages.NewResponse(request, Abi.Status.NotFound, state == 0
                    ? $"no version of '{Name}' is active yet"
                    : $"the staged bytes of version {VersionEntry.UnpackState(state).Version} are gone (a restart, or a copy that failed); the next version will do");
            else if (!consumer.TryEnter())
                return; // it left: nobody to answer, and nobody waits on its gate
            else
            {
                try
                {
                    var clock = Stopwatch.StartNew();
                    ClientRegion target = consumer.Slot(0);
                    using (ICopyStream stream = Backend.CreateStream())
                    using (IDeviceEvent copied = Backend.CreateEvent())
                    {
                        stream.WaitValue(gate.Region.Buffer, ConsumerGate.QuiescedOffset, sequence);
                        stream.CopyAsync(target.Buffer, source.Buffer.Buffer, RegionLayout.CopyRuns(source.Layout, consumer.Layout, joinGaps: false));
                        stream.WriteValue(gate.Region.Buffer, ConsumerGate.DoneOffset, sequence);
                        stream.Record(copied);
                        WaitForGate(consumer, gate, sequence, copied);
                        released = true;
                    }
                    TimeSpan copy = clock.Elapsed;
                    List<string> bad = Mismatches(target.Buffer, consumer.Layout, source.Manifest);
                    if (bad.Count == 0)
                    {
                        consumer.Acknowledge(state);
                        _manager.Metrics.CopiedIn(Name, copy);
                        response = Messages.NewResponse(request with { Version = state }, Abi.Status.Ok, $"copied in {copy.TotalMilliseconds:0.00} ms, checked");
                    }
                    else
                    {
                        response = Messages.NewResponse(request, Abi.Status.Corrupt, $"tensor '{bad[0]}' does not match its digest after the copy-in; copy in again");
                        Log.LogError("{Set}: copy-in {Sequence} of version {Version} into {Who}: {Count} tensor(s) do not match their digests (first: '{Tensor}')",
                            Name, sequence, source.Version, consumer, bad.Count, bad[0]);
                    }
                }
                finally
                {
                    consumer.Exit();
                }
            }
        }
        catch (Exception e)
        {
            response = Messages.NewResponse(request, Abi.Status.Busy, $"copy-in failed: {e.Message}");
            Log.LogError(e, "{Set}: copy-in {Sequence} into {Who} failed", Name, sequence, consumer);
        }
        finally
        {
            if (!released)
                gate.Release(ConsumerGate.DoneOffset, sequence); // nothing (more) will come from the agent's stream
            source?.Release();
        }
        if (response is { } answer && !consumer.IsGone)
            dispatcher.Reply(consumer.Session.Id, answer);
    }

    /// <summary>
    /// Waits (on this worker, never on the consumer's host thread) until the gated copy has run. If the consumer
    /// goes away before its stream quiesced, the agent writes "quiesced" itself so that its own stream goes on;
    /// if it does not quiesce within the acknowledgement deadline, it is ended first.
    /// </summary>
    private void WaitForGate(ConsumerRegistration consumer, ConsumerGate gate, uint sequence, IDeviceEvent copied)
    {
        var clock = Stopwatch.StartNew();
        var spin = new SpinWait();
        while (!copied.IsComplete)
        {
            if (consumer.IsGone)
                gate.Release(ConsumerGate.QuiescedOffset, sequence);
            else if (clock.Elapsed > _manager.Options.AckTimeout)
                Evict(consumer, $"its stream did not quiesce for copy-in {sequence} within {_manager.Options.AckTimeout.TotalSeconds:0.###} s");
            spin.SpinOnce(sleep1Threshold: 32);
        }
    }

    /// <summary>Queues a return to the version that is last good now (its bytes held from this moment), ahead of any pending publish.</summary>
    private Response? Rollback(SessionInfo session, in Request request, RequestDispatcher dispatcher)
    {
        (UpdateOutcome? queued, int status, string error) = QueueRollback(session.Id, request, dispatcher);
        return queued is null ? Messages.NewResponse(request, status, error) : null;
    }

    /// <summary>
    /// Queues a return to the last good version (ahead of any pending publish); its outcome, or why not. With
    /// <paramref name="dispatcher"/>, the requester is answered there once it ends.
    /// </summary>
    internal (UpdateOutcome? Outcome, int Status, string Error) QueueRollback(long session, in Request request, RequestDispatcher? dispatcher)
    {
        StagedVersion? target;
        ulong lastGoodVersion;
        lock (_refs)
        {
            target = _lastGood?.AddReference();
            lastGoodVersion = _lastGoodVersion;
        }
        if (target is null)
            return (null, Abi.Status.NotFound, lastGoodVersion != 0
                ? $"the bytes of last good version {lastGoodVersion} were lost at a restart"
                : $"'{Name}' has no last good version to return to");
        var outcome = new UpdateOutcome(Name, target.Version, rollback: true, target.Manifest.TotalBytes);
        Record(outcome);
        lock (_queue)
        {
            if (!_stopping)
            {
                _rollbacks.Enqueue(new Job(outcome, target, session, request, dispatcher));
                Monitor.PulseAll(_queue);
                return (outcome, Abi.Status.Ok, "");
            }
        }
        target.Release();
        return (null, Abi.Status.Canceled, "the agent is stopping");
    }

    /// <summary>The latest outcome of <paramref name="version"/> (a publish, or a rollback to it).</summary>
    internal UpdateOutcome? OutcomeOf(ulong version, bool rollback)
    {
        lock (_history)
            return _outcomes.LastOrDefault(o => o.Version == version && o.IsRollback == rollback);
    }

    internal ulong LastGoodVersion
    {
        get
        {
            lock (_refs)
                return _lastGoodVersion;
        }
    }

    /// <summary>
    /// Where staging is and the pause a copy-in consumer can expect (one copy of the weights at the last snapshot's
    /// rate; a flip consumer's is a load and a switch of views), short enough for a status answer.
    /// </summary>
    public string Placement
    {
        get
        {
            if (_placement is null)
                return "staging not placed yet";
            string where = _pool.Place == StagingPlace.Device ? _shadowLastGood ? "GPU, last good host" : "GPU" : "host";
            double rate = _copyRate;
            return rate > 0 && _layout is { } layout ? $"staging {where}, copy-in ~{layout.TotalBytes / rate * 1e3:0.0} ms" : $"staging {where}";
        }
    }

    private Response StatusOf(in Request request)
    {
        if (request.Version == 0)
        {
            ulong state = ActiveState;
            int pending;
            lock (_queue)
                pending = (_pending is null ? 0 : 1) + _rollbacks.Count;
            return Messages.NewResponse(request with { Version = state }, Abi.Status.Ok,
                $"active {VersionEntry.UnpackState(state).Version}, last good {_lastGoodVersion}, {pending} queued, {Consumers.Count} consumer(s), {Placement}");
        }
        ulong version = request.Version;
        UpdateOutcome? outcome;
        lock (_history)
            outcome = _outcomes.LastOrDefault(o => o.Version == version && !o.IsRollback);
        return outcome is null
            ? Messages.NewResponse(request, Abi.Status.NotFound, $"version {request.Version} of '{Name}' is unknown")
            : Messages.NewResponse(request, outcome.Status, $"{outcome.Result.ToString().ToLowerInvariant()}{(outcome.Detail.Length > 0 ? ": " + outcome.Detail : "")}");
    }

    // ---------------------------------------------------------------------------------------------------------
    // The update

    private void Work()
    {
        while (true)
        {
            Job job;
            lock (_queue)
            {
                while (!_stopping && (_pending is null || _paused) && _rollbacks.Count == 0)
                    Monitor.Wait(_queue);
                if (_stopping)
                    return;
                if (_rollbacks.Count > 0)
                    job = _rollbacks.Dequeue();
                else
                {
                    job = _pending!;
                    _pending = null;
                    Monitor.PulseAll(_queue); // room for a queued publish
                }
                _busy = true;
            }
            try
            {
                Update(job);
            }
            catch (Exception e)
            {
                (int status, string detail, UpdateResult result) = Failure(e, "update");
                Finish(job, result, status, detail);
            }
            ShadowLastGood();
            lock (_queue)
                _busy = false;
        }
    }

    private void Update(Job job)
    {
        if (job.Source is null)
        {
            UpdateDirect(job);
            return;
        }
        UpdateOutcome outcome = job.Outcome;
        StagedVersion source = job.Source;
        Task<PreparedState?>? prepared = null;
        bool activated = false;
        try
        {
            outcome.Result = UpdateResult.Staging;
            if (!source.WaitFilled(_manager.Options.AckTimeout))
                throw new UpdateException(Abi.Status.NotFound, $"the staged copy of version {source.Version} could not be made; not activated", UpdateResult.Failed);
            ulong current = ActiveState;
            int slot = current == 0 ? 0 : 1 - VersionEntry.UnpackState(current).Slot;
            prepared = PrepareActivation(source, slot, outcome.IsRollback);
            outcome.Phase = "verifying";
            outcome.Progress = 0.05;
            var clock = Stopwatch.StartNew();
            List<string> bad = Mismatches(source.Buffer.Buffer, source.Layout, source.Manifest);
            outcome.Verify += clock.Elapsed;
            if (bad.Count > 0)
                throw new UpdateException(Abi.Status.Corrupt, $"the staged bytes of tensor '{bad[0]}'{(bad.Count > 1 ? $" (and {bad.Count - 1} more)" : "")} do not match the digest taken from the publisher's; not activated", UpdateResult.Failed);

            var done = new HashSet<ConsumerRegistration>();
            if (!outcome.IsRollback && current != 0 && _manager.Options.PolicyFor(Name).Canary is { } canary && RunCanary(job, source, slot, canary) is { } canaries)
                done.UnionWith(canaries); // they hold it already
            outcome.Phase = "staging";
            while (true)
            {
                StopCheck();
                var todo = Consumers.Where(c => c.Mode == ConsumerMode.Flip && !done.Contains(c)).ToList();
                outcome.Progress = 0.1 + 0.85 * done.Count / Math.Max(1, done.Count + todo.Count);
                if (todo.Count == 0)
                {
                    lock (_membership)
                    {
                        if (Consumers.Any(c => c.Mode == ConsumerMode.Flip && !done.Contains(c)))
                            continue; // one joined meanwhile: it needs the version too
                        StopCheck();
                        outcome.Phase = "activating";
                        Activate(job, slot, prepared);
                        activated = true;
                        return;
                    }
                }
                WaitUntilFree(slot, todo, outcome);
                foreach (ConsumerRegistration consumer in todo)
                {
                    done.Add(consumer);
                    if (!consumer.TryEnter())
                        continue; // it left
                    string? failure;
                    try
                    {
                        failure = Deliver(source, consumer, slot, outcome);
                    }
                    finally
                    {
                        consumer.Exit();
                    }
                    if (failure is not null)
                        throw new UpdateException(Abi.Status.Corrupt, $"{failure}; not activated", UpdateResult.Failed);
                    outcome.Consumers++;
                }
            }
        }
        finally
        {
            if (!activated)
            {
                EndCanary(); // canaries go back to the active version, whatever ended the update
                source.Release();
                Discard(prepared);
            }
        }
    }

    /// <summary>
    /// A publish taken straight into the flip consumers' free slots: one copy from the publisher into each (the first
    /// digests what it reads: the manifest), every slot checked (a bad tensor copied again from the publisher), the
    /// publisher answered, the version activated; then the staged copy (for copy-in consumers, new consumers and
    /// rollback) is filled from a checked slot, off the activation's path. If a flip consumer still reads the slot
    /// (the publisher must not wait for it) or none is left, the snapshot goes to staging first, as without flip consumers.
    /// </summary>
    private void UpdateDirect(Job job)
    {
        UpdateOutcome outcome = job.Outcome;
        PublisherRegistration publisher = job.Publisher!;
        outcome.Result = UpdateResult.Staging;
        ulong current = ActiveState;
        int slot = current == 0 ? 0 : 1 - VersionEntry.UnpackState(current).Slot;
        var entered = new List<ConsumerRegistration>();
        StagedVersion? staged = null;
        Task<PreparedState?>? prepared = null;
        bool activated = false;
        if (!publisher.TryEnter())
            throw new UpdateException(Abi.Status.Canceled, "the publisher left before its snapshot was taken", UpdateResult.Abandoned);
        bool holdsPublisher = true;
        RegionLayout packed = _layout!;
        _placement ??= Place(publisher, packed.Length);
        StagingBuffer? buffer = AcquireStaging(packed.Length); // outside the lock: a first file can take a while to pin
        try
        {
            lock (_membership)
            {
                StopCheck();
                // Consumers that joined since the last activation read the active slot, never this one.
                foreach (ConsumerRegistration consumer in Consumers.Where(c => c.Mode == ConsumerMode.Flip && !c.MayRead(slot)))
                    if (consumer.TryEnter())
                        entered.Add(consumer);
                if (entered.Count > 0 && entered.Count == Consumers.Count(c => c.Mode == ConsumerMode.Flip))
                {
                    // The first slot's copy yields the manifest (the digests of the publisher's bytes as read); the others are copies.
                    outcome.Started();
                    var clock = Stopwatch.StartNew();
                    Manifest manifest = publisher.Layout.ToManifest(
                        Backend.CopyAndDigest(entered[0].Slot(slot).Buffer, publisher.Region.Buffer, RegionLayout.TensorRuns(publisher.Layout, entered[0].Layout)));
                    Authenticate(job, manifest); // before any other copy: an unsigned or forged version goes no further
                    if (entered.Count > 1)
                        using (ICopyStream stream = Backend.CreateStream())
                        {
                            foreach (ConsumerRegistration consumer in entered.Skip(1))
                                stream.CopyAsync(consumer.Slot(slot).Buffer, publisher.Region.Buffer,
                                    RegionLayout.CopyRuns(publisher.Layout, consumer.Layout, joinGaps: !consumer.Slot(slot).IsDevice));
                            stream.Synchronize();
                        }
                    outcome.Stage += clock.Elapsed;
                    _copyRate = outcome.Bytes / Math.Max(clock.Elapsed.TotalSeconds / entered.Count, 1e-9);
                    staged = new StagedVersion(outcome.Version, manifest, buffer, _pool, filled: false);
                    buffer = null;
                    prepared = PrepareActivation(staged, slot, rollback: false);
                    foreach (ConsumerRegistration consumer in entered)
                        if (Deliver(publisher.Region.Buffer, publisher.Layout, manifest, consumer, slot, outcome, copied: true) is { } failure)
                            throw new UpdateException(Abi.Status.Corrupt, $"{failure}; not activated", UpdateResult.Failed);
                    outcome.Snapshot = outcome.Stage + outcome.Verify;
                    Answer(job, Abi.Status.Ok, $"taken into {entered.Count} slot(s) in {outcome.Snapshot.TotalMilliseconds:0.00} ms");
                    publisher.Exit();
                    holdsPublisher = false;
                    outcome.Consumers = entered.Count;
                    // A publisher that waits for the outcome hears once the staged copy is made too, so that a crash
                    // right after its answer still finds the version's bytes in staging.
                    Activate(job with { Source = staged, WaitFor = null }, slot, prepared);
                    activated = true;
                }
            }
            if (!activated)
            {
                // A flip consumer still reads the slot, or none is left: staging first, and the publisher goes on.
                foreach (ConsumerRegistration consumer in entered)
                    consumer.Exit();
                entered.Clear();
                publisher.Exit();
                holdsPublisher = false;
                _pool.Return(buffer!);
                buffer = null;
                StagedVersion snapshot = TakeSnapshot(publisher, job);
                Answer(job, Abi.Status.Ok, $"snapshot taken in {outcome.Snapshot.TotalMilliseconds:0.00} ms");
                Update(job with { Source = snapshot });
                return;
            }
            WaitForSwitch(entered, outcome.State);
            string? unstaged = Fill(staged!, entered[0], slot);
            job.WaitFor?.Reply(job.Session, Messages.NewResponse(job.Request with { Version = outcome.State }, Abi.Status.Ok,
                unstaged is null ? "" : $"activated; its staged copy could not be made: {unstaged}"));
        }
        finally
        {
            if (holdsPublisher)
                publisher.Exit();
            foreach (ConsumerRegistration consumer in entered)
                consumer.Exit();
            if (!activated)
            {
                staged?.Release();
                Discard(prepared);
            }
            if (buffer is not null)
                _pool.Return(buffer);
        }
    }

    /// <summary>
    /// Gives flip consumers that step often a moment (<see cref="SwitchGrace"/> at most) to switch to
    /// <paramref name="state"/> before the staged copy is filled: on a GPU, the agent's kernels take turns with the
    /// engine's, and the switch should not wait for them. Nobody is ended for taking longer.
    /// </summary>
    private void WaitForSwitch(List<ConsumerRegistration> consumers, ulong state)
    {
        var clock = Stopwatch.StartNew();
        while (consumers.Any(c => !c.IsGone && c.Serving != state) && clock.Elapsed < SwitchGrace && !_stopping)
            _acknowledged.WaitOne(TimeSpan.FromMilliseconds(1));
    }

    private static readonly TimeSpan SwitchGrace = TimeSpan.FromMilliseconds(100);

    /// <summary>
    /// Fills a version's staged copy from a flip consumer's slot that was checked, and checks it; until then copy-ins,
    /// new consumers and rollbacks wait for it. If it cannot be made, the version's bytes are dropped from staging
    /// (flip consumers serve it from their slots; the others get the next version).
    /// </summary>
    private string? Fill(StagedVersion staged, ConsumerRegistration from, int slot)
    {
        var clock = Stopwatch.StartNew();
        try
        {
            Copy(from.Slot(slot).Buffer, staged.Buffer.Buffer, RegionLayout.CopyRuns(from.Layout, staged.Layout));
            List<string> bad = Mismatches(staged.Buffer.Buffer, staged.Layout, staged.Manifest);
            if (bad.Count > 0)
                throw new InvalidDataException($"tensor '{bad[0]}' does not match its digest there{(bad.Count > 1 ? $" (and {bad.Count - 1} more)" : "")}");
            staged.Filled(true);
            Log.LogDebug("{Set}: staged copy of version {Version} filled from {Who} in {Ms:0.0} ms", Name, staged.Version, from, clock.Elapsed.TotalMilliseconds);
            return null;
        }
        catch (Exception e) when (e is InvalidDataException or IOException or NcclSwap.Cuda.CudaException or ArgumentException)
        {
            staged.Filled(false);
            bool dropped = false;
            lock (_refs)
            {
                if (_active == staged)
                {
                    _active = null;
                    _persisted = _persisted with { ActiveStaging = null };
                    dropped = true;
                }
            }
            if (dropped)
                staged.Release();
            Log.LogError("{Set}: the staged copy of version {Version} could not be made ({Reason}); flip consumers serve it from their slots, copy-in and new consumers get the next version",
                Name, staged.Version, e.Message);
            return e.Message;
        }
    }

    /// <summary>
    /// Waits until none of <paramref name="consumers"/> reads <paramref name="slot"/> (they acknowledge the active
    /// version, in the other slot); a consumer that has not by the deadline is ended, so it cannot hold up updates.
    /// </summary>
    private void WaitUntilFree(int slot, List<ConsumerRegistration> consumers, UpdateOutcome outcome)
    {
        var clock = Stopwatch.StartNew();
        TimeSpan timeout = _manager.Options.AckTimeout;
        while (true)
        {
            var readers = consumers.Where(c => !c.IsGone && c.MayRead(slot)).ToList();
            if (readers.Count == 0)
                break;
            TimeSpan left = timeout - clock.Elapsed;
            if (left <= TimeSpan.Zero)
            {
                foreach (ConsumerRegistration reader in readers)
                {
                    Evict(reader, $"no acknowledgement of {Describe(ActiveState)} within {timeout.TotalSeconds:0.###} s (it last acknowledged {Describe(reader.Serving)}), and the next version needs slot {slot}");
                    lock (outcome.Evicted)
                        outcome.Evicted.Add(reader.ToString());
                }
                break;
            }
            StopCheck();
            // An acknowledgement rings; a gate's word, written by a GPU stream, does not: poll those often.
            TimeSpan poll = TimeSpan.FromMilliseconds(readers.Any(r => r.Gate is not null) ? 1 : 50);
            _acknowledged.WaitOne(left < poll ? left : poll);
        }
        outcome.AckWait += clock.Elapsed;
    }

    /// <summary>
    /// Writes ahead (on another thread, while the caller verifies) the state that activating <paramref name="source"/>
    /// in <paramref name="slot"/> will save, so that <see cref="Activate"/> has only a rename to do. Null where it could not.
    /// </summary>
    private Task<PreparedState?> PrepareActivation(StagedVersion source, int slot, bool rollback)
    {
        WeightSetState next;
        lock (_refs)
            next = NextPersisted(source, slot, rollback ? null : _active, rollback ? 0 : VersionEntry.UnpackState(_activeState).Version);
        return Task.Run(() =>
        {
            try
            {
                return _manager.PrepareState(Name, next);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                Log.LogWarning("{Set}: the state for version {Version} could not be written ahead ({Reason}); it is written at activation", Name, source.Version, e.Message);
                return (PreparedState?)null;
            }
        });
    }

    /// <summary>Deletes a state written ahead for an activation that did not happen.</summary>
    private static void Discard(Task<PreparedState?>? prepared)
    {
        if (prepared is not null)
            prepared.ContinueWith(t => t.Result?.Dispose(), TaskContinuationOptions.OnlyOnRanToCompletion);
    }

    /// <summary>The weight set's persisted state once <paramref name="source"/> is active in <paramref name="slot"/>. Under <c>_refs</c>.</summary>
    private WeightSetState NextPersisted(StagedVersion source, int slot, StagedVersion? lastGood, ulong lastGoodVersion) =>
        new(Name, new ActiveVersion(source.Version, slot, source.Manifest.Digest.Value), lastGoodVersion, HighestPublished,
            Staged(source), lastGood is null ? null : Staged(lastGood));

    /// <summary>
    /// Under <c>_membership</c>: saves the new state (renaming <paramref name="prepared"/> into place when it holds it),
    /// then makes it visible with one store in the table.
    /// </summary>
    private void Activate(Job job, int slot, Task<PreparedState?>? prepared = null)
    {
        StagedVersion source = job.Source!;
        UpdateOutcome outcome = job.Outcome;
        var clock = Stopwatch.StartNew();
        ulong state = VersionEntry.PackState(source.Version, slot);
        PreparedState? ahead = null;
        try
        {
            ahead = prepared?.GetAwaiter().GetResult();
        }
        catch (Exception e)
        {
            Log.LogWarning("{Set}: the state written ahead for version {Version} is not usable ({Reason})", Name, source.Version, e.Message);
        }
        lock (_refs)
        {
            StagedVersion? previousActive = _active, previousLastGood = _lastGood;
            WeightSetState previousPersisted = _persisted;
            ulong previousVersion = VersionEntry.UnpackState(_activeState).Version;
            StagedVersion? lastGood = outcome.IsRollback ? null : previousActive;
            ulong lastGoodVersion = outcome.IsRollback ? 0 : previousVersion;

            source.Buffer.WriteManifest(source.Manifest);
            _persisted = NextPersisted(source, slot, lastGood, lastGoodVersion);
            try
            {
                // Renamed into place before the switch, so that an agent killed at any point finds the state it
                // switched to; flushed to disk just after it (below), off the engines' path.
                _manager.SaveState(flush: false, ahead);
            }
            catch
            {
                _persisted = previousPersisted;
                ahead?.Dispose();
                throw;
            }
            foreach (ConsumerRegistration consumer in _consumers)
                if (consumer.Mode == ConsumerMode.Flip)
                    consumer.Activated(state); // before the store: an acknowledgement can only follow it
            _manager.Table.Activate(Row, source.Version, slot, source.Manifest.Digest.Value, lastGoodVersion);
            _activeState = state;
            _active = source;
            _canary = null; // the store above showed the version to all, and the table's canary words are cleared
            _lastGood = lastGood;
            _lastGoodVersion = lastGoodVersion;
            // References: the job's moves to active; the old active's to last good (publish) or away (rollback).
            if (outcome.IsRollback)
            {
                previousActive?.Release();
                previousLastGood?.Release();
            }
            else
                previousLastGood?.Release();
        }
        outcome.Activate = clock.Elapsed;
        outcome.State = state;
        try
        {
            _manager.FlushState(); // before anyone hears of the activation
        }
        catch (IOException e)
        {
            Log.LogError("{Set}: version {Version} is active, but the state file could not be flushed to disk ({Reason}): a power loss now would forget it", Name, source.Version, e.Message);
        }
        Finish(job, UpdateResult.Activated, Abi.Status.Ok, "");
    }

    private ulong HighestPublished
    {
        get
        {
            lock (_queue)
                return _highestPublished;
        }
    }

    /// <summary>What the state file says of a staged version: its file, or nothing for device memory, which a restart loses.</summary>
    private static StagedFile? Staged(StagedVersion version) =>
        version.Buffer.Place == StagingPlace.Device ? null : new(version.Version, version.Buffer.FileName, version.Manifest.Digest.Value);

    /// <summary>
    /// Copies <paramref name="source"/> into <paramref name="consumer"/>'s slot and checks every tensor there
    /// against the manifest, copying a bad tensor again up to the configured number of times. Null when the slot
    /// holds the version exactly, else what stayed wrong. The caller holds the consumer (<c>TryEnter</c>).
    /// </summary>
    private string? Deliver(StagedVersion source, ConsumerRegistration consumer, int slot, UpdateOutcome? outcome)
    {
        if (!source.WaitFilled(_manager.Options.AckTimeout))
            return $"the staged copy of version {source.Version} could not be made";
        return Deliver(source.Buffer.Buffer, source.Layout, source.Manifest, consumer, slot, outcome, copied: false);
    }

    /// <summary>
    /// <see cref="Deliver(StagedVersion, ConsumerRegistration, int, UpdateOutcome?)"/> from any buffer laid out as
    /// <paramref name="layout"/> (a publisher's tensors); <paramref name="copied"/> when the bytes are in place already.
    /// </summary>
    private string? Deliver(IDeviceBuffer from, RegionLayout layout, Manifest manifest, ConsumerRegistration consumer, int slot, UpdateOutcome? outcome, bool copied)
    {
        ClientRegion target = consumer.Slot(slot);
        var clock = Stopwatch.StartNew();
        if (!copied)
            Copy(from, target.Buffer, RegionLayout.CopyRuns(layout, consumer.Layout, joinGaps: !target.IsDevice));
        if (outcome is not null)
            outcome.Stage += clock.Elapsed;
        for (int attempt = 0; ; attempt++)
        {
            clock.Restart();
            List<string> bad = Mismatches(target.Buffer, consumer.Layout, manifest);
            if (outcome is not null)
                outcome.Verify += clock.Elapsed;
            if (bad.Count == 0)
                return null;
            if (attempt == _manager.Options.Resends)
                return $"{consumer}'s region '{target.Name}': tensor '{bad[0]}' does not match its digest after {attempt} re-send(s)";
            Log.LogWarning("{Set}: version {Version}: {Count} tensor(s) in {Who}'s '{Region}' do not match their digests (first: '{Tensor}'); sending them again",
                Name, outcome?.Version, bad.Count, consumer, target.Name, bad[0]);
            clock.Restart();
            Copy(from, target.Buffer, RegionLayout.CopyRuns(layout, consumer.Layout, bad, joinGaps: !target.IsDevice));
            if (outcome is not null)
            {
                outcome.Stage += clock.Elapsed;
                outcome.Resent += bad.Count;
            }
        }
    }

    private void Copy(IDeviceBuffer from, IDeviceBuffer to, List<CopyRun> runs)
    {
        using ICopyStream stream = Backend.CreateStream();
        stream.CopyAsync(to, from, runs);
        stream.Synchronize();
    }

    /// <summary>The tensors of <paramref name="layout"/> in <paramref name="buffer"/> whose digest differs from the manifest's.</summary>
    private List<string> Mismatches(IDeviceBuffer buffer, RegionLayout layout, Manifest manifest)
    {
        Digest[] digests = Backend.Digests(buffer, Ranges(layout));
        var bad = new List<string>();
        for (int i = 0; i < digests.Length; i++)
        {
            ManifestEntry expected = manifest.Tensors[i];
            if (expected.Name != layout.Tensors[i].Name)
                throw new InvalidOperationException($"the manifest's tensor {i} is '{expected.Name}', the layout's '{layout.Tensors[i].Name}'");
            if (digests[i] != expected.Digest)
                bad.Add(expected.Name);
        }
        return bad;
    }

    private static List<(long Offset, long Length)> Ranges(RegionLayout layout) => layout.Tensors.Select(t => (t.Offset, t.Bytes)).ToList();

    private void StopCheck()
    {
        if (_stopping)
            throw new UpdateException(Abi.Status.Canceled, "the agent stopped before activating it", UpdateResult.Abandoned);
    }

    private (int Status, string Detail, UpdateResult Result) Failure(Exception e, string phase)
    {
        if (e is UpdateException update)
            return (update.Status, update.Message, update.Result);
        Log.LogError(e, "{Set}: {Phase} failed", Name, phase);
        return (Abi.Status.Busy, $"{phase} failed: {e.Message}", UpdateResult.Failed);
    }

    private void Finish(Job job, UpdateResult result, int status, string detail)
    {
        UpdateOutcome outcome = job.Outcome;
        outcome.Result = result;
        outcome.Status = status;
        if (detail.Length > 0 || result != UpdateResult.Activated)
            outcome.Detail = detail; // an activation with nothing to add keeps what its canary's promotion said
        outcome.Phase = result.ToString().ToLowerInvariant();
        outcome.Progress = 1;
        if (result == UpdateResult.Superseded)
            job.Source?.Release(); // never reached the worker, whose update releases what it does not activate
        if (job.WaitFor is { } dispatcher)
            dispatcher.Reply(job.Session, Messages.NewResponse(job.Request with { Version = outcome.State != 0 ? outcome.State : job.Request.Version }, status, detail));
        Answer(job, status, detail); // a publisher still waiting for its snapshot (taken by the worker) learns why not
        if (result == UpdateResult.Activated)
            Log.LogInformation("{Outcome}", outcome);
        else if (result is UpdateResult.Failed)
            Log.LogError("{Outcome}", outcome);
        else
            Log.LogInformation("{Outcome}", outcome);
        _manager.Report(outcome);
    }

    private void Record(UpdateOutcome outcome)
    {
        lock (_history)
        {
            if (_outcomes.Count == HistoryLimit)
                _outcomes.RemoveAt(0);
            _outcomes.Add(outcome);
        }
    }

    private static string Describe(ulong state)
    {
        if (state == 0)
            return "no version";
        (ulong version, int slot) = VersionEntry.UnpackState(state);
        return $"version {version} (slot {slot})";
    }

    // ---------------------------------------------------------------------------------------------------------
    // Restart

    /// <summary>Puts back what a previous life of the agent persisted, trusting staged bytes only once their digests match.</summary>
    private void Recover(WeightSetState persisted)
    {
        _highestPublished = persisted.HighestPublished;
        if (persisted.Active is { } active)
        {
            _manager.Table.Restore(Row, active.Version, active.Slot, active.ManifestDigest, persisted.LastGood);
            _activeState = VersionEntry.PackState(active.Version, active.Slot);
            _lastGoodVersion = persisted.LastGood;
            _active = RecoverStaged(persisted.ActiveStaging, active.Version, active.ManifestDigest, "active");
            if (persisted.LastGoodStaging is { } lastGood)
                _lastGood = RecoverStaged(lastGood, persisted.LastGood, lastGood.ManifestDigest, "last good");
            _layout = (_active ?? _lastGood)?.Layout;
        }
        else
            _manager.Table.Reset(Row);
        _persisted = persisted with
        {
            ActiveStaging = _active is null ? null : persisted.ActiveStaging,
            LastGoodStaging = _lastGood is null ? null : persisted.LastGoodStaging,
        };
    }

    private StagedVersion? RecoverStaged(StagedFile? file, ulong version, ulong manifestDigest, string what)
    {
        if (file is null || file.Version != version)
        {
            Log.LogWarning("{Set}: no staged bytes of {What} version {Version} were recorded", Name, what, version);
            return null;
        }
        string path = Path.Combine(_manager.Options.StagingDirectory, file.File);
        StagingBuffer? buffer = null;
        try
        {
            var clock = Stopwatch.StartNew();
            buffer = StagingBuffer.Open(path, Backend);
            Manifest manifest = buffer.ReadManifest();
            if (manifest.Digest.Value != manifestDigest)
                throw new InvalidDataException($"its manifest's digest is {manifest.Digest}, the state says {manifestDigest:x16}");
            RegionLayout layout = RegionLayout.Packed(manifest);
            if (layout.Length > buffer.Length)
                throw new InvalidDataException($"it holds {buffer.Length} bytes, the manifest's tensors need {layout.Length}");
            List<string> bad = Mismatches(buffer.Buffer, layout, manifest);
            if (bad.Count > 0)
                throw new InvalidDataException($"tensor '{bad[0]}' does not match its digest ({bad.Count} tensor(s) in all)");
            _pool.Adopt(buffer);
            Log.LogInformation("{Set}: recovered {What} version {Version} from {File} ({Bytes} bytes, digests checked in {Ms:0.0} ms)", Name, what, version, path, manifest.TotalBytes, clock.Elapsed.TotalMilliseconds);
            return new StagedVersion(version, manifest, buffer, _pool);
        }
        catch (Exception e) when (e is IOException or InvalidDataException or FormatException or UnauthorizedAccessException or JsonException)
        {
            buffer?.Dispose();
            Log.LogWarning("{Set}: the staged bytes of {What} version {Version} in {File} cannot be used ({Reason}); consumers keep serving it from their own memory, but it cannot be given to new consumers{Rollback} until the next version is published",
                Name, what, version, path, e.Message, what == "active" ? "" : " or rolled back to");
            return null;
        }
    }

    // ---------------------------------------------------------------------------------------------------------

    /// <summary>Stops the worker: the update in flight and every queued one are abandoned, nothing more is activated.</summary>
    public void Stop()
    {
        List<Job> abandoned;
        lock (_queue)
        {
            _stopping = true;
            abandoned = [.. _rollbacks];
            _rollbacks.Clear();
            if (_pending is not null)
                abandoned.Add(_pending);
            _pending = null;
            Monitor.PulseAll(_queue);
        }
        _acknowledged.Set();
        _worker.Join();
        lock (_snapshot)
        {
            // No snapshot is in progress past this point; the ones that were have queued or abandoned their job.
        }
        foreach (Job job in abandoned)
        {
            Finish(job, UpdateResult.Abandoned, Abi.Status.Canceled, "the agent stopped before activating it");
            job.Source?.Release();
        }
    }

    /// <summary>After <see cref="Stop"/>: unmaps everything. The active and last good versions' files stay for the next life.</summary>
    public void Dispose()
    {
        var clock = Stopwatch.StartNew();
        while (Volatile.Read(ref _background) > 0 && clock.Elapsed < TimeSpan.FromSeconds(30))
            Thread.Sleep(1);
        foreach (ConsumerRegistration consumer in Consumers)
            consumer.Leave();
        _publisher?.Leave();
        _pool.Dispose();
        _acknowledged.Dispose();
    }

    /// <summary>An update (a publish or a rollback), whose requester may wait for its outcome.</summary>
    /// <remarks>
    /// <see cref="Source"/> is null for a publish whose bytes the worker takes straight into the flip consumers'
    /// slots (<see cref="Publisher"/>); <see cref="Answer"/> is set when the publisher waits for the snapshot only.
    /// </remarks>
    private sealed record Job(UpdateOutcome Outcome, StagedVersion? Source, long Session, Request Request, RequestDispatcher? WaitFor)
    {
        public PublisherRegistration? Publisher { get; init; }

        public SnapshotAnswer? Answer { get; init; }
    }

    /// <summary>The answer a publisher gets once its bytes are safe (or why not), given once.</summary>
    private sealed class SnapshotAnswer(RequestDispatcher dispatcher)
    {
        private int _given;

        public void Give(long session, Response response)
        {
            if (Interlocked.Exchange(ref _given, 1) == 0)
                dispatcher.Reply(session, response);
        }
    }

    private sealed class UpdateException(int status, string message, UpdateResult result) : Exception(message)
    {
        public int Status { get; } = status;

        public UpdateResult Result { get; } = result;
    }
}

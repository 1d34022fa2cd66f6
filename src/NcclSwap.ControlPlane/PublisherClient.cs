using NcclSwap.ControlPlane.Abi;
using NcclSwap.ControlPlane.Signing;
using NcclSwap.DataPlane;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane;

/// <summary>What the agent answered to a publish.</summary>
public readonly record struct PublishResult(int Status, string Detail, ulong State)
{
    public bool Ok => Status == Abi.Status.Ok;

    public override string ToString() => Ok ? $"ok ({Detail})" : $"{Abi.Status.Name(Status)}: {Detail}";
}

/// <summary>
/// A trainer's side: its tensors in a <see cref="WeightRegion"/> (or in GPU memory of its own, <see cref="ConnectDevice"/>)
/// registered once with the agent, then <see cref="Publish"/> per step, which returns once the agent has its own copy
/// (the trainer may then go on changing the tensors).
/// </summary>
public sealed class PublisherClient : IDisposable
{
    private readonly string _socketPath;
    private readonly string _weightSet;
    private readonly TimeSpan _timeout;
    private readonly RegistrationRequest _registration;
    private readonly WeightRegion? _tensors;
    private ChannelClient _channel;

    private PublisherClient(string socketPath, string weightSet, RegistrationRequest registration, TimeSpan timeout)
    {
        _socketPath = socketPath;
        _weightSet = weightSet;
        _registration = registration;
        _tensors = registration.Regions.FirstOrDefault();
        _timeout = timeout;
        _channel = Register();
    }

    /// <summary>Where the trainer writes the weights it publishes (shared memory; see <see cref="ConnectDevice"/> for GPU memory).</summary>
    public WeightRegion Tensors => _tensors ?? throw new InvalidOperationException($"the tensors of this publisher of '{_weightSet}' are GPU memory of its own, not shared memory");

    /// <summary>Where the tensors lie in the region.</summary>
    public RegionLayout Layout => _registration.Layout;

    public ChannelClient Channel => _channel;

    public static PublisherClient Connect(string socketPath, string weightSet, RegionLayout layout, TimeSpan? timeout = null)
    {
        var tensors = WeightRegion.Create("tensors", layout);
        try
        {
            return new PublisherClient(socketPath, weightSet, new RegistrationRequest(layout, [tensors]), timeout ?? TimeSpan.FromSeconds(60));
        }
        catch
        {
            tensors.Dispose();
            throw;
        }
    }

    /// <summary>
    /// A publisher whose tensors lie in GPU memory that the caller owns and keeps while the publisher lives
    /// (<paramref name="region"/>, laid out as <paramref name="layout"/>); the agent opens it through CUDA IPC, so it
    /// must run the cuda backend on that GPU's machine. Publish only once the GPU's work on the tensors is done.
    /// </summary>
    public static PublisherClient ConnectDevice(string socketPath, string weightSet, RegionLayout layout, DeviceRegion region, TimeSpan? timeout = null)
    {
        if (region.Bytes < layout.Length)
            throw new ArgumentException($"region '{region.Name}' holds {region.Bytes} bytes; its tensors reach byte {layout.Length}", nameof(region));
        return new PublisherClient(socketPath, weightSet, new RegistrationRequest(layout, [], DeviceRegions: [region]), timeout ?? TimeSpan.FromSeconds(60));
    }

    private ChannelClient Register() => ChannelClient.Connect(_socketPath, Role.Publisher, _weightSet, _timeout, _registration);

    /// <summary>
    /// Publishes <paramref name="version"/> (greater than any before): returns when the snapshot is taken, or with
    /// <paramref name="wait"/> when the version is activated, superseded or has failed. Throws
    /// <see cref="ChannelClosedException"/> if the agent goes away meanwhile (then <see cref="Reconnect"/>).
    /// </summary>
    /// <remarks>
    /// With <paramref name="signer"/>, the version goes out signed (<see cref="VersionSignature"/>): over the manifest
    /// of the tensors as they are now, digested here on the CPU for shared memory, or <paramref name="manifest"/>,
    /// which a publisher whose tensors are GPU memory must give (their digests taken on the GPU). The agent checks the
    /// signature against the bytes it took, so the tensors must not change until the snapshot is taken.
    /// </remarks>
    public PublishResult Publish(ulong version, bool wait = false, TimeSpan? timeout = null, SigningKey? signer = null, Manifest? manifest = null)
    {
        Request request = _channel.NewRequest(RequestKind.Publish, version, wait ? AbiConstants.PublishWait : (ushort)0);
        if (signer is not null)
        {
            manifest ??= _tensors is { } tensors
                ? ManifestOf(tensors)
                : throw new ArgumentException($"the tensors of this publisher of '{_weightSet}' are GPU memory: give the manifest to sign (their digests taken on the GPU)", nameof(manifest));
            request = VersionSignature.Attach(request, signer.Id, signer.Sign(_weightSet, version, manifest.Sha256));
        }
        Response response = _channel.Call(request, timeout ?? _timeout);
        return new PublishResult(response.Status, ChannelClient.Detail(response), response.Version);
    }

    /// <summary>The manifest of the tensors in <paramref name="region"/> as they are now: what the agent's snapshot of them yields.</summary>
    public static Manifest ManifestOf(WeightRegion region) =>
        region.Layout.ToManifest(region.Layout.Tensors.Select(t => BlockDigest.Compute(region.Pointer + (nint)t.Offset, t.Bytes)).ToList());

    /// <summary>A new session with the agent (after it restarted), registering the same tensors.</summary>
    public void Reconnect()
    {
        ChannelClient fresh = Register();
        ChannelClient old = _channel;
        _channel = fresh;
        old.Dispose();
    }

    public void Dispose()
    {
        _channel.Dispose();
        _tensors?.Dispose();
    }
}

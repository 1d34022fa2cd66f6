using NcclSwap.ControlPlane.Abi;
using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane;

/// <summary>What the agent answered to a publish.</summary>
public readonly record struct PublishResult(int Status, string Detail, ulong State)
{
    public bool Ok => Status == Abi.Status.Ok;

    public override string ToString() => Ok ? $"ok ({Detail})" : $"{Abi.Status.Name(Status)}: {Detail}";
}

/// <summary>
/// A trainer's side: its tensors in a <see cref="WeightRegion"/> registered once with the agent, then
/// <see cref="Publish"/> per step, which returns once the agent has its own copy (the trainer may then go on
/// changing the tensors).
/// </summary>
public sealed class PublisherClient : IDisposable
{
    private readonly string _socketPath;
    private readonly string _weightSet;
    private readonly TimeSpan _timeout;
    private ChannelClient _channel;

    private PublisherClient(string socketPath, string weightSet, WeightRegion tensors, TimeSpan timeout, ChannelClient channel)
    {
        _socketPath = socketPath;
        _weightSet = weightSet;
        Tensors = tensors;
        _timeout = timeout;
        _channel = channel;
    }

    /// <summary>Where the trainer writes the weights it publishes.</summary>
    public WeightRegion Tensors { get; }

    public ChannelClient Channel => _channel;

    public static PublisherClient Connect(string socketPath, string weightSet, RegionLayout layout, TimeSpan? timeout = null)
    {
        var tensors = WeightRegion.Create("tensors", layout);
        try
        {
            TimeSpan wait = timeout ?? TimeSpan.FromSeconds(60);
            return new PublisherClient(socketPath, weightSet, tensors, wait, Register(socketPath, weightSet, tensors, wait));
        }
        catch
        {
            tensors.Dispose();
            throw;
        }
    }

    private static ChannelClient Register(string socketPath, string weightSet, WeightRegion tensors, TimeSpan timeout) =>
        ChannelClient.Connect(socketPath, Role.Publisher, weightSet, timeout, new RegistrationRequest(tensors.Layout, [tensors]));

    /// <summary>
    /// Publishes <paramref name="version"/> (greater than any before): returns when the snapshot is taken, or with
    /// <paramref name="wait"/> when the version is activated, superseded or has failed. Throws
    /// <see cref="ChannelClosedException"/> if the agent goes away meanwhile (then <see cref="Reconnect"/>).
    /// </summary>
    public PublishResult Publish(ulong version, bool wait = false, TimeSpan? timeout = null)
    {
        Request request = _channel.NewRequest(RequestKind.Publish, version, wait ? AbiConstants.PublishWait : (ushort)0);
        Response response = _channel.Call(request, timeout ?? _timeout);
        return new PublishResult(response.Status, ChannelClient.Detail(response), response.Version);
    }

    /// <summary>A new session with the agent (after it restarted), registering the same tensors.</summary>
    public void Reconnect()
    {
        ChannelClient fresh = Register(_socketPath, _weightSet, Tensors, _timeout);
        ChannelClient old = _channel;
        _channel = fresh;
        old.Dispose();
    }

    public void Dispose()
    {
        _channel.Dispose();
        Tensors.Dispose();
    }
}

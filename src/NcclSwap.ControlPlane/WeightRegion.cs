using NcclSwap.WeightSets;

namespace NcclSwap.ControlPlane;

/// <summary>
/// A client's shared memory for a weight set's tensors, placed as <see cref="Layout"/> says: an anonymous memfd,
/// sealed against shrinking and growing, whose descriptor the client passes to the agent with its hello. The
/// agent maps it, reads a publisher's and writes a consumer's. It is the client's own memory: it stays valid
/// whatever happens to the agent.
/// </summary>
public sealed unsafe class WeightRegion : IDisposable
{
    private readonly SharedRegion _region;

    private WeightRegion(string name, RegionLayout layout, SharedRegion region)
    {
        Name = name;
        Layout = layout;
        _region = region;
    }

    /// <summary>The region's name in the hello (e.g. "tensors", "slot0"), as the agent reports it.</summary>
    public string Name { get; }

    public RegionLayout Layout { get; }

    public long Length => _region.Length;

    public nint Pointer => (nint)_region.Pointer;

    internal int Descriptor => _region.Descriptor;

    /// <summary>A new region that holds <paramref name="layout"/> (at least one page), zero-filled.</summary>
    public static WeightRegion Create(string name, RegionLayout layout) =>
        new(name, layout, SharedRegion.CreateAnonymous($"nccl-swap-{name}", Math.Max(layout.Length, 4096), @sealed: true));

    /// <summary>The bytes of tensor <paramref name="name"/> (at most 2 GiB; larger tensors through <see cref="Pointer"/>).</summary>
    public Span<byte> Tensor(string name)
    {
        TensorPlacement tensor = Layout[name];
        return new Span<byte>(_region.Pointer + tensor.Offset, checked((int)tensor.Bytes));
    }

    /// <summary>The whole region.</summary>
    public Span<byte> Bytes => new(_region.Pointer, checked((int)_region.Length));

    public void Dispose() => _region.Dispose();
}

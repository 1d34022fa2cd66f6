using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace NcclSwap.Cuda.Tests;

public class HandleLayoutTests
{
    [Fact]
    public void Handles_have_the_native_sizes()
    {
        Assert.Equal(64, Unsafe.SizeOf<CuIpcMemHandle>());
        Assert.Equal(64, Unsafe.SizeOf<CuIpcEventHandle>());
        Assert.Equal(128, Unsafe.SizeOf<NcclUniqueId>());
        Assert.Equal(16, Unsafe.SizeOf<CuUuid>());
        Assert.Equal(64, Marshal.SizeOf<CuIpcMemHandle>());
        Assert.Equal(128, Marshal.SizeOf<NcclUniqueId>());
    }

    [Fact]
    public void Nccl_config_matches_the_2_17_prefix_of_ncclConfig_t()
    {
        // size_t size; unsigned magic, version; int blocking, cgaClusterSize, minCTAs, maxCTAs; const char* netName
        Assert.Equal(40, Unsafe.SizeOf<Interop.Nccl.Config>());
        Assert.Equal(0, Marshal.OffsetOf<Interop.Nccl.Config>(nameof(Interop.Nccl.Config.Size)).ToInt32());
        Assert.Equal(8, Marshal.OffsetOf<Interop.Nccl.Config>(nameof(Interop.Nccl.Config.Magic)).ToInt32());
        Assert.Equal(12, Marshal.OffsetOf<Interop.Nccl.Config>(nameof(Interop.Nccl.Config.Version)).ToInt32());
        Assert.Equal(16, Marshal.OffsetOf<Interop.Nccl.Config>(nameof(Interop.Nccl.Config.Blocking)).ToInt32());
        Assert.Equal(32, Marshal.OffsetOf<Interop.Nccl.Config>(nameof(Interop.Nccl.Config.NetName)).ToInt32());

        var config = Interop.Nccl.Config.Create(blocking: false);
        Assert.Equal(40u, (uint)config.Size);
        Assert.Equal(0xcafebeefu, config.Magic);
        Assert.Equal(21700u, config.Version);
        Assert.Equal(0, config.Blocking);
        Assert.Equal(int.MinValue, config.CgaClusterSize);
        Assert.Equal(1, Interop.Nccl.Config.Create(blocking: true).Blocking);
    }

    [Fact]
    public void Handles_round_trip_through_hex()
    {
        byte[] random = Testing.TestData.Random(128, seed: 7);
        NcclUniqueId id = default;
        random.CopyTo(MemoryMarshal.AsBytes(new Span<NcclUniqueId>(ref id)));
        string hex = id.ToHex();
        Assert.Equal(256, hex.Length);
        NcclUniqueId back = NcclUniqueId.FromHex(hex);
        Assert.Equal(random, MemoryMarshal.AsBytes(new Span<NcclUniqueId>(ref back)).ToArray());

        CuIpcMemHandle mem = default;
        random.AsSpan(0, 64).CopyTo(MemoryMarshal.AsBytes(new Span<CuIpcMemHandle>(ref mem)));
        CuIpcMemHandle memBack = CuIpcMemHandle.FromHex(mem.ToHex());
        Assert.Equal(random[..64], MemoryMarshal.AsBytes(new Span<CuIpcMemHandle>(ref memBack)).ToArray());
    }

    [Fact]
    public void Bad_hex_is_refused_with_the_handle_named()
    {
        var wrongLength = Assert.Throws<FormatException>(() => CuIpcMemHandle.FromHex("abcd"));
        Assert.Contains("CuIpcMemHandle must be 128 hex digits, got 4", wrongLength.Message);
        var notHex = Assert.Throws<FormatException>(() => CuIpcEventHandle.FromHex(new string('z', 128)));
        Assert.Contains("CuIpcEventHandle", notHex.Message);
    }

    [Fact]
    public void Uuid_formats_as_nvidia_smi_does()
    {
        CuUuid uuid = default;
        byte[] bytes = Convert.FromHexString("0123456789abcdef0011223344556677");
        bytes.CopyTo(MemoryMarshal.AsBytes(new Span<CuUuid>(ref uuid)));
        Assert.Equal("GPU-01234567-89ab-cdef-0011-223344556677", uuid.ToString());
    }
}

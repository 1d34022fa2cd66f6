using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;
using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane.Tests;

public class AbiLayoutTests
{
    [Fact]
    public void Every_csharp_struct_matches_the_c_header_byte_for_byte()
    {
        NativeLayout.RequireCompiler();
        var native = NativeLayout.Measure();
        Type[] mirrored = typeof(VersionEntry).Assembly.GetTypes().Where(t => t.GetCustomAttribute<NativeStructAttribute>() is not null).ToArray();
        Assert.Equal(native.Keys.Order(), mirrored.Select(t => t.GetCustomAttribute<NativeStructAttribute>()!.Name).Order());

        foreach (Type type in mirrored)
        {
            string name = type.GetCustomAttribute<NativeStructAttribute>()!.Name;
            (long size, List<NativeLayout.Field> fields) = native[name];
            Assert.True(size == Marshal.SizeOf(type), $"{name}: C size {size}, C# {Marshal.SizeOf(type)}");
            var declared = type.GetFields(BindingFlags.Public | BindingFlags.Instance).ToDictionary(f => SnakeCase(f.Name));
            foreach (NativeLayout.Field field in fields)
            {
                if (!declared.TryGetValue(field.Name, out FieldInfo? mine))
                {
                    Assert.True(field.Name.StartsWith("reserved", StringComparison.Ordinal) || field.Name.StartsWith("pad", StringComparison.Ordinal),
                        $"{name}.{field.Name} (offset {field.Offset}) has no C# field {type.Name}.{PascalCase(field.Name)}");
                    continue;
                }
                Assert.True(field.Offset == Marshal.OffsetOf(type, mine.Name), $"{name}.{field.Name}: C offset {field.Offset}, C# {Marshal.OffsetOf(type, mine.Name)}");
                Assert.True(field.Size == Marshal.SizeOf(mine.FieldType), $"{name}.{field.Name}: C size {field.Size}, C# {Marshal.SizeOf(mine.FieldType)}");
                declared.Remove(field.Name);
            }
            Assert.True(declared.Count == 0, $"{type.Name} declares fields the header lacks: {string.Join(", ", declared.Keys)}");
        }
    }

    [Fact]
    public void Constants_match_the_header()
    {
        string header = File.ReadAllText(NativeLayout.HeaderPath);
        Assert.Contains($"#define NCCL_SWAP_ABI_VERSION {AbiConstants.AbiVersion}u", header);
        Assert.Contains($"#define NCCL_SWAP_TABLE_MAGIC 0x{AbiConstants.TableMagic:X16}ull", header);
        Assert.Contains($"#define NCCL_SWAP_RING_MAGIC 0x{AbiConstants.RingMagic:X16}ull", header);
        Assert.Contains($"#define NCCL_SWAP_REQUEST_MAGIC 0x{AbiConstants.RequestMagic:X8}u", header);
        Assert.Contains($"#define NCCL_SWAP_RESPONSE_MAGIC 0x{AbiConstants.ResponseMagic:X8}u", header);
        Assert.Contains($"#define NCCL_SWAP_NAME_BYTES {AbiConstants.NameBytes}", header);
        Assert.Contains($"#define NCCL_SWAP_PAYLOAD_BYTES {AbiConstants.PayloadBytes}", header);
        foreach (RequestKind kind in Enum.GetValues<RequestKind>())
            Assert.Contains($"NCCL_SWAP_REQ_{SnakeCase(kind.ToString()).ToUpperInvariant()} = {(int)kind},", header);
        Assert.Contains($"#define NCCL_SWAP_PUBLISH_WAIT 0x{AbiConstants.PublishWait:x}u", header);
        foreach (FieldInfo status in typeof(Status).GetFields(BindingFlags.Public | BindingFlags.Static))
        {
            string name = status.Name == "Ok" ? "NCCL_SWAP_OK" : "NCCL_SWAP_E_" + SnakeCase(status.Name).ToUpperInvariant();
            Assert.Contains($"{name} = {status.GetValue(null)},", header);
        }
        Assert.Equal("NSRQ", Encoding.ASCII.GetString(BitConverter.GetBytes(AbiConstants.RequestMagic)));
    }

    [Theory]
    [InlineData(0UL, 0)]
    [InlineData(1UL, 1)]
    [InlineData((1UL << 56) - 1, 0)]
    public void Version_and_slot_pack_into_one_word(ulong version, int slot)
    {
        ulong state = VersionEntry.PackState(version, slot);
        Assert.Equal(1UL, state & 1);
        Assert.Equal((version, slot), VersionEntry.UnpackState(state));
        Assert.Throws<ArgumentOutOfRangeException>(() => VersionEntry.PackState(1UL << 56, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => VersionEntry.PackState(1, 2));
    }

    internal static string SnakeCase(string pascal) =>
        string.Concat(pascal.Select((c, i) => char.IsUpper(c) ? (i > 0 ? "_" : "") + char.ToLowerInvariant(c) : c.ToString()));

    private static string PascalCase(string snake) =>
        string.Concat(snake.Split('_').Select(p => p.Length == 0 ? p : char.ToUpperInvariant(p[0]) + p[1..]));
}

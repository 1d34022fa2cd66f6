namespace NcclSwap.WeightSets;

/// <summary>A safetensors dtype: its name in the header and its width in bits.</summary>
public sealed record Dtype(string Name, int Bits)
{
    /// <summary>Every dtype of the current safetensors format, sub-byte float formats included.</summary>
    public static IReadOnlyList<Dtype> All { get; } =
    [
        new("BOOL", 8),
        new("F4", 4), new("F6_E2M3", 6), new("F6_E3M2", 6),
        new("U8", 8), new("I8", 8),
        new("F8_E5M2", 8), new("F8_E4M3", 8), new("F8_E8M0", 8),
        new("I16", 16), new("U16", 16), new("F16", 16), new("BF16", 16),
        new("I32", 32), new("U32", 32), new("F32", 32),
        new("C64", 64), new("F64", 64), new("I64", 64), new("U64", 64),
    ];

    private static readonly Dictionary<string, Dtype> s_byName = All.ToDictionary(d => d.Name, StringComparer.Ordinal);

    public static bool TryParse(string name, out Dtype dtype) => s_byName.TryGetValue(name, out dtype!);

    public static Dtype Parse(string name) =>
        TryParse(name, out Dtype dtype) ? dtype : throw new ArgumentException($"unknown dtype '{name}'; known: {string.Join(", ", All.Select(d => d.Name))}");

    /// <summary>Bytes of <paramref name="elements"/> values, or null when they do not fill whole bytes or overflow.</summary>
    public long? ByteLength(long elements)
    {
        try
        {
            long bits = checked(elements * Bits);
            return bits % 8 == 0 ? bits / 8 : null;
        }
        catch (OverflowException)
        {
            return null;
        }
    }

    public override string ToString() => Name;
}

namespace NcclSwap.Testing;

/// <summary>Random test data: never zeros, reproducible from a seed that failures print.</summary>
internal static class TestData
{
    public static byte[] Random(int length, int seed)
    {
        var bytes = new byte[length];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }

    /// <summary>Sizes that are not multiples of anything convenient, plus the edges.</summary>
    public static readonly int[] OddSizes = [1, 3, 4097, 65_537, 1_048_573, 4 * 1_048_576 + 13];

    /// <summary>A seed for this run, printed by tests that use it.</summary>
    public static int NewSeed() => System.Random.Shared.Next();
}

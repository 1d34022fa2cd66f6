namespace NcclSwap.ControlPlane.Versions;

internal static class Units
{
    /// <summary>Decimal units, as the GPU's and the link's figures are quoted: "16.1 GB", "38.9 MB".</summary>
    public static string Bytes(long bytes) => bytes >= 1_000_000_000 ? $"{bytes / 1e9:0.0} GB" : $"{bytes / 1e6:0.0} MB";
}

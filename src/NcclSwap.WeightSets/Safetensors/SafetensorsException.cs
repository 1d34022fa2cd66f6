namespace NcclSwap.WeightSets;

/// <summary>A checkpoint breaks a rule of the safetensors format; names the file, the tensor (if any) and the rule.</summary>
public sealed class SafetensorsException : Exception
{
    public SafetensorsException(string file, string? tensor, string rule, string detail)
        : base($"{file}: {(tensor is null ? "" : $"tensor '{tensor}': ")}{rule}: {detail}")
    {
        File = file;
        Tensor = tensor;
        Rule = rule;
    }

    public string File { get; }

    public string? Tensor { get; }

    /// <summary>A short, stable name of the broken rule, e.g. "offsets overlap".</summary>
    public string Rule { get; }
}

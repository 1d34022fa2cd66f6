using NcclSwap.Cuda;

namespace NcclSwap.DataPlane;

/// <summary>Chooses and creates backends.</summary>
public static class Backend
{
    /// <summary>
    /// <paramref name="kind"/> "cuda" (fails with the reason when no GPU is usable), "host", or "auto":
    /// CUDA on <paramref name="device"/> when a GPU is usable, the host backend otherwise.
    /// </summary>
    public static IBackend Create(string kind = "auto", int device = 0) => kind switch
    {
        "auto" => CudaDriver.IsSupported ? new CudaBackend(device) : new HostBackend(),
        "cuda" => new CudaBackend(device),
        "host" => new HostBackend(),
        _ => throw new ArgumentException($"unknown backend '{kind}': use auto, cuda or host.", nameof(kind)),
    };

    /// <summary>The backend-specific object behind an interface, or a clear error when it belongs to another backend.</summary>
    internal static T As<T>(object value, string backend) where T : class =>
        value as T ?? throw new ArgumentException($"{value} does not belong to the {backend} backend.");
}

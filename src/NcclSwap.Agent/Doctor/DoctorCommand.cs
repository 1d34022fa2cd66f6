using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using NcclSwap.Cuda;
using NcclSwap.DataPlane;

namespace NcclSwap.Agent.Doctor;

/// <summary><c>nccl-swap doctor</c>: what this machine offers the agent, and with --bench how fast it copies.</summary>
internal static class DoctorCommand
{
    internal const string IpcPeerVerb = "doctor-ipc-peer";
    private const string RateTag = "ipc-d2d-bytes-per-second=";

    public static Command Create(TextWriter output)
    {
        var bench = new Option<bool>("--bench") { Description = "Measure pinned H2D, D2H, D2D and cross-process CUDA IPC copy rates." };
        var bytes = new Option<long>("--bench-bytes") { Description = "Bytes per benchmark copy.", DefaultValueFactory = _ => 1L << 30 };
        var command = new Command("doctor", "Print driver, CUDA and NCCL versions, library paths, GPUs and the pinned-memory limit.") { bench, bytes };
        command.SetAction(result => Run(output, result.GetValue(bench), result.GetValue(bytes)));
        return command;
    }

    /// <summary>The second process of the IPC benchmark: maps the parent's buffer and times copies out of it.</summary>
    public static Command CreateIpcPeer(TextWriter output)
    {
        var device = new Option<int>("--device");
        var handle = new Option<string>("--handle") { Required = true };
        var bytes = new Option<long>("--bytes") { Required = true };
        var command = new Command(IpcPeerVerb, "Internal: the second process of doctor --bench.") { device, handle, bytes };
        command.Hidden = true;
        command.SetAction(result =>
        {
            long length = result.GetValue(bytes);
            using var context = CudaContext.Retain(result.GetValue(device));
            using var mapping = IpcMemoryMapping.Open(context, CuIpcMemHandle.FromHex(result.GetValue(handle)!));
            using var source = mapping.View(0, length);
            using var destination = DeviceBuffer.Allocate(context, length);
            using var stream = CudaStream.Create(context);
            var rate = CopyBenchmark.Time(context, stream, "IPC D2D", length, 10, () => stream.CopyAsync(destination, 0, source, 0, length));
            output.WriteLine(RateTag + rate.BytesPerSecond.ToString("R", CultureInfo.InvariantCulture));
            return 0;
        });
        return command;
    }

    internal static int Run(TextWriter output, bool bench, long benchBytes)
    {
        output.WriteLine("nccl-swap doctor");
        bool gpu = CudaDriver.IsSupported;
        output.WriteLine(gpu
            ? "  backend:   cuda (the GPU data path is available)"
            : $"  backend:   host (no usable GPU: {FirstLine(CudaDriver.UnsupportedReason)})");

        if (NativeLibraries.Cuda.IsLoaded)
        {
            string kernel = CudaDriver.KernelModuleVersion ?? "unknown";
            string cuda = gpu ? $"CUDA {CudaDriver.Version.Major}.{CudaDriver.Version.Minor}" : "CUDA unavailable";
            output.WriteLine($"  driver:    {kernel}, {cuda}");
            output.WriteLine($"  libcuda:   {NativeLibraries.Cuda.Path}");
        }
        else
        {
            output.WriteLine("  driver:    none (libcuda.so.1 not found)");
        }

        if (NcclLibrary.IsSupported)
        {
            output.WriteLine($"  NCCL:      {NcclLibrary.Version}");
            output.WriteLine($"  libnccl:   {NativeLibraries.Nccl.Path}");
        }
        else
        {
            output.WriteLine("  NCCL:      not found; " + NcclLibrary.UnsupportedReason!.Replace(Environment.NewLine, Environment.NewLine + "             "));
        }

        ulong? memlock = HostLimits.LockedMemoryLimit;
        output.WriteLine(memlock is null
            ? "  pinned:    ulimit -l unlimited"
            : $"  pinned:    ulimit -l {memlock / 1024} KiB (the agent pins staging buffers: set LimitMEMLOCK=infinity in its unit)");

        if (!gpu)
        {
            output.WriteLine("  GPUs:      none");
            if (bench)
                output.WriteLine("  bench:     skipped, no GPU");
            return 0;
        }

        IReadOnlyList<CudaDevice> devices = CudaDevice.All;
        output.WriteLine($"  GPUs:      {devices.Count}");
        foreach (CudaDevice device in devices)
        {
            (int major, int minor) = device.ComputeCapability;
            output.WriteLine($"    {device}: {device.Name}, {device.TotalMemory / (double)(1L << 30):0.0} GiB, bus {device.PciBusId}, {device.Uuid}, sm_{major}{minor}, {device.MultiprocessorCount} SMs");
            var peers = devices.Where(p => p.Ordinal != device.Ordinal && device.CanAccessPeer(p))
                .Select(p => $"{p} ({(device.HasNativeAtomicsWith(p) ? "NVLink" : "PCIe")})")
                .ToArray();
            output.WriteLine($"      peers: {(peers.Length == 0 ? "none" : string.Join(", ", peers))}");
        }

        if (bench)
            Bench(output, benchBytes);
        return 0;
    }

    private static void Bench(TextWriter output, long bytes)
    {
        using var context = CudaContext.Retain(0);
        output.WriteLine($"  bench on {context.Device} ({context.Device.Name}), {bytes / (double)(1 << 20):0} MiB per copy, median of 10:");
        IReadOnlyList<CopyBenchmark.Rate> rates = CopyBenchmark.Measure(context, bytes);
        foreach (var rate in rates)
            output.WriteLine($"    {rate}");
        double d2d = rates.Single(r => r.Name == "D2D").BytesPerSecond;

        using var shared = DeviceBuffer.Allocate(context, bytes);
        shared.Fill(0x5A);
        (CuIpcMemHandle handle, _) = shared.ExportIpcHandle();
        ProcessStartInfo start = SelfProcess.StartInfo(IpcPeerVerb, "--device", "0", "--handle", handle.ToHex(), "--bytes", bytes.ToString(CultureInfo.InvariantCulture));
        using Process peer = Process.Start(start)!;
        string stdout = peer.StandardOutput.ReadToEnd();
        string stderr = peer.StandardError.ReadToEnd();
        peer.WaitForExit();
        string? line = stdout.Split('\n').FirstOrDefault(l => l.StartsWith(RateTag, StringComparison.Ordinal));
        if (peer.ExitCode != 0 || line is null)
        {
            output.WriteLine($"    IPC D2D: failed (second process exited {peer.ExitCode}): {FirstLine(stderr + stdout)}");
            return;
        }
        double ipc = double.Parse(line[RateTag.Length..], CultureInfo.InvariantCulture);
        output.WriteLine($"    IPC D2D: {ipc / 1e9:0.0} GB/s from a second process's mapping = {ipc / d2d:0.00} of D2D");
    }

    private static string FirstLine(string? text) => (text ?? "").Split('\n', 2)[0].Trim();
}

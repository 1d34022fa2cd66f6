using System.Globalization;
using NcclSwap.Cuda;

namespace NcclSwap.Gpu.Tests;

/// <summary>
/// The second process of the IPC test: opens the exporter's memory twice and its interprocess event,
/// says "ready", waits for "go" on stdin, makes its stream wait on the event, reads the bytes through
/// the first mapping, closes it, reads again through the second, closes that, and writes both reads to files.
/// </summary>
internal static class IpcReader
{
    public const string Role = "ipc-reader";

    public static int Run(string[] args)
    {
        CuIpcMemHandle memory = CuIpcMemHandle.FromHex(args[0]);
        long offset = long.Parse(args[1], CultureInfo.InvariantCulture);
        int length = int.Parse(args[2], CultureInfo.InvariantCulture);
        CuIpcEventHandle ready = CuIpcEventHandle.FromHex(args[3]);
        string output = args[4];

        using var context = CudaContext.Retain(0);
        var first = IpcMemoryMapping.Open(context, memory);
        var second = IpcMemoryMapping.Open(context, memory);
        Console.WriteLine($"mappings {IpcMemoryMapping.OpenNativeMappings} references {first.References} same-address {first.Address == second.Address}");
        using var @event = CudaEvent.OpenIpc(context, ready);
        using var stream = CudaStream.Create(context);
        using var host = PinnedBuffer.Allocate(context, length);
        Console.WriteLine("ready");

        if (Console.ReadLine() != "go")
            return 3;
        stream.Wait(@event);
        using (DeviceBuffer view = first.View(offset, length))
            stream.CopyAsync(host, 0, view, 0, length);
        stream.Synchronize();
        File.WriteAllBytes(output + ".first", host.Span.ToArray());

        first.Dispose();
        first.Dispose(); // idempotent: the second mapping must survive both calls
        Console.WriteLine($"after-first-close mappings {IpcMemoryMapping.OpenNativeMappings} references {second.References}");
        host.Span.Fill(0);
        using (DeviceBuffer view = second.View(offset, length))
            stream.CopyAsync(host, 0, view, 0, length);
        stream.Synchronize();
        File.WriteAllBytes(output + ".second", host.Span.ToArray());
        second.Dispose();
        Console.WriteLine($"after-second-close mappings {IpcMemoryMapping.OpenNativeMappings}");
        Console.WriteLine("done");
        return 0;
    }
}

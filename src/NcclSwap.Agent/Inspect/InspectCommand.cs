using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using NcclSwap.Cuda;
using NcclSwap.WeightSets;

namespace NcclSwap.Agent.Inspect;

/// <summary><c>nccl-swap inspect PATH</c>: the tensors of a safetensors file or checkpoint folder, and its manifest digest.</summary>
internal static class InspectCommand
{
    public static Command Create(TextWriter output, TextWriter error)
    {
        var path = new Argument<string>("path") { Description = "A .safetensors file, or a checkpoint folder (with model.safetensors.index.json, or one .safetensors file)." };
        var json = new Option<bool>("--json") { Description = "Print one JSON document: tensors (name, dtype, shape, bytes, file), total_bytes, digest, sha256." };
        var command = new Command("inspect", "List a checkpoint's tensors and compute its manifest digest.") { path, json };
        command.SetAction(result => Run(result.GetValue(path)!, result.GetValue(json), output, error));
        return command;
    }

    internal static int Run(string path, bool json, TextWriter output, TextWriter error)
    {
        Checkpoint checkpoint;
        Manifest manifest;
        try
        {
            checkpoint = Checkpoint.Open(path);
            var reporter = new ProgressLine(error, checkpoint.TotalBytes);
            using LoadedCheckpoint loaded = CheckpointLoader.Load(checkpoint, PinnedBuffer.AllocatePageable, reporter);
            reporter.Finish(loaded.BytesPerSecond);
            manifest = loaded.CreateManifest();
        }
        catch (Exception e) when (e is SafetensorsException or IOException or UnauthorizedAccessException)
        {
            error.WriteLine($"nccl-swap inspect: {e.Message}");
            return 1;
        }

        string folder = File.Exists(path) ? Path.GetDirectoryName(Path.GetFullPath(path))! : Path.GetFullPath(path);
        string FileOf(TensorInfo t) => Path.GetRelativePath(folder, t.File);
        if (json)
        {
            var buffer = new MemoryStream();
            using var writer = new Utf8JsonWriter(buffer, new JsonWriterOptions { Indented = true });
            writer.WriteStartObject();
            writer.WriteStartArray("tensors");
            foreach (TensorInfo t in checkpoint.Tensors)
            {
                writer.WriteStartObject();
                writer.WriteString("name", t.Name);
                TensorJson.WriteDtypeAndShape(writer, t.Dtype.Name, t.Shape);
                writer.WriteNumber("bytes", t.Bytes);
                writer.WriteString("file", FileOf(t));
                writer.WriteString("digest", manifest.Tensors.Single(e => e.Name == t.Name).Digest.ToString());
                writer.WriteEndObject();
            }
            writer.WriteEndArray();
            writer.WriteNumber("total_bytes", checkpoint.TotalBytes);
            writer.WriteString("digest", manifest.Digest.ToString());
            writer.WriteString("sha256", manifest.Sha256);
            writer.WriteEndObject();
            writer.Flush();
            output.WriteLine(System.Text.Encoding.UTF8.GetString(buffer.ToArray()));
            return 0;
        }

        int nameWidth = Math.Clamp(checkpoint.Tensors.Select(t => t.Name.Length).DefaultIfEmpty(0).Max(), 4, 60);
        output.WriteLine($"{"name".PadRight(nameWidth)}  {"dtype",-8} {"shape",-20} {"bytes",14}  file");
        foreach (TensorInfo t in checkpoint.Tensors)
            output.WriteLine($"{t.Name.PadRight(nameWidth)}  {t.Dtype.Name,-8} {t.ShapeText,-20} {t.Bytes.ToString("N0", CultureInfo.InvariantCulture),14}  {FileOf(t)}");
        output.WriteLine($"{checkpoint.Tensors.Count} tensors in {checkpoint.Files.Count} file(s), {checkpoint.TotalBytes.ToString("N0", CultureInfo.InvariantCulture)} bytes");
        output.WriteLine($"manifest digest {manifest.Digest}, sha256 {manifest.Sha256}");
        return 0;
    }

    /// <summary>Progress on stderr for loads that take a while: at most one line a second.</summary>
    private sealed class ProgressLine(TextWriter error, long total) : IProgress<LoadProgress>
    {
        private long _lastTicks = Environment.TickCount64;
        private bool _printed;

        public void Report(LoadProgress value)
        {
            long now = Environment.TickCount64;
            long last = Interlocked.Read(ref _lastTicks);
            if (now - last < 1000 || Interlocked.CompareExchange(ref _lastTicks, now, last) != last)
                return;
            lock (error)
            {
                error.WriteLine($"loading: {value}");
                _printed = true;
            }
        }

        public void Finish(double bytesPerSecond)
        {
            if (_printed)
                error.WriteLine($"loaded {total / 1e9:0.00} GB at {bytesPerSecond / 1e9:0.00} GB/s");
        }
    }
}

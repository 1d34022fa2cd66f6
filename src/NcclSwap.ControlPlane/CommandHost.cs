using System.Text;
using System.Text.Json;

namespace NcclSwap.ControlPlane;

/// <summary>An operator verb's answer: done (with a message, or fields written by <see cref="Write"/>), or refused with a code and why.</summary>
public sealed record CommandReply(bool Ok, string? Code, string? Message, Action<Utf8JsonWriter>? Write = null)
{
    public static CommandReply Done(string message) => new(true, null, message);

    public static CommandReply Fail(string code, string message) => new(false, code, message);

    public string ToJsonLine()
    {
        var stream = new MemoryStream();
        using (var writer = new Utf8JsonWriter(stream))
        {
            writer.WriteStartObject();
            writer.WriteBoolean("ok", Ok);
            if (Code is not null)
                writer.WriteString("code", Code);
            if (Message is not null)
                writer.WriteString(Ok ? "message" : "error", Message);
            Write?.Invoke(writer);
            writer.WriteEndObject();
        }
        return Encoding.UTF8.GetString(stream.ToArray()) + "\n";
    }
}

/// <summary>What runs the operator's verbs that come to the front door (a hello with <c>"command"</c>), after the role check.</summary>
public interface ICommandHost
{
    /// <summary>Runs the verb in <paramref name="hello"/> for <paramref name="peer"/>; may block (it waits for outcomes).</summary>
    CommandReply Run(PeerIdentity peer, string weightSet, JsonElement hello);
}

/// <summary>An operator's verb and how it ended, for the audit log.</summary>
public readonly record struct CommandRecord(PeerIdentity Peer, string Command, string WeightSet, ulong? Version, bool Ok, string Detail);

using System.Globalization;
using System.IO.Hashing;
using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane.Tests;

/// <summary>The other process of the channel tests.</summary>
internal static class ChannelPeers
{
    public const string TableReader = "table-reader";
    public const string RingConsumer = "ring-consumer";

    /// <summary>
    /// Polls a version table row until it sees <c>last</c>, checking every state it observes: versions only grow,
    /// and the slot is the one the writer pairs with that version (version % 2). Prints how many states it saw.
    /// </summary>
    public static int ReadTable(string[] args)
    {
        using VersionTable table = VersionTable.Open(args[0]);
        int row = table.Find(args[1]);
        ulong last = ulong.Parse(args[2], CultureInfo.InvariantCulture);
        Console.WriteLine("ready");
        ulong previous = 0, seen = 0, loads = 0;
        while (true)
        {
            ulong state = table.ReadState(row);
            loads++;
            if (state == previous)
                continue;
            (ulong version, int slot) = VersionEntry.UnpackState(state);
            if (version <= VersionEntry.UnpackState(previous).Version || slot != (int)(version % 2))
            {
                Console.WriteLine($"bad state: version {version} slot {slot} after {VersionEntry.UnpackState(previous).Version}");
                return 3;
            }
            previous = state;
            seen++;
            if (version == last)
                break;
        }
        Console.WriteLine($"seen {seen} loads {loads}");
        return 0;
    }

    /// <summary>Reads <c>count</c> requests from a ring: ids 0, 1, 2… in order, each payload matching its checksum.</summary>
    public static int ConsumeRing(string[] args)
    {
        using SharedRing ring = SharedRing.Open(args[0]);
        long count = long.Parse(args[1], CultureInfo.InvariantCulture);
        Console.WriteLine("ready");
        for (long i = 0; i < count; i++)
        {
            if (!ring.Read(out Request request, TimeSpan.FromSeconds(30)))
            {
                Console.WriteLine($"timed out waiting for request {i}");
                return 3;
            }
            string? problem = Messages.Validate(request)
                ?? (request.Id != (ulong)i ? $"id {request.Id} out of order" : request.Version != Checksum(request) ? "checksum mismatch" : null);
            if (problem is not null)
            {
                Console.WriteLine($"bad request {i}: {problem}");
                return 4;
            }
        }
        Console.WriteLine($"received {count}");
        return 0;
    }

    public static unsafe ulong Checksum(in Request request)
    {
        fixed (PayloadBytes* payload = &request.Payload)
            return XxHash64.HashToUInt64(new ReadOnlySpan<byte>(payload, (int)request.PayloadBytes));
    }
}

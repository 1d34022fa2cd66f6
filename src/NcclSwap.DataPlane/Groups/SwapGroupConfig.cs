using System.Net;
using System.Text.Json;

namespace NcclSwap.DataPlane;

/// <summary>One agent of a swap group: the host it runs on and the GPUs (device ordinals) it drives, one rank each.</summary>
public sealed record SwapGroupMember(string Host, IReadOnlyList<int> Devices);

/// <summary>
/// Who takes part in a swap group, read from a file:
/// <c>{"format": "nccl-swap-group/1", "name": NAME, "root": "ADDRESS:PORT", "timeout_seconds": 60,
/// "members": [{"host": "node-a", "devices": [0, 1]}, ...]}</c>. Ranks follow the members in order and, within a
/// member, its devices in order. Member 0 is the root: it listens at <c>root</c>, where every member reports, and
/// hands out the collective's id once all have. Errors name the file, the member and the field.
/// </summary>
public sealed class SwapGroupConfig
{
    public const string Format = "nccl-swap-group/1";

    public SwapGroupConfig(string name, IPEndPoint root, IReadOnlyList<SwapGroupMember> members, TimeSpan timeout)
    {
        if (members.Count == 0)
            throw new FormatException($"swap group '{name}' has no members");
        for (int m = 0; m < members.Count; m++)
        {
            if (members[m].Devices.Count == 0)
                throw new FormatException($"swap group '{name}': member {m} ({members[m].Host}) drives no device");
            if (members[m].Devices.Distinct().Count() != members[m].Devices.Count || members[m].Devices.Any(d => d < 0))
                throw new FormatException($"swap group '{name}': member {m} ({members[m].Host}) lists devices [{string.Join(", ", members[m].Devices)}]: each once, none negative");
        }
        Name = name;
        Root = root;
        Members = members;
        Timeout = timeout;
        var first = new int[members.Count];
        for (int m = 1; m < members.Count; m++)
            first[m] = first[m - 1] + members[m - 1].Devices.Count;
        FirstRank = first;
        Size = first[^1] + members[^1].Devices.Count;
    }

    public string Name { get; }

    public IPEndPoint Root { get; }

    public IReadOnlyList<SwapGroupMember> Members { get; }

    /// <summary>The deadline of every wait: joining, and each operation once joined.</summary>
    public TimeSpan Timeout { get; }

    /// <summary>Ranks in the group: one per device of every member.</summary>
    public int Size { get; }

    /// <summary>The rank of member m's first device.</summary>
    public IReadOnlyList<int> FirstRank { get; }

    /// <summary>The member that holds <paramref name="rank"/>, and the device.</summary>
    public (int Member, int Device) Locate(int rank)
    {
        for (int m = Members.Count - 1; m >= 0; m--)
            if (rank >= FirstRank[m])
                return (m, Members[m].Devices[rank - FirstRank[m]]);
        throw new ArgumentOutOfRangeException(nameof(rank), $"rank {rank} is not in swap group '{Name}' of {Size}");
    }

    public static SwapGroupConfig Load(string path)
    {
        try
        {
            using JsonDocument document = JsonDocument.Parse(File.ReadAllBytes(path));
            return Parse(document.RootElement, path);
        }
        catch (Exception e) when (e is JsonException or FormatException or InvalidOperationException or KeyNotFoundException)
        {
            throw new FormatException($"{path}: {e.Message}", e);
        }
    }

    public static SwapGroupConfig Parse(JsonElement root, string where)
    {
        string format = root.GetProperty("format").GetString() ?? "";
        if (format != Format)
            throw new FormatException($"format is '{format}', not '{Format}'");
        string name = root.GetProperty("name").GetString() ?? throw new FormatException("name is null");
        string rootText = root.GetProperty("root").GetString() ?? "";
        if (!IPEndPoint.TryParse(rootText, out IPEndPoint? endPoint) || endPoint.Port == 0)
            throw new FormatException($"root '{rootText}' is not ADDRESS:PORT");
        double seconds = root.TryGetProperty("timeout_seconds", out JsonElement t) ? t.GetDouble() : 60;
        if (seconds <= 0)
            throw new FormatException($"timeout_seconds must be positive, not {seconds}");
        var members = new List<SwapGroupMember>();
        int index = 0;
        foreach (JsonElement m in root.GetProperty("members").EnumerateArray())
        {
            string host = m.TryGetProperty("host", out JsonElement h) ? h.GetString() ?? "" : throw new FormatException($"member {index}: no 'host'");
            if (!m.TryGetProperty("devices", out JsonElement devices) || devices.ValueKind != JsonValueKind.Array)
                throw new FormatException($"member {index} ({host}): 'devices' must be a list of device ordinals");
            members.Add(new SwapGroupMember(host, devices.EnumerateArray().Select(d => d.GetInt32()).ToArray()));
            index++;
        }
        return new SwapGroupConfig(name, endPoint, members, TimeSpan.FromSeconds(seconds));
    }
}

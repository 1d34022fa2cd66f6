using Microsoft.Extensions.Configuration;
using NcclSwap.ControlPlane;
using NcclSwap.ControlPlane.Signing;
using NcclSwap.ControlPlane.Versions;

namespace NcclSwap.Agent.Serve;

/// <summary>Settings that name every one that is wrong.</summary>
public sealed class AgentSettingsException(IReadOnlyList<string> problems)
    : Exception("invalid agent settings:" + Environment.NewLine + "  " + string.Join(Environment.NewLine + "  ", problems))
{
    public IReadOnlyList<string> Problems { get; } = problems;
}

/// <summary>
/// The agent's settings, from the <c>Agent</c> section of the JSON configuration file and from environment
/// variables (<c>NCCL_SWAP_Agent__SocketPath</c>, …), checked as a whole at start.
/// </summary>
public sealed record AgentSettings(string SocketPath, string StateDirectory, int TableCapacity, RolePolicy Roles,
    string StagingDirectory = "/run/nccl-swap/staging", UpdatePolicy Policy = UpdatePolicy.Supersede, double AckTimeoutSeconds = 30, string Backend = "auto",
    StagingPlacement Placement = StagingPlacement.Auto)
{
    /// <summary>Per weight set: signatures, publishers, canary rollout.</summary>
    public IReadOnlyDictionary<string, WeightSetPolicy> WeightSets { get; init; } = new Dictionary<string, WeightSetPolicy>();

    /// <summary>The group that owns the socket (mode 0660), so that clients of other users in it can connect; null: the agent's own.</summary>
    public uint? SocketGroup { get; init; }

    /// <summary>The localhost port of the Prometheus endpoint (<c>/metrics</c>); 0: none.</summary>
    public int MetricsPort { get; init; }

    public const string Section = "Agent";

    public string TablePath => Options.TablePath;

    public string StatePath => Options.StatePath;

    public AgentOptions Options => new(SocketPath, StateDirectory, StagingDirectory, TableCapacity, Roles, Policy, TimeSpan.FromSeconds(AckTimeoutSeconds))
    {
        Placement = Placement,
        WeightSets = WeightSets,
        SocketGroup = SocketGroup,
    };

    public static AgentSettings Load(IConfiguration configuration)
    {
        IConfigurationSection agent = configuration.GetSection(Section);
        var problems = new List<string>();

        string socket = agent["SocketPath"] ?? "/run/nccl-swap/agent.sock";
        if (!Path.IsPathFullyQualified(socket))
            problems.Add($"{Section}:SocketPath: '{socket}' must be an absolute path");
        else if (socket.Length > 107)
            problems.Add($"{Section}:SocketPath: '{socket}' is longer than a Unix socket path may be (107 bytes)");

        string state = agent["StateDirectory"] ?? "/var/lib/nccl-swap";
        if (!Path.IsPathFullyQualified(state))
            problems.Add($"{Section}:StateDirectory: '{state}' must be an absolute path");

        int capacity = 64;
        if (agent["TableCapacity"] is { } text && (!int.TryParse(text, out capacity) || capacity is < 1 or > 65536))
            problems.Add($"{Section}:TableCapacity: '{text}' must be a whole number from 1 to 65536");

        string staging = agent["StagingDirectory"] ?? "/run/nccl-swap/staging";
        if (!Path.IsPathFullyQualified(staging))
            problems.Add($"{Section}:StagingDirectory: '{staging}' must be an absolute path (a tmpfs such as /run or /dev/shm)");

        UpdatePolicy policy = UpdatePolicy.Supersede;
        if (agent["UpdatePolicy"] is { } policyText && !TryPolicy(policyText, out policy))
            problems.Add($"{Section}:UpdatePolicy: '{policyText}' must be supersede or queue");

        double ackTimeout = 30;
        if (agent["AckTimeoutSeconds"] is { } ackText
            && (!double.TryParse(ackText, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out ackTimeout) || ackTimeout is <= 0 or > 3600))
            problems.Add($"{Section}:AckTimeoutSeconds: '{ackText}' must be a number of seconds above 0 and at most 3600");

        string backend = agent["Backend"] ?? "auto";
        if (backend is not ("auto" or "cuda" or "host"))
            problems.Add($"{Section}:Backend: '{backend}' must be auto, cuda or host");

        StagingPlacement placement = StagingPlacement.Auto;
        if (agent["StagingPlacement"] is { } placementText)
        {
            placement = placementText switch
            {
                "auto" => StagingPlacement.Auto,
                "gpu" => StagingPlacement.Gpu,
                "gpu+shadow" => StagingPlacement.GpuWithHostShadow,
                "host" => StagingPlacement.Host,
                _ => (StagingPlacement)(-1),
            };
            if (placement < 0)
                problems.Add($"{Section}:StagingPlacement: '{placementText}' must be auto, gpu, gpu+shadow or host");
        }

        var roles = new RolePolicy();
        ReadRoles(agent.GetSection("Roles:Users"), roles.Users, "Roles:Users", problems);
        ReadRoles(agent.GetSection("Roles:Groups"), roles.Groups, "Roles:Groups", problems);
        if (roles.Users.Count == 0 && roles.Groups.Count == 0)
            problems.Add($"{Section}:Roles: no uid or gid has a role, so every client would be refused");

        uint? socketGroup = null;
        if (agent["SocketGroup"] is { } groupText)
        {
            if (uint.TryParse(groupText, out uint gid))
                socketGroup = gid;
            else
                problems.Add($"{Section}:SocketGroup: '{groupText}' must be a numeric gid");
        }

        int metricsPort = 0;
        if (agent["MetricsPort"] is { } portText && (!int.TryParse(portText, out metricsPort) || metricsPort is < 0 or > 65535))
            problems.Add($"{Section}:MetricsPort: '{portText}' must be a port from 1 to 65535 (0: no metrics endpoint)");

        var weightSets = new Dictionary<string, WeightSetPolicy>(StringComparer.Ordinal);
        foreach (IConfigurationSection set in agent.GetSection("WeightSets").GetChildren())
            if (ReadWeightSet(set, problems) is { } read)
                weightSets[set.Key] = read;

        if (problems.Count > 0)
            throw new AgentSettingsException(problems);
        return new AgentSettings(socket, state, capacity, roles, staging, policy, ackTimeout, backend, placement)
        {
            WeightSets = weightSets,
            SocketGroup = socketGroup,
            MetricsPort = metricsPort,
        };
    }

    /// <summary>
    /// <c>Agent:WeightSets:NAME</c>: <c>RequireSignature</c>, <c>TrustedKeys</c> (public key files), <c>Publishers</c>
    /// (<c>Users</c>, <c>Groups</c>: numeric ids) and <c>Canary</c> (<c>Fraction</c>, <c>MinSeconds</c>, <c>MinSamples</c>,
    /// <c>MaxErrorRate</c>, <c>MaxP99Ratio</c>, <c>MinQuality</c>, <c>MaxSeconds</c>).
    /// </summary>
    private static WeightSetPolicy? ReadWeightSet(IConfigurationSection set, List<string> problems)
    {
        string at = $"{Section}:WeightSets:{set.Key}";
        int before = problems.Count;
        bool require = false;
        if (set["RequireSignature"] is { } requireText && !bool.TryParse(requireText, out require))
            problems.Add($"{at}:RequireSignature: '{requireText}' must be true or false");
        var keys = new List<TrustedKey>();
        foreach (IConfigurationSection entry in set.GetSection("TrustedKeys").GetChildren())
        {
            string path = entry.Value ?? "";
            try
            {
                TrustedKey key = TrustedKey.Load(path);
                if (keys.Any(k => k.Id == key.Id))
                    problems.Add($"{at}:TrustedKeys:{entry.Key}: key {VersionSignature.IdText(key.Id)} ({path}) is listed twice");
                keys.Add(key);
            }
            catch (KeyFileException e)
            {
                problems.Add($"{at}:TrustedKeys:{entry.Key}: {e.Message}");
            }
        }
        if (require && keys.Count == 0 && problems.Count == before)
            problems.Add($"{at}:RequireSignature: true, but no TrustedKeys: no version could ever be activated");
        var users = ReadIds(set.GetSection("Publishers:Users"), $"{at}:Publishers:Users", "uid", problems);
        var groups = ReadIds(set.GetSection("Publishers:Groups"), $"{at}:Publishers:Groups", "gid", problems);
        CanaryPolicy? canary = null;
        IConfigurationSection c = set.GetSection("Canary");
        if (c.Exists())
        {
            CanaryPolicy d = CanaryPolicy.Default;
            double Number(string name, double fallback, double min, double max)
            {
                if (c[name] is not { } text)
                    return fallback;
                if (double.TryParse(text, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out double value) && value >= min && value <= max)
                    return value;
                problems.Add($"{at}:Canary:{name}: '{text}' must be a number from {min.ToString(System.Globalization.CultureInfo.InvariantCulture)} to {max.ToString(System.Globalization.CultureInfo.InvariantCulture)}");
                return fallback;
            }
            double fraction = Number("Fraction", d.Fraction, 0.001, 0.999);
            double minSeconds = Number("MinSeconds", d.MinDuration.TotalSeconds, 0, 86400);
            double minSamples = Number("MinSamples", d.MinSamples, 1, 1e12);
            double maxErrorRate = Number("MaxErrorRate", d.MaxErrorRate, 0, 1);
            double maxP99Ratio = Number("MaxP99Ratio", d.MaxP99Ratio, 1, 1000);
            double? minQuality = c["MinQuality"] is null ? null : Number("MinQuality", 0, double.MinValue, double.MaxValue);
            double maxSeconds = Number("MaxSeconds", d.MaxDuration.TotalSeconds, 1, 7 * 86400);
            if (maxSeconds < minSeconds)
                problems.Add($"{at}:Canary:MaxSeconds: {maxSeconds} is less than MinSeconds {minSeconds}");
            canary = new CanaryPolicy(fraction, TimeSpan.FromSeconds(minSeconds), (long)minSamples, maxErrorRate, maxP99Ratio, minQuality, TimeSpan.FromSeconds(maxSeconds));
        }
        if (problems.Count > before)
            return null;
        return new WeightSetPolicy { RequireSignature = require, TrustedKeys = keys, PublisherUsers = users, PublisherGroups = groups, Canary = canary };
    }

    private static HashSet<uint> ReadIds(IConfigurationSection section, string at, string what, List<string> problems)
    {
        var ids = new HashSet<uint>();
        foreach (IConfigurationSection entry in section.GetChildren())
            if (uint.TryParse(entry.Value, out uint id))
                ids.Add(id);
            else
                problems.Add($"{at}:{entry.Key}: '{entry.Value}' is not a numeric {what}");
        return ids;
    }

    private static bool TryPolicy(string text, out UpdatePolicy policy)
    {
        policy = text switch { "supersede" => UpdatePolicy.Supersede, "queue" => UpdatePolicy.Queue, _ => (UpdatePolicy)(-1) };
        return policy >= 0;
    }

    private static void ReadRoles(IConfigurationSection section, Dictionary<uint, Role> into, string name, List<string> problems)
    {
        foreach (IConfigurationSection entry in section.GetChildren())
        {
            string key = $"{Section}:{name}:{entry.Key}";
            if (!uint.TryParse(entry.Key, out uint id))
            {
                problems.Add($"{key}: '{entry.Key}' is not a numeric {(name.EndsWith("Users", StringComparison.Ordinal) ? "uid" : "gid")}");
                continue;
            }
            Role role = Role.None;
            foreach (string word in (entry.Value ?? "").Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
            {
                switch (word)
                {
                    case "publisher": role |= Role.Publisher; break;
                    case "consumer": role |= Role.Consumer; break;
                    case "operator": role |= Role.Operator; break;
                    default: problems.Add($"{key}: unknown role '{word}' (publisher, consumer, operator)"); break;
                }
            }
            if (role == Role.None && !problems.Any(p => p.StartsWith(key, StringComparison.Ordinal)))
                problems.Add($"{key}: no role given");
            into[id] = role;
        }
    }
}

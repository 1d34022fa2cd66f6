using Microsoft.Extensions.Configuration;
using NcclSwap.ControlPlane;
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
    public const string Section = "Agent";

    public string TablePath => Options.TablePath;

    public string StatePath => Options.StatePath;

    public AgentOptions Options => new(SocketPath, StateDirectory, StagingDirectory, TableCapacity, Roles, Policy, TimeSpan.FromSeconds(AckTimeoutSeconds))
    {
        Placement = Placement,
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

        if (problems.Count > 0)
            throw new AgentSettingsException(problems);
        return new AgentSettings(socket, state, capacity, roles, staging, policy, ackTimeout, backend, placement);
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

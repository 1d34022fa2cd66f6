using Microsoft.Extensions.Configuration;
using NcclSwap.ControlPlane;

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
public sealed record AgentSettings(string SocketPath, string StateDirectory, int TableCapacity, RolePolicy Roles)
{
    public const string Section = "Agent";

    public string TablePath => Path.Combine(StateDirectory, "versions.table");

    public string StatePath => Path.Combine(StateDirectory, "state.json");

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

        var roles = new RolePolicy();
        ReadRoles(agent.GetSection("Roles:Users"), roles.Users, "Roles:Users", problems);
        ReadRoles(agent.GetSection("Roles:Groups"), roles.Groups, "Roles:Groups", problems);
        if (roles.Users.Count == 0 && roles.Groups.Count == 0)
            problems.Add($"{Section}:Roles: no uid or gid has a role, so every client would be refused");

        if (problems.Count > 0)
            throw new AgentSettingsException(problems);
        return new AgentSettings(socket, state, capacity, roles);
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

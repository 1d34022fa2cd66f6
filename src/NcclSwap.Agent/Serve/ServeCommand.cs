using System.CommandLine;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Hosting.Systemd;
using Microsoft.Extensions.Logging;

namespace NcclSwap.Agent.Serve;

/// <summary><c>nccl-swap serve [--config FILE]</c>: runs the agent until stopped (systemd Type=notify).</summary>
internal static class ServeCommand
{
    public static Command Create(TextWriter error)
    {
        var config = new Option<string?>("--config") { Description = "JSON configuration file (its Agent section); NCCL_SWAP_Agent__* environment variables override it." };
        var command = new Command("serve", "Run the agent: the control channel's front door, the version table and the request dispatcher.") { config };
        command.SetAction(result =>
        {
            try
            {
                using IHost host = Build(result.GetValue(config), []);
                host.Run();
                return Environment.ExitCode; // 1 when the agent failed to start
            }
            catch (AgentSettingsException e)
            {
                error.WriteLine($"nccl-swap serve: {e.Message}");
                return 2;
            }
        });
        return command;
    }

    /// <summary>The agent's host; <paramref name="overrides"/> (for tests) win over the file and the environment.</summary>
    public static IHost Build(string? configFile, IEnumerable<KeyValuePair<string, string?>> overrides)
    {
        HostApplicationBuilder builder = Host.CreateEmptyApplicationBuilder(new HostApplicationBuilderSettings { DisableDefaults = true });
        if (configFile is not null)
        {
            if (!File.Exists(configFile))
                throw new AgentSettingsException([$"--config: {configFile} does not exist"]);
            builder.Configuration.AddJsonFile(Path.GetFullPath(configFile), optional: false);
        }
        builder.Configuration.AddEnvironmentVariables("NCCL_SWAP_");
        builder.Configuration.AddInMemoryCollection(overrides);
        builder.Logging.AddSimpleConsole(o => { o.SingleLine = true; o.TimestampFormat = null; });
        builder.Services.AddSystemd(); // journald-friendly console format and Type=notify when run by systemd
        AgentSettings settings = AgentSettings.Load(builder.Configuration);
        builder.Services.AddSingleton(settings);
        builder.Services.AddSingleton<ISystemdNotifier, SystemdNotifier>();
        builder.Services.AddHostedService<AgentService>();
        return builder.Build();
    }
}

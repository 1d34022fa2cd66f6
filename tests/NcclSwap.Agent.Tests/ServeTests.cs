using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using Microsoft.Extensions.Configuration;
using NcclSwap.Agent.Serve;
using NcclSwap.ControlPlane;
using NcclSwap.ControlPlane.Abi;
using NcclSwap.Testing;

namespace NcclSwap.Agent.Tests;

public sealed class ServeTests : IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-serve-").FullName;

    private static uint MyUid() => PeerIdentity.OfThisProcess().Uid;

    private static AgentSettings Load(Dictionary<string, string?> values) =>
        AgentSettings.Load(new ConfigurationBuilder().AddInMemoryCollection(values).Build());

    [Fact]
    public void Settings_are_checked_as_a_whole_and_each_bad_one_is_named()
    {
        var e = Assert.Throws<AgentSettingsException>(() => Load(new()
        {
            ["Agent:SocketPath"] = "agent.sock",
            ["Agent:StateDirectory"] = "state",
            ["Agent:TableCapacity"] = "0",
            ["Agent:Roles:Users:1000"] = "publisher,root",
            ["Agent:Roles:Groups:wheel"] = "operator",
            ["Agent:StagingDirectory"] = "staging",
            ["Agent:UpdatePolicy"] = "interleave",
            ["Agent:AckTimeoutSeconds"] = "-1",
            ["Agent:Backend"] = "opencl",
            ["Agent:StagingPlacement"] = "nvme",
        }));
        Assert.Equal(
        [
            "Agent:SocketPath: 'agent.sock' must be an absolute path",
            "Agent:StateDirectory: 'state' must be an absolute path",
            "Agent:TableCapacity: '0' must be a whole number from 1 to 65536",
            "Agent:StagingDirectory: 'staging' must be an absolute path (a tmpfs such as /run or /dev/shm)",
            "Agent:UpdatePolicy: 'interleave' must be supersede or queue",
            "Agent:AckTimeoutSeconds: '-1' must be a number of seconds above 0 and at most 3600",
            "Agent:Backend: 'opencl' must be auto, cuda or host",
            "Agent:StagingPlacement: 'nvme' must be auto, gpu, gpu+shadow or host",
            "Agent:Roles:Users:1000: unknown role 'root' (publisher, consumer, operator)",
            "Agent:Roles:Groups:wheel: 'wheel' is not a numeric gid",
        ], e.Problems);

        AgentSettings good = Load(new() { ["Agent:SocketPath"] = "/run/x.sock", ["Agent:Roles:Users:1000"] = "publisher, consumer", ["Agent:Roles:Groups:27"] = "operator" });
        Assert.Equal(Role.Publisher | Role.Consumer, good.Roles.Users[1000]);
        Assert.Equal(Role.Operator, good.Roles.Groups[27]);
        Assert.Equal(64, good.TableCapacity);
        Assert.Equal("/run/nccl-swap/staging", good.StagingDirectory);
        Assert.Equal(NcclSwap.ControlPlane.Versions.UpdatePolicy.Supersede, good.Policy);
        Assert.Equal(TimeSpan.FromSeconds(30), good.Options.AckTimeout);
        Assert.Equal(NcclSwap.ControlPlane.Versions.StagingPlacement.Auto, good.Options.Placement);
        AgentSettings queued = Load(new() { ["Agent:Roles:Users:0"] = "operator", ["Agent:UpdatePolicy"] = "queue", ["Agent:AckTimeoutSeconds"] = "2.5", ["Agent:Backend"] = "host", ["Agent:StagingPlacement"] = "gpu+shadow" });
        Assert.Equal((NcclSwap.ControlPlane.Versions.UpdatePolicy.Queue, TimeSpan.FromSeconds(2.5), "host"), (queued.Policy, queued.Options.AckTimeout, queued.Backend));
        Assert.Equal(NcclSwap.ControlPlane.Versions.StagingPlacement.GpuWithHostShadow, queued.Options.Placement);
        Assert.Equal("/var/lib/nccl-swap/versions.table", good.TablePath);
        Assert.Contains("every client would be refused", Assert.Throws<AgentSettingsException>(() => Load(new())).Message);
    }

    [Fact]
    public void The_agent_notifies_systemd_feeds_the_watchdog_answers_clients_and_stops_cleanly_on_sigterm()
    {
        string notify = Path.Combine(_folder, "notify");
        using var systemd = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        systemd.Bind(new UnixDomainSocketEndPoint(notify));
        systemd.ReceiveTimeout = 30_000;
        string socketPath = Path.Combine(_folder, "run", "agent.sock");
        using PeerProcess agent = PeerHost.StartWith("agent", new Dictionary<string, string>
        {
            ["NOTIFY_SOCKET"] = notify,
            ["WATCHDOG_USEC"] = "200000",
            ["NCCL_SWAP_Agent__SocketPath"] = socketPath,
            ["NCCL_SWAP_Agent__StateDirectory"] = Path.Combine(_folder, "state"),
            ["NCCL_SWAP_Agent__StagingDirectory"] = Path.Combine(_folder, "staging"),
            [$"NCCL_SWAP_Agent__Roles__Users__{MyUid()}"] = "publisher,consumer",
        }, "serve");

        var messages = new List<string>();
        string Next()
        {
            byte[] buffer = new byte[512];
            int n = systemd.Receive(buffer);
            string message = Encoding.UTF8.GetString(buffer, 0, n);
            messages.Add(message);
            return message;
        }
        Assert.True(Next() == "READY=1", $"first notification: {string.Join(" | ", messages)}; {agent}");
        Assert.Equal("WATCHDOG=1", Next()); // fed after the health check passed, within 100 ms
        Assert.Equal("WATCHDOG=1", Next());

        using (ChannelClient client = ChannelClient.Connect(socketPath, Role.Consumer, "llama"))
        {
            Assert.True(client.Requests.Write(Messages.NewRequest(RequestKind.Status, 1), TimeSpan.FromSeconds(10)));
            Assert.True(client.Responses.Read(out Response status, TimeSpan.FromSeconds(10)));
            Assert.Equal(Status.Ok, status.Status);
            Assert.True(client.Requests.Write(Messages.NewRequest(RequestKind.Publish, 2), TimeSpan.FromSeconds(10)));
            Assert.True(client.Responses.Read(out Response publish, TimeSpan.FromSeconds(10)));
            Assert.Equal(Status.NotPermitted, publish.Status); // a consumer's publish is refused before anything else
        }

        using (Process kill = Process.Start("kill", ["-TERM", $"{agent.Process.Id}"]))
            kill.WaitForExit();
        string stopping;
        do
            stopping = Next();
        while (stopping == "WATCHDOG=1");
        Assert.Equal("STOPPING=1", stopping);
        Assert.Equal(0, agent.WaitForExit(TimeSpan.FromSeconds(30)));
        Assert.False(File.Exists(socketPath));
        Assert.Contains("nccl-swap agent stopped", agent.Output);
    }

    [Fact]
    public void After_a_crash_the_restarted_agent_shows_every_consumer_the_versions_it_had()
    {
        string state = Path.Combine(_folder, "state");
        new NcclSwap.ControlPlane.State.StateStore(Path.Combine(state, "state.json")).Save(new([
            new("llama", new(7, 1, 0x1234), LastGood: 6, HighestPublished: 7),
            new("qwen", null, 0, 0)], AuditPosition: 0));
        string socketPath = Path.Combine(_folder, "agent.sock");
        var environment = new Dictionary<string, string>
        {
            ["NCCL_SWAP_Agent__SocketPath"] = socketPath,
            ["NCCL_SWAP_Agent__StateDirectory"] = state,
            ["NCCL_SWAP_Agent__StagingDirectory"] = Path.Combine(_folder, "staging"),
            [$"NCCL_SWAP_Agent__Roles__Users__{MyUid()}"] = "consumer",
        };
        for (int life = 0; life < 2; life++)
        {
            using PeerProcess agent = PeerHost.StartWith("agent", environment, "serve");
            agent.WaitForLine("info: NcclSwap.Agent.Serve.AgentService[0] nccl-swap agent listening", TimeSpan.FromSeconds(30));
            using (ChannelClient client = ChannelClient.Connect(socketPath, Role.Consumer, "llama"))
            {
                int row = client.Table.Find("llama");
                Assert.True(row >= 0, $"llama is not in the table; agent: {agent}");
                Assert.Equal(VersionEntry.PackState(7, 1), client.Table.ReadState(row));
                Assert.Equal(6UL, client.Table.ReadEntry(row).LastGood);
                Assert.Equal(0x1234UL, client.Table.ReadEntry(row).ManifestDigest);
                Assert.Equal(0UL, client.Table.ReadState(client.Table.Find("qwen")));
            }
            agent.Process.Kill(); // SIGKILL: no clean shutdown; the next life must recover all the same
            agent.Process.WaitForExit();
        }
    }

    [Fact]
    public void An_agent_that_cannot_start_exits_1_saying_why()
    {
        string blocker = Path.Combine(_folder, "a-file");
        File.WriteAllText(blocker, "not a folder");
        using PeerProcess agent = PeerHost.StartWith("agent", new Dictionary<string, string>
        {
            ["NCCL_SWAP_Agent__SocketPath"] = Path.Combine(_folder, "agent.sock"),
            ["NCCL_SWAP_Agent__StateDirectory"] = Path.Combine(_folder, "state"),
            ["NCCL_SWAP_Agent__StagingDirectory"] = Path.Combine(blocker, "staging"), // under a file: cannot be made
            [$"NCCL_SWAP_Agent__Roles__Users__{MyUid()}"] = "consumer",
        }, "serve");
        Assert.Equal(1, agent.WaitForExit(TimeSpan.FromSeconds(30)));
        Assert.Contains("the agent could not start", agent.Output + agent.Errors);
        Assert.Contains("a-file", agent.Output + agent.Errors);
    }

    [Fact]
    public void Bad_settings_stop_serve_before_it_starts_with_exit_code_2()
    {
        var output = new StringWriter();
        var error = new StringWriter();
        int code = Program.BuildCommandLine(output, error).Parse(["serve", "--config", Path.Combine(_folder, "missing.json")]).Invoke(new() { Output = output, Error = error });
        Assert.Equal(2, code);
        Assert.Contains("missing.json does not exist", error.ToString());
    }

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}

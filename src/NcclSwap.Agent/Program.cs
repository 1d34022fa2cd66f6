using System.CommandLine;
using NcclSwap.Agent.Audit;
using NcclSwap.Agent.Demo;
using NcclSwap.Agent.Doctor;
using NcclSwap.Agent.Inspect;
using NcclSwap.Agent.Keys;
using NcclSwap.Agent.Operator;
using NcclSwap.Agent.Plan;
using NcclSwap.Agent.Transfer;
using NcclSwap.Agent.Serve;

namespace NcclSwap.Agent;

public static class Program
{
    public static int Main(string[] args) => BuildCommandLine(Console.Out, Console.Error).Parse(args).Invoke();

    internal static RootCommand BuildCommandLine(TextWriter output, TextWriter error)
    {
        var root = new RootCommand("nccl-swap: moves new LLM weight versions from trainers to inference GPUs and switches engines over atomically.");
        root.Subcommands.Add(DoctorCommand.Create(output));
        root.Subcommands.Add(DoctorCommand.CreateIpcPeer(output));
        root.Subcommands.Add(InspectCommand.Create(output, error));
        root.Subcommands.Add(ServeCommand.Create(error));
        root.Subcommands.Add(DemoCommand.Create(output, error));
        root.Subcommands.Add(PlanCommand.Create(output, error));
        root.Subcommands.Add(TransferCommand.Create(output, error));
        root.Subcommands.Add(AuditCommand.Create(output, error));
        root.Subcommands.Add(KeysCommand.Create(output, error));
        foreach (Command verb in OperatorCommand.Create(output, error))
            root.Subcommands.Add(verb);
        root.Subcommands.Add(DemoPeers.Create(output));
        return root;
    }
}

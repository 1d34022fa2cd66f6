using System.Diagnostics;

namespace NcclSwap.Agent;

/// <summary>Starts this executable again with other arguments (the second process of doctor --bench, demo's peers).</summary>
internal static class SelfProcess
{
    /// <summary>Arguments put before the command: tests run the agent inside their own executable, which needs a verb first.</summary>
    internal static string[] Prefix { get; set; } = [];

    public static ProcessStartInfo StartInfo(params string[] args)
    {
        string self = Environment.ProcessPath ?? throw new InvalidOperationException("this process's executable is unknown");
        var start = new ProcessStartInfo(self)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        if (Path.GetFileNameWithoutExtension(self) == "dotnet")
            start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, Path.GetFileName(Environment.GetCommandLineArgs()[0])));
        foreach (string arg in Prefix.Concat(args))
            start.ArgumentList.Add(arg);
        return start;
    }
}

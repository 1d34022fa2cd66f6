using System.Diagnostics;
using System.Reflection;
using System.Text;

namespace NcclSwap.Testing;

/// <summary>
/// Entry point of every test executable. Run plainly it runs the tests; run as
/// <c>--peer ROLE ARGS…</c> it plays one role of a multi-process test (a collective rank, an IPC reader),
/// so tests get real second processes without a separate binary, on CI and on a GPU machine alike.
/// </summary>
internal static class PeerHost
{
    private const string Flag = "--peer";

    public static int Run(string[] args, IReadOnlyDictionary<string, Func<string[], int>> roles)
    {
        if (args.Length >= 2 && args[0] == Flag)
        {
            if (!roles.TryGetValue(args[1], out var role))
            {
                Console.Error.WriteLine($"unknown peer role '{args[1]}'; known: {string.Join(", ", roles.Keys)}");
                return 2;
            }
            try
            {
                return role(args[2..]);
            }
            catch (Exception e)
            {
                Console.Error.WriteLine(e);
                return 1;
            }
        }
        return Xunit.Runner.InProc.SystemConsole.ConsoleRunner.Run(args).GetAwaiter().GetResult();
    }

    /// <summary>Starts this test executable as a peer playing <paramref name="role"/>.</summary>
    public static PeerProcess Start(string role, params string[] args) => StartWith(role, null, args);

    /// <summary>As <see cref="Start"/>, with extra environment variables for the peer alone.</summary>
    public static PeerProcess StartWith(string role, IReadOnlyDictionary<string, string>? environment, params string[] args)
    {
        string name = Assembly.GetEntryAssembly()?.GetName().Name
            ?? throw new InvalidOperationException("no entry assembly");
        string apphost = Path.Combine(AppContext.BaseDirectory, name);
        var start = new ProcessStartInfo
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        if (File.Exists(apphost))
        {
            start.FileName = apphost;
        }
        else
        {
            start.FileName = "dotnet";
            start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, name + ".dll"));
        }
        foreach (var (variable, value) in environment ?? new Dictionary<string, string>())
            start.Environment[variable] = value;
        start.ArgumentList.Add(Flag);
        start.ArgumentList.Add(role);
        foreach (string arg in args)
            start.ArgumentList.Add(arg);
        return new PeerProcess(Process.Start(start)!, role);
    }
}

/// <summary>A running peer; its output is collected as it comes so that it can never block on a full pipe.</summary>
internal sealed class PeerProcess : IDisposable
{
    private readonly StringBuilder _stdout = new();
    private readonly StringBuilder _stderr = new();
    private readonly string _role;

    public PeerProcess(Process process, string role)
    {
        Process = process;
        _role = role;
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (_stdout) _stdout.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (_stderr) _stderr.AppendLine(e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
    }

    public Process Process { get; }

    public string Output
    {
        get
        {
            lock (_stdout)
                return _stdout.ToString();
        }
    }

    public string Errors
    {
        get
        {
            lock (_stderr)
                return _stderr.ToString();
        }
    }

    /// <summary>Waits for a line of output starting with <paramref name="prefix"/> and returns the rest of it.</summary>
    public string WaitForLine(string prefix, TimeSpan timeout)
    {
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < timeout)
        {
            string? line = Output.Split('\n').Select(l => l.TrimEnd('\r')).FirstOrDefault(l => l.StartsWith(prefix, StringComparison.Ordinal));
            if (line is not null)
                return line[prefix.Length..];
            if (Process.HasExited)
                break;
            Thread.Sleep(10);
        }
        throw new TimeoutException($"peer '{_role}' printed no '{prefix}' line (exited: {Process.HasExited}); stdout: {Output} stderr: {Errors}");
    }

    /// <summary>Waits for the peer to exit and returns its exit code; kills it at the deadline.</summary>
    public int WaitForExit(TimeSpan timeout)
    {
        if (!Process.WaitForExit(timeout))
        {
            Process.Kill(entireProcessTree: true);
            throw new TimeoutException($"peer '{_role}' did not exit within {timeout.TotalSeconds} s; stdout: {Output} stderr: {Errors}");
        }
        Process.WaitForExit();
        return Process.ExitCode;
    }

    public void Dispose()
    {
        if (!Process.HasExited)
            Process.Kill(entireProcessTree: true);
        Process.Dispose();
    }

    public override string ToString() => $"peer '{_role}' (pid {Process.Id}): exit {(Process.HasExited ? Process.ExitCode : "running")}; stdout: {Output}; stderr: {Errors}";
}

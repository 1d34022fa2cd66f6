using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace NcclSwap.Cuda;

/// <summary>The outcome of looking for one native library: where it was found, or everywhere it was not.</summary>
public sealed class LibraryProbe
{
    internal LibraryProbe(string name, nint handle, IReadOnlyList<string> searched, string? fix)
    {
        Name = name;
        Handle = handle;
        Searched = searched;
        Fix = fix;
    }

    /// <summary>The library's file name, e.g. <c>libnccl.so.2</c>.</summary>
    public string Name { get; }

    /// <summary>Every place tried, in order, each with what happened there.</summary>
    public IReadOnlyList<string> Searched { get; }

    public bool IsLoaded => Handle != 0;

    /// <summary>The file the process mapped, read from <c>/proc/self/maps</c> once the library is in use.</summary>
    public string? Path => IsLoaded ? NativeLibraries.MappedPath(Name) : null;

    internal nint Handle { get; }

    private string? Fix { get; }

    /// <summary>What was searched and how to fix it; null when the library loaded.</summary>
    public string? Failure => IsLoaded
        ? null
        : $"{Name} could not be loaded. Searched, in order:{Environment.NewLine}  - "
          + string.Join(Environment.NewLine + "  - ", Searched)
          + (Fix is null ? "" : Environment.NewLine + "Fix: " + Fix);
}

/// <summary>
/// Finds <c>libcuda.so.1</c> and <c>libnccl.so.2</c> for every binding in this assembly. NCCL is looked for
/// in this order: the file or folder named by <see cref="NcclPathVariable"/>; the system loader
/// (<c>LD_LIBRARY_PATH</c>, the ldconfig cache); the <c>nvidia/nccl/lib</c> folder of a Python environment
/// (the active virtualenv or conda environment, the <c>python3</c> on <c>PATH</c>, user and system site-packages).
/// </summary>
public static class NativeLibraries
{
    /// <summary>Names a specific <c>libnccl.so.2</c> (a file or the folder that holds it).</summary>
    public const string NcclPathVariable = "NCCL_SWAP_NCCL_LIBRARY";

    /// <summary>Names a specific <c>libcuda.so.1</c> (a file or the folder that holds it).</summary>
    public const string CudaPathVariable = "NCCL_SWAP_CUDA_LIBRARY";

    private static readonly Lazy<LibraryProbe> s_cuda = new(() => Probe(
        Interop.Libraries.Cuda,
        CudaPathVariable,
        pythonSubfolder: null,
        fix: "install the NVIDIA driver (it provides libcuda.so.1), or set " + CudaPathVariable + " to the file's path."));

    private static readonly Lazy<LibraryProbe> s_nccl = new(() => Probe(
        Interop.Libraries.Nccl,
        NcclPathVariable,
        pythonSubfolder: "nvidia/nccl/lib",
        fix: "install NCCL (Debian/Ubuntu: apt install libnccl2; Python: pip install nvidia-nccl-cu12 or -cu13), "
             + "or set " + NcclPathVariable + " to the path of libnccl.so.2."));

    /// <summary>The CUDA driver library, probed once.</summary>
    public static LibraryProbe Cuda => s_cuda.Value;

    /// <summary>The NCCL library, probed once.</summary>
    public static LibraryProbe Nccl => s_nccl.Value;

#pragma warning disable CA2255 // The resolver must be in place before the first P/Invoke of this assembly.
    [ModuleInitializer]
#pragma warning restore CA2255
    internal static void RegisterResolver() =>
        NativeLibrary.SetDllImportResolver(typeof(NativeLibraries).Assembly, Resolve);

    private static nint Resolve(string name, Assembly assembly, DllImportSearchPath? searchPath) => name switch
    {
        Interop.Libraries.Cuda => Cuda.Handle,
        Interop.Libraries.Nccl => Nccl.Handle,
        _ => 0, // the runtime's default probing
    };

    /// <summary>Searches for <paramref name="name"/> as described on the class; for tests, with any environment.</summary>
    internal static LibraryProbe Probe(string name, string variable, string? pythonSubfolder, string? fix,
        Func<string, string?>? environment = null)
    {
        environment ??= Environment.GetEnvironmentVariable;
        var searched = new List<string>();

        string? explicitPath = environment(variable);
        if (!string.IsNullOrEmpty(explicitPath))
        {
            // An explicit choice that fails is an error: falling back would hide the misconfiguration.
            string file = Directory.Exists(explicitPath) ? System.IO.Path.Combine(explicitPath, name) : explicitPath;
            nint handle = TryLoad(file, out string why);
            searched.Add(handle != 0 ? $"${variable}={explicitPath}: loaded" : $"${variable}={explicitPath}: {why}");
            return new LibraryProbe(name, handle, searched, $"point {variable} at an existing {name}, or unset it.");
        }
        searched.Add($"${variable}: not set");

        nint system = TryLoad(name, out string loaderError);
        searched.Add(system != 0 ? "the system loader: loaded" : $"the system loader (LD_LIBRARY_PATH, ldconfig cache): {loaderError}");
        if (system != 0)
            return new LibraryProbe(name, system, searched, fix);

        if (pythonSubfolder is not null)
        {
            foreach (string folder in PythonSitePackages(environment))
            {
                string file = System.IO.Path.Combine(folder, pythonSubfolder, name);
                if (!File.Exists(file))
                {
                    searched.Add($"{file}: not found");
                    continue;
                }
                nint handle = TryLoad(file, out string why);
                searched.Add(handle != 0 ? $"{file}: loaded" : $"{file}: {why}");
                if (handle != 0)
                    return new LibraryProbe(name, handle, searched, fix);
            }
        }
        return new LibraryProbe(name, 0, searched, fix);
    }

    private static nint TryLoad(string fileOrName, out string error)
    {
        try
        {
            error = "";
            return NativeLibrary.Load(fileOrName);
        }
        catch (DllNotFoundException e)
        {
            // The runtime's message ends with dlerror()'s text, one line per file it tried; keep those.
            string[] lines = e.Message.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            error = lines.Length > 1 ? string.Join("; ", lines[1..]) : lines.FirstOrDefault() ?? "not loadable";
            return 0;
        }
        catch (BadImageFormatException e)
        {
            error = e.Message;
            return 0;
        }
    }

    /// <summary>site-packages and dist-packages folders of the Python environments this process can see.</summary>
    internal static IEnumerable<string> PythonSitePackages(Func<string, string?> environment)
    {
        var prefixes = new List<string>();
        void AddPrefix(string? prefix)
        {
            if (!string.IsNullOrEmpty(prefix) && !prefixes.Contains(prefix))
                prefixes.Add(prefix);
        }
        AddPrefix(environment("VIRTUAL_ENV"));
        AddPrefix(environment("CONDA_PREFIX"));
        foreach (string dir in (environment("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries))
        {
            string python = System.IO.Path.Combine(dir, "python3");
            if (File.Exists(python))
            {
                string resolved = new FileInfo(python).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? python;
                AddPrefix(System.IO.Path.GetDirectoryName(System.IO.Path.GetDirectoryName(resolved)));
                AddPrefix(System.IO.Path.GetDirectoryName(dir));
            }
        }
        string? home = environment("HOME");
        if (!string.IsNullOrEmpty(home))
            AddPrefix(System.IO.Path.Combine(home, ".local"));
        AddPrefix("/usr/local");
        AddPrefix("/usr");

        var folders = new List<string>();
        foreach (string entry in (environment("PYTHONPATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries))
            folders.Add(entry);
        foreach (string prefix in prefixes)
        {
            string lib = System.IO.Path.Combine(prefix, "lib");
            if (!Directory.Exists(lib))
                continue;
            lib = new DirectoryInfo(lib).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? lib;
            foreach (string pythonDir in Directory.EnumerateDirectories(lib, "python3*").Order(StringComparer.Ordinal))
            {
                folders.Add(System.IO.Path.Combine(pythonDir, "site-packages"));
                folders.Add(System.IO.Path.Combine(pythonDir, "dist-packages"));
            }
        }
        return folders.Select(f => f.TrimEnd('/')).Distinct(StringComparer.Ordinal);
    }

    /// <summary>The path of the mapped file whose name starts with the library's stem (libnccl.so.2 maps as libnccl.so.2.28.3).</summary>
    internal static string? MappedPath(string name)
    {
        string stem = name[..(name.IndexOf(".so", StringComparison.Ordinal) + 3)];
        try
        {
            foreach (string line in File.ReadLines("/proc/self/maps"))
            {
                int slash = line.IndexOf('/');
                if (slash < 0)
                    continue;
                string path = line[slash..];
                if (System.IO.Path.GetFileName(path).StartsWith(stem, StringComparison.Ordinal))
                    return path;
            }
        }
        catch (IOException)
        {
        }
        return null;
    }
}

using System.Diagnostics;
using System.Text;
using System.Text.RegularExpressions;

namespace NcclSwap.ControlPlane.Tests;

/// <summary>
/// The layout of the ABI header as the C compiler sees it: every struct's size and every field's offset and
/// size, from a program generated from the header's own field list, compiled with gcc and run.
/// </summary>
internal static partial class NativeLayout
{
    public sealed record Field(string Name, long Offset, long Size);

    public static string HeaderPath
    {
        get
        {
            for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            {
                string candidate = Path.Combine(dir.FullName, "native", "include", "nccl_swap_abi.h");
                if (File.Exists(candidate))
                    return candidate;
            }
            throw new FileNotFoundException("native/include/nccl_swap_abi.h not found above " + AppContext.BaseDirectory);
        }
    }

    /// <summary>Struct name → (size, fields in declaration order).</summary>
    public static Dictionary<string, (long Size, List<Field> Fields)> Measure()
    {
        string header = File.ReadAllText(HeaderPath);
        string code = CommentPattern().Replace(header, "");
        var structs = new Dictionary<string, List<string>>();
        foreach (Match s in StructPattern().Matches(code))
            structs[s.Groups[1].Value] = FieldPattern().Matches(s.Groups[2].Value).Select(f => f.Groups[1].Value).ToList();
        Assert.NotEmpty(structs);

        var program = new StringBuilder($"#include <stdio.h>\n#include <stddef.h>\n#include \"{HeaderPath}\"\nint main(void) {{\n");
        foreach (var (name, fields) in structs)
        {
            program.AppendLine($"  printf(\"{name} %zu\\n\", sizeof({name}));");
            foreach (string field in fields)
                program.AppendLine($"  printf(\"{name}.{field} %zu %zu\\n\", offsetof({name}, {field}), sizeof((({name}*)0)->{field}));");
        }
        program.AppendLine("  return 0;\n}");

        string folder = Directory.CreateTempSubdirectory("nccl-swap-abi-").FullName;
        try
        {
            string source = Path.Combine(folder, "layout.c"), binary = Path.Combine(folder, "layout");
            File.WriteAllText(source, program.ToString());
            Run("gcc", "-std=c11", "-Wall", "-Werror", "-o", binary, source);
            var result = structs.Keys.ToDictionary(k => k, _ => (Size: 0L, Fields: new List<Field>()));
            foreach (string line in Run(binary).Split('\n', StringSplitOptions.RemoveEmptyEntries))
            {
                string[] parts = line.Split(' ');
                string[] name = parts[0].Split('.');
                if (name.Length == 1)
                    result[name[0]] = (long.Parse(parts[1]), result[name[0]].Fields);
                else
                    result[name[0]].Fields.Add(new Field(name[1], long.Parse(parts[1]), long.Parse(parts[2])));
            }
            return result;
        }
        finally
        {
            Directory.Delete(folder, recursive: true);
        }
    }

    public static void RequireCompiler()
    {
        try
        {
            Run("gcc", "--version");
        }
        catch (System.ComponentModel.Win32Exception)
        {
            Assert.Skip("needs gcc to compile the ABI header (apt install gcc)");
        }
    }

    private static string Run(string file, params string[] args)
    {
        using Process process = Process.Start(new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true })!;
        string output = process.StandardOutput.ReadToEnd();
        string error = process.StandardError.ReadToEnd();
        process.WaitForExit();
        Assert.True(process.ExitCode == 0, $"{file} {string.Join(' ', args)} exited {process.ExitCode}: {error}");
        return output;
    }

    [GeneratedRegex(@"/\*.*?\*/", RegexOptions.Singleline)]
    private static partial Regex CommentPattern();

    [GeneratedRegex(@"typedef struct (\w+) \{(.*?)\} \1;", RegexOptions.Singleline)]
    private static partial Regex StructPattern();

    [GeneratedRegex(@"^\s*(?:u?int\d+_t|char|float|double)\s+(\w+)(?:\[[^\]]+\])?;", RegexOptions.Multiline)]
    private static partial Regex FieldPattern();
}

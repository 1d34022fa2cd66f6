using NcclSwap.Cuda;

namespace NcclSwap.Agent.Tests;

public class DoctorTests
{
    private static (int ExitCode, string Output) Run(params string[] args)
    {
        var output = new StringWriter();
        int code = Program.BuildCommandLine(output, output).Parse(args).Invoke(new() { Output = output, Error = output });
        return (code, output.ToString());
    }

    [Fact]
    public void Doctor_reports_the_backend_libraries_and_pinned_limit_and_exits_0()
    {
        (int code, string output) = Run("doctor", "--bench");
        Assert.Equal(0, code);
        Assert.Contains("nccl-swap doctor", output);
        Assert.Contains("pinned:    ulimit -l", output);
        if (CudaDriver.IsSupported)
        {
            Assert.Contains("backend:   cuda", output);
            Assert.Matches(@"GPU 0: .+, [\d.]+ GiB, bus [0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.\d, GPU-", output);
            Assert.Contains("pinned H2D:", output);
        }
        else
        {
            // A machine without a GPU is told so plainly, with the host backend.
            Assert.Contains("backend:   host (no usable GPU: no NVIDIA driver (libcuda.so.1 not found))", output);
            Assert.Contains("GPUs:      none", output);
            Assert.Contains("bench:     skipped, no GPU", output);
        }
        Assert.Contains(NcclLibrary.IsSupported ? "NCCL:      " + NcclLibrary.Version : "NCCL:      not found;", output);
    }

    [Fact]
    public void Help_lists_doctor_and_hides_the_internal_peer()
    {
        (int code, string output) = Run("--help");
        Assert.Equal(0, code);
        Assert.Contains("doctor", output);
        Assert.DoesNotContain("doctor-ipc-peer", output);
    }

    [Fact]
    public void An_unknown_verb_fails_with_a_message()
    {
        (int code, string output) = Run("frobnicate");
        Assert.NotEqual(0, code);
        Assert.Contains("frobnicate", output);
    }
}

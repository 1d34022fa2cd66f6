namespace NcclSwap.Cuda.Tests;

public class NativeLibrariesTests
{
    private static Func<string, string?> Environment(params (string Name, string Value)[] variables) =>
        name => variables.FirstOrDefault(v => v.Name == name).Value;

    [Fact]
    public void An_explicit_path_that_does_not_load_is_an_error_naming_the_variable()
    {
        string missing = Path.Combine(Path.GetTempPath(), $"nccl-swap-missing-{Guid.NewGuid():N}", "libnccl.so.2");
        LibraryProbe probe = NativeLibraries.Probe("libnccl.so.2", "NCCL_SWAP_NCCL_LIBRARY", "nvidia/nccl/lib", "install NCCL",
            Environment(("NCCL_SWAP_NCCL_LIBRARY", missing), ("PATH", "")));
        Assert.False(probe.IsLoaded);
        Assert.Null(probe.Path);
        Assert.Single(probe.Searched);
        Assert.Contains($"$NCCL_SWAP_NCCL_LIBRARY={missing}", probe.Failure);
        Assert.Contains("point NCCL_SWAP_NCCL_LIBRARY at an existing libnccl.so.2, or unset it", probe.Failure);
    }

    [Fact]
    public void A_python_environment_is_searched_after_the_loader_and_reported()
    {
        // A fake virtualenv whose nvidia/nccl/lib holds a file that is not a shared library.
        string venv = Directory.CreateTempSubdirectory("nccl-swap-venv-").FullName;
        try
        {
            string lib = Path.Combine(venv, "lib", "python3.12", "site-packages", "nvidia", "nccl", "lib");
            Directory.CreateDirectory(lib);
            File.WriteAllBytes(Path.Combine(lib, "libnccl-swap-test.so.2"), Testing.TestData.Random(100, seed: 1));

            LibraryProbe probe = NativeLibraries.Probe("libnccl-swap-test.so.2", "NCCL_SWAP_TEST_LIBRARY", "nvidia/nccl/lib", "install it",
                Environment(("VIRTUAL_ENV", venv), ("PATH", ""), ("HOME", venv)));

            Assert.False(probe.IsLoaded);
            Assert.Equal("$NCCL_SWAP_TEST_LIBRARY: not set", probe.Searched[0]);
            Assert.StartsWith("the system loader", probe.Searched[1]);
            string candidate = Path.Combine(lib, "libnccl-swap-test.so.2");
            string entry = Assert.Single(probe.Searched, s => s.StartsWith(candidate, StringComparison.Ordinal));
            Assert.DoesNotContain("not found", entry); // it was found and tried, and dlopen refused it
            Assert.Contains("Fix: install it", probe.Failure);
        }
        finally
        {
            Directory.Delete(venv, recursive: true);
        }
    }

    [Fact]
    public void Site_packages_of_virtualenv_conda_and_pythonpath_are_candidates()
    {
        string venv = Directory.CreateTempSubdirectory("nccl-swap-venv-").FullName;
        string conda = Directory.CreateTempSubdirectory("nccl-swap-conda-").FullName;
        try
        {
            Directory.CreateDirectory(Path.Combine(venv, "lib", "python3.11"));
            Directory.CreateDirectory(Path.Combine(conda, "lib", "python3.12"));
            var folders = NativeLibraries.PythonSitePackages(Environment(("VIRTUAL_ENV", venv), ("CONDA_PREFIX", conda), ("PYTHONPATH", "/opt/extra"), ("PATH", ""))).ToList();
            Assert.Equal("/opt/extra", folders[0]);
            Assert.Contains(Path.Combine(venv, "lib", "python3.11", "site-packages"), folders);
            Assert.Contains(Path.Combine(conda, "lib", "python3.12", "site-packages"), folders);
            Assert.True(folders.IndexOf(Path.Combine(venv, "lib", "python3.11", "site-packages"))
                        < folders.IndexOf(Path.Combine(conda, "lib", "python3.12", "site-packages")));
        }
        finally
        {
            Directory.Delete(venv, recursive: true);
            Directory.Delete(conda, recursive: true);
        }
    }

    [Fact]
    public void Driver_support_is_reported_with_a_reason()
    {
        if (CudaDriver.IsSupported)
        {
            Assert.Null(CudaDriver.UnsupportedReason);
            Assert.True(CudaDriver.DeviceCount > 0);
        }
        else
        {
            Assert.Contains("libcuda.so.1", CudaDriver.UnsupportedReason);
            var e = Assert.Throws<GpuUnavailableException>(() => CudaContext.Retain(0));
            Assert.Contains("libcuda.so.1", e.Message);
        }
    }

    [Fact]
    public void Nccl_support_is_reported_with_what_was_searched()
    {
        if (NcclLibrary.IsSupported)
        {
            Assert.Matches(@"^\d+\.\d+\.\d+$", NcclLibrary.Version);
            Assert.NotNull(NativeLibraries.Nccl.Path);
        }
        else
        {
            Assert.Contains("$NCCL_SWAP_NCCL_LIBRARY", NcclLibrary.UnsupportedReason);
            Assert.Contains("the system loader", NcclLibrary.UnsupportedReason);
            Assert.Contains("Fix:", NcclLibrary.UnsupportedReason);
            Assert.Throws<GpuUnavailableException>(() => NcclLibrary.CreateUniqueId());
        }
    }

    [Fact]
    public void The_pinned_memory_limit_is_read()
    {
        ulong? limit = HostLimits.LockedMemoryLimit;
        Assert.True(limit is null || limit > 0);
    }
}

using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using NcclSwap.ControlPlane.Abi;

namespace NcclSwap.ControlPlane.Tests;

/// <summary>The Python client against regions this side created: the same bytes mean the same things in both languages.</summary>
public sealed class PythonClientTests : IDisposable
{
    private readonly string _folder = Directory.CreateTempSubdirectory("nccl-swap-py-").FullName;

    private const string Client = """
        import hashlib, struct, sys
        from nccl_swap import SharedRing, VersionTable, unpack_state, abi
        table_path, requests_path, responses_path, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
        with VersionTable(table_path) as table:
            row = table.find("llama")
            print("state", *unpack_state(table.state(row)), table.entry(row).last_good, flush=True)
        with SharedRing(requests_path) as requests, SharedRing(responses_path) as responses:
            for i in range(count):
                raw = requests.read(timeout=30)
                assert raw is not None, f"request {i} did not come"
                r = abi.Request.from_buffer_copy(raw)
                payload = bytes(r.payload)[:r.payload_bytes]
                assert r.magic == abi.REQUEST_MAGIC and r.kind == abi.RequestKind.PUBLISH and r.id == i, (r.magic, r.kind, r.id, i)
                assert payload == hashlib.sha256(struct.pack("<Q", i)).digest(), f"payload of request {i}"
                detail = f"ok {i}".encode()
                response = abi.Response(magic=abi.RESPONSE_MAGIC, status=-i, id=r.id, version=r.version * 2, detail_bytes=len(detail), detail=detail)
                assert responses.write(bytes(response), timeout=30), f"no room for response {i}"
        print("done", count, flush=True)
        """;

    [Fact]
    public async Task The_python_client_reads_the_table_and_answers_requests_through_rings()
    {
        string python = Path.GetFullPath(Path.Combine(Path.GetDirectoryName(NativeLayout.HeaderPath)!, "..", "..", "src", "python"));
        RequirePython();
        using VersionTable table = VersionTable.Create(Path.Combine(_folder, "table"), 4);
        int row = table.Add("llama");
        table.Activate(row, 6, 0, 1);
        table.Activate(row, 7, 1, 2);
        int entry = Marshal.SizeOf<Request>();
        using SharedRing requests = SharedRing.Create(Path.Combine(_folder, "requests"), 16, entry);
        using SharedRing responses = SharedRing.Create(Path.Combine(_folder, "responses"), 16, entry);
        const int count = 2000;

        var start = new ProcessStartInfo("python3", ["-c", Client, table.Path, requests.Path, responses.Path, $"{count}"])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        start.Environment["PYTHONPATH"] = python;
        using Process client = Process.Start(start)!;
        var reader = Task.Run(() =>
        {
            for (int i = 0; i < count; i++)
            {
                Assert.True(responses.Read(out Response response, TimeSpan.FromSeconds(30)), $"response {i} did not come");
                Assert.Equal(AbiConstants.ResponseMagic, response.Magic);
                Assert.Equal((ulong)i, response.Id);
                Assert.Equal(-i, response.Status);
                Assert.Equal((ulong)i * 6, response.Version);
                Assert.Equal($"ok {i}", System.Text.Encoding.UTF8.GetString(MemoryMarshal.AsBytes(new ReadOnlySpan<PayloadBytes>(in response.Detail))[..(int)response.DetailBytes]));
            }
        }, TestContext.Current.CancellationToken);
        for (int i = 0; i < count; i++)
        {
            Request request = Messages.NewRequest(RequestKind.Publish, (ulong)i, version: (ulong)i * 3);
            byte[] payload = SHA256.HashData(BitConverter.GetBytes((ulong)i));
            payload.CopyTo(MemoryMarshal.AsBytes(new Span<PayloadBytes>(ref request.Payload)));
            request.PayloadBytes = (uint)payload.Length;
            if (!requests.Write(request, TimeSpan.FromSeconds(30)))
                Assert.Fail($"no room for request {i} within 30 s: python said {client.StandardError.ReadToEnd()}");
        }
        await reader;
        string output = client.StandardOutput.ReadToEnd();
        string errors = client.StandardError.ReadToEnd();
        client.WaitForExit();
        Assert.True(client.ExitCode == 0, $"python exited {client.ExitCode}: {errors}");
        Assert.Contains("state 7 1 6", output);
        Assert.Contains($"done {count}", output);
    }

    [Fact]
    public async Task A_python_publishers_versions_reach_a_csharp_consumer_byte_for_byte()
    {
        RequirePython();
        string python = Path.GetFullPath(Path.Combine(Path.GetDirectoryName(NativeLayout.HeaderPath)!, "..", "..", "src", "python"));
        await using TestAgent agent = TestAgent.Start();
        const string script = """
            import sys
            from nccl_swap import Publisher
            from tests import synthetic
            with Publisher("llama", synthetic.layout(), sys.argv[1]) as publisher:
                for version in (1, 2, 3):
                    synthetic.fill(publisher.region, version)
                    print(version, publisher.publish(version, wait=True).check().version, flush=True)
            """;
        var start = new ProcessStartInfo("python3", ["-c", script, agent.SocketPath]) { RedirectStandardOutput = true, RedirectStandardError = true, WorkingDirectory = python };
        start.Environment["PYTHONPATH"] = python;

        // The C# consumer registers the same tensors, as the C# side lays them out (the agent matches them by name).
        WeightSets.RegionLayout layout = WeightSets.SyntheticModel.Tiny.Layout();
        using var consumer = ConsumerClient.Connect(agent.SocketPath, "llama", layout, Versions.ConsumerMode.Flip);
        using Process publisher = Process.Start(start)!;
        Task<string> output = publisher.StandardOutput.ReadToEndAsync(TestContext.Current.CancellationToken);
        Task<string> errors = publisher.StandardError.ReadToEndAsync(TestContext.Current.CancellationToken);
        agent.WaitFor(() => { consumer.Step(); return consumer.Version == 3; }, TimeSpan.FromSeconds(30), "the consumer serving version 3");
        await publisher.WaitForExitAsync(TestContext.Current.CancellationToken);
        Assert.True(publisher.ExitCode == 0, $"python: {await output} {await errors}");
        Assert.Equal(["1 257", "2 515", "3 769"], (await output).Trim().Split('\n')); // version << 8 | slot << 1 | 1
        Assert.Empty(agent.Outcome("llama", 3)!.Evicted);
        foreach (WeightSets.TensorPlacement tensor in layout.Tensors)
            Assert.Equal(Shake128.HashData(System.Text.Encoding.UTF8.GetBytes($"3/{tensor.Name}"), (int)tensor.Bytes), consumer.Weights.Tensor(tensor.Name).ToArray());
    }

    private static void RequirePython()
    {
        try
        {
            using Process probe = Process.Start(new ProcessStartInfo("python3", ["--version"]) { RedirectStandardOutput = true })!;
            probe.WaitForExit();
        }
        catch (System.ComponentModel.Win32Exception)
        {
            Assert.Skip("needs python3 for the Python client");
        }
    }

    public void Dispose() => Directory.Delete(_folder, recursive: true);
}

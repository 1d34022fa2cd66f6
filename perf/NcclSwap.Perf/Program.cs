using BenchmarkDotNet.Running;
using NcclSwap.Perf;

// dotnet run -c Release --project perf/NcclSwap.Perf -- VERB
//   cpu-digest            BenchmarkDotNet: block digest on one core, against a plain XXH64 of the same bytes
//   gpu-digest [GiB]      GPU block digest against the device-to-device copy rate measured in the same run
//   load [GiB] [shards]   checkpoint load into pinned memory against a plain sequential read of the same files
//   channel [count]       control-channel round trip (request ring → another process → response ring), p50/p99
//   version-check         BenchmarkDotNet: the consumer's per-step version-table load
//   agent-channel [count] ping round trips through a real agent in another process (dispatcher and handler), p50/p99
//   consumer-step         BenchmarkDotNet: ConsumerClient.Step when nothing is new (the engine's per-step cost)
//   nccl [--gpus G] [--gib N] [--runs R] [--host]
//                         raw broadcast, send/receive ring and fan-out between the local GPUs (bus bandwidth)
//   transfer LAYOUT [--tp M] [--destination D] [--gpus G] [--layers N] [--bucket-mib B] [--runs R] [--host]
//                         a transfer plan through the executor (one GPU: a destination's share sent to itself; G GPUs:
//                         source on GPU 0, destinations on the others), against raw collectives of the same buckets
return args.FirstOrDefault() switch
{
    "cpu-digest" => CpuDigest.Run(args[1..]),
    "gpu-digest" => GpuDigestBenchmark.Run(args[1..]),
    "load" => LoadBenchmark.Run(args[1..]),
    "channel" => ChannelBenchmark.Run(args[1..]),
    ChannelBenchmark.ResponderVerb => ChannelBenchmark.Respond(args[1..]),
    "version-check" => VersionCheck.Run(args[1..]),
    "agent-channel" => AgentChannelBenchmark.Run(args[1..]),
    AgentChannelBenchmark.AgentVerb => AgentChannelBenchmark.Host(args[1..]),
    "consumer-step" => ConsumerStep.Run(args[1..]),
    "transfer" => TransferBenchmark.Run(args[1..]),
    "nccl" => NcclBandwidth.Run(args[1..]),
    _ => Usage(),
};

static int Usage()
{
    Console.Error.WriteLine("usage: NcclSwap.Perf cpu-digest [BenchmarkDotNet args] | gpu-digest [GiB] | load [GiB] [shards] | channel [count] | version-check | agent-channel [count] | consumer-step | nccl [--gpus G] [--gib N] | transfer LAYOUT [--tp M] [--gpus G] [--layers N] ...");
    return 2;
}

"""Co-located GPU path benchmark: trainer and engine on one GPU, weights moved by nccl-swap and by two PyTorch peers.

    python3 perf/colocated.py AGENT [--models small,8b] [--versions N] [--gap S]

For each model, in one run: T, the time of one device-to-device copy of all the weight bytes (the copy limit,
measured on flat buffers just before); then nccl-swap publish -> verify -> activate to a flip consumer and to a
copy-in consumer: the agent's own split of each update (from its log), and the engine's pause, timed with CUDA
events on the engine's stream around its step at the version boundary, with QUEUED_MS of GPU work queued ahead
of it as a generating engine would have (flip: what the switch adds; copy-in: quiesce, the agent's copy, done).
"publish -> activated" ends when the version table shows the version (flip: the engine's next work uses it), and
for copy-in adds that pause (its bytes are then in the engine). "Transfer only" leaves out the agent's verify
line, which is reported on its own. Then the peers in a second process: per-tensor torch CUDA IPC ``copy_``, and
1 GiB buckets flattened, sent by IPC and unflattened. Every figure is also given as a multiple of T. Random bf16
weights, fresh before every version (never zeros), versions --gap seconds apart (a training step: after
activating, the agent fills its staged copy, and a publish that finds it busy takes the staging path); the
first version (first touches, pinning) is left out. Prints a table per model; exits 1 if any engine's bytes
differ from the trainer's.
"""

import argparse
import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "python"))
from nccl_swap import COPY_IN, FLIP, connect  # noqa: E402
from nccl_swap.gpu import GpuConsumer, GpuPublisher  # noqa: E402
from nccl_swap.local_agent import LocalAgent  # noqa: E402

GiB = 1 << 30
QUEUED_MS = 2.0  # GPU work an engine has queued when it reaches a step boundary


def llama_shapes(layers, hidden, intermediate, kv_heads, head_dim, vocab):
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    return shapes


MODELS = {
    "8b": ("Llama-3-8B shapes", llama_shapes(32, 4096, 14336, 8, 128, 128256)),   # 291 tensors, 16.1 GB bf16
    "small": ("Llama-3.2-1B shapes", llama_shapes(16, 2048, 8192, 8, 64, 128256)),  # 147 tensors, 3.0 GB bf16
}


def tensors(shapes):
    return {n: torch.empty(s, dtype=torch.bfloat16, device="cuda").normal_() for n, s in shapes.items()}


def median_ms(fn, repeat=5):
    times = []
    for _ in range(repeat + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[1:])


def copy_limit(total):
    """T for `total` bytes: the median rate of one D2D copy of a flat buffer of up to 4 GiB."""
    n = min(total, 4 * GiB)
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    rate = n / (ms / 1e3)
    return total / rate, rate


# ---- the peers, in a process of their own (torch CUDA IPC: tensors sent through a multiprocessing queue) ----

def peer_engine(shapes, requests, answers):
    torch.cuda.init()
    mine = {n: torch.empty(s, dtype=torch.bfloat16, device="cuda") for n, s in shapes.items()}
    while True:
        message = requests.get()
        if message is None:
            return
        kind, payload = message
        if kind == "tensors":  # per-tensor IPC copy_
            for name, t in payload.items():
                mine[name].copy_(t)
        else:  # a bucket: its tensors' names, offsets and the flat bytes
            names, bucket = payload
            offset = 0
            for name in names:
                n = mine[name].numel()
                mine[name].copy_(bucket[offset:offset + n].view(mine[name].shape))
                offset += n
        torch.cuda.synchronize()
        answers.put(True)


def peers(shapes, trainer, repeat):
    ctx = mp.get_context("spawn")
    requests, answers = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=peer_engine, args=(shapes, requests, answers))
    child.start()
    per_tensor, buckets = [], []
    for i in range(repeat + 1):
        torch.cuda.synchronize()
        started = time.perf_counter()
        requests.put(("tensors", trainer))
        answers.get()
        per_tensor.append(time.perf_counter() - started)
    names = list(trainer)
    for i in range(repeat + 1):
        torch.cuda.synchronize()
        started = time.perf_counter()
        group, size = [], 0
        for name in names + [None]:
            t = trainer.get(name)
            if name is None or (size + t.numel() * 2 > GiB and group):
                bucket = torch.cat([trainer[n].reshape(-1) for n in group])
                requests.put(("bucket", (group, bucket)))
                answers.get()
                del bucket
                group, size = [], 0
            if name is not None:
                group.append(name)
                size += t.numel() * 2
        buckets.append(time.perf_counter() - started)
    requests.put(None)
    child.join()
    return statistics.median(per_tensor[1:]), statistics.median(buckets[1:])


# ---- nccl-swap ----

def outcome(log, version):
    """The agent's split of one update from its log: snapshot, ack wait, stage, verify, activate, request -> first copy (ms)."""
    found = re.findall(rf"version {version}: activated; \d+ bytes; snapshot ([\d.]+) ms, ack wait ([\d.]+) ms, stage ([\d.]+) ms, "
                       rf"verify ([\d.]+) ms, activate ([\d.]+) ms; \d+ flip consumer\(s\); first copy ([\d.]+) ms after the request", log)
    return tuple(float(x) for x in found[-1]) if found else None


def same(a, b):
    return all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)


def swap(agent_path, trainer, mode, versions, folder, gap):
    """Publishes `versions` versions to one consumer in `mode`; returns per-version figures (ms) and whether bytes matched."""
    engine = {n: torch.nn.Parameter(torch.empty_like(t), requires_grad=False) for n, t in trainer.items()} if mode == FLIP else \
        {n: torch.empty_like(t) for n, t in trainer.items()}
    staging = tempfile.mkdtemp(prefix="nccl-swap-bench-", dir="/dev/shm")
    agent = LocalAgent(agent_path, folder, staging=staging, Backend="cuda", UpdatePolicy="queue", AckTimeoutSeconds="30")
    rows, exact = [], True
    queued_cycles = int(QUEUED_MS * 1e-3 * torch.cuda.get_device_properties(0).clock_rate * 1e3)  # clock_rate is in kHz
    try:
        with GpuPublisher("bench", trainer, agent.socket, timeout=600) as publisher, \
                GpuConsumer("bench", engine, mode, agent.socket, timeout=600) as consumer:
            stream = torch.cuda.current_stream()
            for version in range(1, versions + 1):
                time.sleep(gap)  # a trainer's step: the agent finishes the last version's staged copy meanwhile
                for t in trainer.values():
                    t.normal_()
                torch.cuda.synchronize()
                started = time.perf_counter()
                publisher.publish(version).check()  # returns once the agent has the bytes (in the slots, or staged)
                published = time.perf_counter() - started
                deadline = time.monotonic() + 600
                session = consumer.session
                while session.table.state(session.row) == consumer.serving:  # the engine's per-step check, until it is activated
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{mode}: version {version} was not activated within 600 s")
                shown = time.perf_counter() - started
                # The step at the boundary, with the engine's work queued ahead of it (QUEUED_MS of GPU time), as in a
                # generating engine: the pause is what the step adds on the engine's stream (flip: nothing should be;
                # copy-in: quiesce, the agent's copy, done), timed with events around it.
                before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(queued_cycles)
                before.record(stream)
                host = time.perf_counter()
                switched = consumer.step()
                host = time.perf_counter() - host
                after.record(stream)
                after.synchronize()
                pause = before.elapsed_time(after)
                # flip: the table shows it, and the engine's next work sees it; copy-in: that, plus the copy into the engine
                activated = shown + (pause / 1e3 if mode == COPY_IN else 0.0)
                while consumer._pending is not None:
                    consumer.step()
                    time.sleep(0.0002)
                if not switched or consumer.version != version:
                    raise RuntimeError(f"{mode}: the consumer serves {consumer.version}, not {version}: {consumer.last_error}")
                split = outcome(agent.log(), version)
                rows.append({"publish_ms": published * 1e3, "activated_ms": activated * 1e3, "pause_gpu_ms": pause,
                             "step_host_ms": host * 1e3, "split": split})
            exact = same(engine, trainer)  # the trainer's tensors still hold the last version published
            with connect("operator", "bench", agent.socket) as operator:
                placement = operator.call(operator.request(5)).check().detail
    finally:
        agent.stop()
        subprocess.run(["rm", "-rf", staging])
    del engine, consumer, publisher  # the flip consumer's slots too: the next agent places its staging by free memory
    gc.collect()
    torch.cuda.empty_cache()
    return rows, exact, placement


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("agent")
    parser.add_argument("--models", default="small,8b")
    parser.add_argument("--versions", type=int, default=11)
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between versions, as a training step would leave")
    args = parser.parse_args()
    gpu = torch.cuda.get_device_name()
    failed = False
    for key in args.models.split(","):
        title, shapes = MODELS[key]
        trainer = tensors(shapes)
        total = sum(t.numel() * 2 for t in trainer.values())
        T, rate = copy_limit(total)
        print(f"\n== {title}: {len(shapes)} tensors, {total / 1e9:.2f} GB bf16, {gpu}", flush=True)
        print(f"D2D copy limit T = {T * 1e3:.2f} ms ({rate / 1e9:.0f} GB/s, one copy of a flat buffer, median of 5)", flush=True)
        results = {}
        with tempfile.TemporaryDirectory(prefix="nccl-swap-bench-") as folder:
            for mode in (FLIP, COPY_IN):
                where = os.path.join(folder, mode.replace("-", ""))
                os.makedirs(where)
                rows, exact, placement = swap(args.agent, trainer, mode, args.versions, where, args.gap)
                results[mode] = (rows[1:], exact, placement)  # the first version pays first touches: left out
                failed |= not exact
        per_tensor, bucket = peers(shapes, trainer, 3)
        del trainer
        torch.cuda.empty_cache()

        def cell(ms):
            return f"{ms:8.2f} ms  {ms / (T * 1e3):5.2f} T"

        print(f"{'what':58} {'time':>11}  {'ratio':>7}")
        print(f"{'D2D copy of all bytes (the limit)':58} {cell(T * 1e3)}")
        for mode in (FLIP, COPY_IN):
            rows, exact, placement = results[mode]
            med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
            splits = [r["split"] for r in rows if r["split"]]
            split = [statistics.median(x[i] for x in splits) if splits else float("nan") for i in range(6)]
            print(f"-- nccl-swap {mode} ({placement}; bytes equal: {exact}; median of {len(rows)} versions)")
            print(f"{'   publish returns (the agent has the bytes)':58} {cell(med('publish_ms'))}")
            what = "publish -> the engine's step sees it (activated)" if mode == FLIP else "publish -> copied into the engine"
            print(f"{'   ' + what:58} {cell(med('activated_ms'))}")
            transfer = statistics.median(r["activated_ms"] - r["split"][3] for r in rows if r["split"]) if splits else float("nan")
            print(f"{'   the same, transfer only (less the agent verify line)':58} {cell(transfer)}")
            print(f"{'   agent: request -> first copy (dispatch, worker, buffer)':58} {cell(split[5])}")
            print(f"{'   agent: snapshot (what the trainer waited for)':58} {cell(split[0])}")
            print(f"{'   agent: stage (copies into the slots or staging)':58} {cell(split[2])}")
            print(f"{'   agent: verify (digests on the GPU)':58} {cell(split[3])}")
            print(f"{'   agent: ack wait':58} {cell(split[1])}")
            print(f"{'   agent: activate (state saved, table switched)':58} {cell(split[4])}")
            pauses = sorted(r["pause_gpu_ms"] for r in rows)
            hosts = sorted(r["step_host_ms"] for r in rows)
            p99 = pauses[min(len(pauses) - 1, int(0.99 * len(pauses)))]
            print(f"{'   engine pause on its stream, p50 / p99 (of ' + str(len(pauses)) + ')':58} {pauses[len(pauses) // 2] * 1e3:8.1f} µs / {p99 * 1e3:.1f} µs ({pauses[len(pauses) // 2] / (T * 1e3):.2f} T)")
            print(f"{'   engine host time in step() at the switch, p50 / max':58} {hosts[len(hosts) // 2] * 1e3:8.1f} µs / {hosts[-1] * 1e3:.1f} µs")
        print(f"{'PyTorch peer: per-tensor CUDA IPC copy_':58} {cell(per_tensor * 1e3)}")
        print(f"{'PyTorch peer: 1 GiB buckets, flatten + IPC + unflatten':58} {cell(bucket * 1e3)}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

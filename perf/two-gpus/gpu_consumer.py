"""An engine's GPU consumer for perf/two-gpus/run.sh: the tensors of a layout file (perf/layouts format, as a TP1
engine holds them) on the GPU, kept up to date by the agent through the Python client's GpuConsumer (flip or
copy-in), each version checked on the GPU byte for byte against the synthetic version the sources send
(SyntheticModel in C#: tensor t of version v is SplitMix64 words from the seed XXH64("v/t")).

    python3 perf/two-gpus/gpu_consumer.py SOCKET WEIGHT_SET LAYOUT MODE

Prints "ready", then per switch "switch V SECONDS_SINCE_START ok|torn TENSOR", and at "stop" on stdin a summary
"summary switches=N torn=N served=V,V,..."; exits 3 if any version was torn.
"""

import json
import re
import sys
import threading
import time

import torch

sys.path.insert(0, "src/python")
from nccl_swap.gpu import GpuConsumer  # noqa: E402

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8, "U8": torch.uint8}
M = (1 << 64) - 1
P1, P2, P3, P4, P5 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5
GAMMA, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def expand(pattern: str):
    """The names a layout entry's {a..b} ranges stand for, the first range varying slowest (ModelLayout.Expand)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        yield pattern
        return
    for i in range(int(m.group(1)), int(m.group(2)) + 1):
        for rest in expand(pattern[m.end():]):
            yield pattern[:m.start()] + str(i) + rest


def tensors(path: str):
    with open(path) as f:
        for entry in json.load(f)["tensors"]:
            for name in expand(entry["name"]):
                yield name, entry["dtype"], tuple(entry["shape"])


def _rotl(x, r):
    return ((x << r) | (x >> (64 - r))) & M


def _round(acc, lane):
    return (_rotl((acc + lane * P2) & M, 31) * P1) & M


def xxh64(data: bytes) -> int:
    """XXH64 with seed 0."""
    n, i = len(data), 0
    word = lambda at, size: int.from_bytes(data[at:at + size], "little")  # noqa: E731
    if n >= 32:
        v = [(P1 + P2) & M, P2, 0, (-P1) & M]
        while i + 32 <= n:
            v = [_round(v[k], word(i + 8 * k, 8)) for k in range(4)]
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & M
        for lane in v:
            h = ((h ^ _round(0, lane)) * P1 + P4) & M
    else:
        h = P5
    h = (h + n) & M
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, word(i, 8)), 27) * P1 + P4) & M
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (word(i, 4) * P1 & M), 23) * P2 + P3) & M
        i += 4
    while i < n:
        h = (_rotl(h ^ (data[i] * P5 & M), 11) * P1) & M
        i += 1
    h ^= h >> 33
    h = (h * P2) & M
    h ^= h >> 29
    h = (h * P3) & M
    return h ^ (h >> 32)


def words_reference(version: int, name: str, count: int):
    """The first ``count`` SplitMix64 words of a tensor, in plain Python."""
    state, out = xxh64(f"{version}/{name}".encode()), []
    for _ in range(count):
        state = (state + GAMMA) & M
        z = state
        z = ((z ^ (z >> 30)) * MIX1) & M
        z = ((z ^ (z >> 27)) * MIX2) & M
        out.append(z ^ (z >> 31))
    return out


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _shift(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 words."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def words(version: int, name: str, count: int, device) -> torch.Tensor:
    """All SplitMix64 words of a tensor on the GPU (int64 arithmetic wraps as uint64 does)."""
    seed = xxh64(f"{version}/{name}".encode())
    z = torch.arange(1, count + 1, dtype=torch.int64, device=device) * _signed(GAMMA) + _signed(seed)
    z = (z ^ _shift(z, 30)) * _signed(MIX1)
    z = (z ^ _shift(z, 27)) * _signed(MIX2)
    return z ^ _shift(z, 31)


def holds(params, version: int):
    """None if every tensor is version ``version``'s, else the first that is not."""
    for name, t in params.items():
        raw = t.detach().contiguous().view(-1).view(torch.uint8)
        expected = words(version, name, (raw.numel() + 7) // 8, t.device).view(torch.uint8)[:raw.numel()]
        if not torch.equal(raw, expected):
            return name
    return None


def main(socket_path: str, weight_set: str, layout: str, mode: str) -> int:
    device = torch.device("cuda", 0)
    params = {name: torch.zeros(shape, dtype=DTYPES[dtype], device=device) for name, dtype, shape in tensors(layout)}
    first = next(iter(params))
    got = words(1, first, 8, device).cpu().tolist()
    assert [w & M for w in got] == words_reference(1, first, 8), "the GPU's SplitMix64 words differ from the reference"
    consumer = GpuConsumer(weight_set, params, mode, socket_path)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    start, served, torn = time.time(), [], 0
    while not stop.is_set():
        if consumer.step():
            torch.cuda.current_stream().synchronize()
            v = consumer.version
            bad = holds(consumer.parameters, v)
            served.append(v)
            torn += bad is not None
            print(f"switch {v} {time.time() - start:.3f} {'ok' if bad is None else 'torn ' + bad}", flush=True)
        time.sleep(0.001)
    print(f"summary switches={len(served)} torn={torn} served={','.join(map(str, served))}", flush=True)
    consumer.close()
    return 3 if torn else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))

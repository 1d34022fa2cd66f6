"""The two processes of the engine-in-the-loop test: a trainer that perturbs a transformers Llama and publishes each
step, and an engine that generates tokens continuously from its own copy through a GPU consumer.

    python -m tests.engine_peers trainer SOCKET FOLDER VERSIONS PAUSE_AFTER
    python -m tests.engine_peers engine SOCKET FOLDER MODE

Files in FOLDER coordinate them with the test: ref-V.json (the trainer's tokens and weight digest for version V,
written before V is published), trainer-paused (after PAUSE_AFTER versions, until the test writes resume),
engine-MODE.jsonl (one line per engine step), stop (the test ends the engine).
"""

import hashlib
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nccl_swap import ClosedError
from nccl_swap.gpu import GpuConsumer, GpuPublisher

PROMPT = [5, 17, 99, 3, 250, 42, 7, 311]
NEW_TOKENS = 12


def model(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()


@torch.no_grad()
def generate(m: LlamaForCausalLM) -> list:
    ids = torch.tensor([PROMPT], device="cuda")
    for _ in range(NEW_TOKENS):
        ids = torch.cat([ids, m(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(PROMPT):].tolist()


def digest(m: LlamaForCausalLM) -> str:
    h = hashlib.sha256()
    for name, p in sorted(m.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def trainer(socket_path: str, folder: str, versions: int, pause_after: int) -> None:
    m = model(0)
    params = dict(m.named_parameters())
    publisher = GpuPublisher("llama", params, socket_path)
    for version in range(1, versions + 1):
        if version == pause_after + 1:
            open(os.path.join(folder, "trainer-paused"), "w").close()
            while not os.path.exists(os.path.join(folder, "resume")):
                time.sleep(0.05)
        with torch.no_grad():
            g = torch.Generator(device="cuda").manual_seed(1000 + version)
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=g, device="cuda", dtype=torch.float32).to(p.dtype) * 0.05)
        with open(os.path.join(folder, f"ref-{version}.json.partial"), "w") as f:
            json.dump({"tokens": generate(m), "digest": digest(m)}, f)
        os.rename(os.path.join(folder, f"ref-{version}.json.partial"), os.path.join(folder, f"ref-{version}.json"))
        while True:
            try:
                publisher.publish(version, wait=True).check()
                break
            except (ClosedError, OSError):
                time.sleep(0.1)  # the agent is gone: wait for it to come back
                try:
                    publisher.reconnect()
                except OSError:
                    pass
        time.sleep(0.4)
    publisher.close()


def engine(socket_path: str, folder: str, mode: str) -> None:
    m = model(1)  # its own weights, different from the trainer's until the first version arrives
    consumer = GpuConsumer("llama", dict(m.named_parameters()), mode, socket_path)
    refs = {}
    served = 0
    with open(os.path.join(folder, f"engine-{mode}.jsonl"), "w") as out:
        step = 0
        while not os.path.exists(os.path.join(folder, "stop")):
            started = time.perf_counter()
            consumer.step()
            step_seconds = time.perf_counter() - started
            version = consumer.version
            record = {"step": step, "version": version, "step_us": step_seconds * 1e6, "sessions": consumer.sessions}
            try:
                tokens = generate(m)
            except Exception as e:  # a failed generation step is a failure of the test, reported, not hidden
                record["error"] = repr(e)
                tokens = None
            if version and version not in refs:
                with open(os.path.join(folder, f"ref-{version}.json")) as f:
                    refs[version] = json.load(f)
            if version:
                record["tokens_ok"] = tokens == refs[version]["tokens"]
                if version != served and consumer._pending is None:
                    record["bytes_ok"] = digest(m) == refs[version]["digest"]
                    served = version
            out.write(json.dumps(record) + "\n")
            out.flush()
            step += 1
    consumer.close()


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "trainer":
        trainer(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        engine(sys.argv[2], sys.argv[3], sys.argv[4])

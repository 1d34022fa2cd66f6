"""The GPU clients against a real agent process on the CUDA backend: a trainer's CUDA tensors published by IPC,
flip and copy-in consumers' own GPU memory written through the gate, bytes compared on the GPU.

Needs PyTorch with a GPU and the agent ($NCCL_SWAP_AGENT, or the Release build); skipped otherwise, saying why.
"""

import faulthandler
import os
import shutil
import tempfile
import time
import unittest

try:
    import torch
    GPU = torch.cuda.is_available()
except ImportError:
    GPU = False

from nccl_swap.local_agent import LocalAgent

from .test_agent import AGENT

REASON = "needs PyTorch with a CUDA GPU and the agent ($NCCL_SWAP_AGENT)"


def trainer_tensors(seed: int):
    """Llama-like tensors in allocations of their own, bf16 and f32, odd sizes, random (never zeros)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    shapes = {"embed.weight": (4096, 160), "layers.0.attn.q.weight": (64, 64), "layers.0.mlp.up.weight": (176, 64),
              "layers.0.norm.weight": (64,), "layers.1.attn.q.weight": (64, 64), "lm_head.weight": (4096, 160), "odd": (7, 3)}
    return {n: torch.randn(s, generator=g, device="cuda", dtype=torch.float32 if n.endswith("norm.weight") or n == "odd" else torch.bfloat16)
            for n, s in shapes.items()}


class AgentOnGpu(unittest.TestCase):
    """An agent process on the CUDA backend for each test, in a folder of its own."""

    def setUp(self):
        self.folder = tempfile.TemporaryDirectory(prefix="nccl-swap-gpu-")
        faulthandler.dump_traceback_later(240, exit=True)  # a hang shows where it is, and ends
        self.agent = LocalAgent(AGENT, self.folder.name, Backend="cuda", UpdatePolicy="queue")
        self.socket = self.agent.socket

    def agent_log(self):
        return self.agent.log()

    def tearDown(self):
        faulthandler.cancel_dump_traceback_later()
        self.agent.stop()
        logs = os.environ.get("NCCL_SWAP_TEST_LOGS")  # keep the agent's log of each test there
        if logs:
            os.makedirs(logs, exist_ok=True)
            shutil.copy(self.agent.log_path, os.path.join(logs, f"{self.id().split('.')[-1]}.agent.log"))
        self.folder.cleanup()

    def step_until(self, consumer, version, timeout=30.0):
        deadline = time.monotonic() + timeout
        while consumer.version != version or consumer._pending is not None:
            consumer.step()
            if time.monotonic() > deadline:
                self.fail(f"the {consumer.mode} consumer serves {consumer.version}, not {version} ({consumer.last_error}); agent: {self.agent_log()}")
            time.sleep(0.0005)


@unittest.skipIf(not GPU or AGENT is None, REASON)
class GpuClientTest(AgentOnGpu):
    def test_every_version_reaches_flip_and_copy_in_consumers_byte_exact_on_the_gpu(self):
        from nccl_swap import COPY_IN, FLIP, connect
        from nccl_swap.gpu import GpuConsumer, GpuPublisher

        trainer = trainer_tensors(1)
        flip_params = {n: torch.nn.Parameter(torch.zeros_like(t), requires_grad=False) for n, t in trainer.items()}
        copy_params = {n: torch.full_like(t, 3) for n, t in trainer.items()}
        with GpuPublisher("llama", trainer, self.socket, timeout=20) as publisher, \
                GpuConsumer("llama", flip_params, FLIP, self.socket, timeout=20) as flip, \
                GpuConsumer("llama", copy_params, COPY_IN, self.socket, timeout=20) as copy_in:
            self.assertGreater(len(publisher.region.segments), 1, "the trainer's tensors should span several allocations")
            for version in range(1, 6):
                fresh = trainer_tensors(100 + version)
                for name, t in trainer.items():
                    t.copy_(fresh[name])
                expected = {n: t.clone() for n, t in trainer.items()}
                publisher.publish(version, wait=True).check()
                for name, t in trainer.items():
                    t.normal_()  # the trainer goes on: the consumers must get the published bytes, not these
                self.step_until(flip, version)
                self.step_until(copy_in, version)
                for name, want in expected.items():
                    self.assertTrue(torch.equal(flip_params[name].view(torch.uint8), want.view(torch.uint8)), f"flip, version {version}, tensor {name}")
                    self.assertTrue(torch.equal(copy_params[name].view(torch.uint8), want.view(torch.uint8)), f"copy-in, version {version}, tensor {name}")
            self.assertEqual(flip.switches, 5)
            self.assertGreaterEqual(copy_in.switches, 5)
            with connect("operator", "llama", self.socket) as operator:
                status = operator.call(operator.request(5)).check()
            self.assertIn("staging GPU", status.detail)
            self.assertIn("staging in GPU memory", self.agent_log())

    def test_a_killed_agent_leaves_gpu_consumers_serving_and_a_restarted_one_brings_the_next_version(self):
        from nccl_swap import COPY_IN, FLIP
        from nccl_swap.gpu import GpuConsumer, GpuPublisher

        trainer = trainer_tensors(2)
        flip_params = {n: torch.nn.Parameter(torch.zeros_like(t), requires_grad=False) for n, t in trainer.items()}
        copy_params = {n: torch.full_like(t, 3) for n, t in trainer.items()}
        with GpuPublisher("llama", trainer, self.socket, timeout=20) as publisher, \
                GpuConsumer("llama", flip_params, FLIP, self.socket, timeout=20) as flip, \
                GpuConsumer("llama", copy_params, COPY_IN, self.socket, timeout=20) as copy_in:
            publisher.publish(1, wait=True).check()
            self.step_until(flip, 1)
            self.step_until(copy_in, 1)
            v1 = {n: t.clone() for n, t in trainer.items()}
            self.agent.kill()
            for _ in range(200):  # the engines go on: their weights are their own
                flip.step()
                copy_in.step()
            for name, want in v1.items():
                self.assertTrue(torch.equal(flip_params[name].view(torch.uint8), want.view(torch.uint8)), f"flip after the kill, tensor {name}")
                self.assertTrue(torch.equal(copy_params[name].view(torch.uint8), want.view(torch.uint8)), f"copy-in after the kill, tensor {name}")
            self.assertEqual((flip.version, copy_in.version), (1, 1))
            self.agent.start()
            deadline = time.monotonic() + 30
            while True:
                try:
                    publisher.reconnect()
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        self.fail(f"the publisher cannot reconnect: {e}; agent: {self.agent_log()}")
                    time.sleep(0.1)
            for name, t in trainer.items():
                t.copy_(trainer_tensors(7)[name])
            v2 = {n: t.clone() for n, t in trainer.items()}
            publisher.publish(2, wait=True).check()
            self.step_until(flip, 2)
            self.step_until(copy_in, 2)
            for name, want in v2.items():
                self.assertTrue(torch.equal(flip_params[name].view(torch.uint8), want.view(torch.uint8)), f"flip after the restart, tensor {name}")
                self.assertTrue(torch.equal(copy_params[name].view(torch.uint8), want.view(torch.uint8)), f"copy-in after the restart, tensor {name}")
            self.assertGreaterEqual(flip.sessions, 2)

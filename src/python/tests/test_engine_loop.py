"""A real engine in the loop: a transformers Llama (random weights, no downloads) perturbed and published by a
trainer process each step, and two engine processes (flip, copy-in) generating tokens continuously from their own
GPU copies. The agent is killed (SIGKILL) while they generate, and restarted.

Needs PyTorch with a GPU, transformers and the agent; skipped otherwise, saying why.
"""

import json
import os
import statistics
import subprocess
import sys
import time
import unittest

from .test_agent import AGENT
from .test_gpu import GPU, REASON, AgentOnGpu

try:
    import transformers  # noqa: F401
    TRANSFORMERS = True
except ImportError:
    TRANSFORMERS = False

HERE = os.path.dirname(os.path.abspath(__file__))
VERSIONS, PAUSE_AFTER = 6, 3


@unittest.skipIf(not GPU or not TRANSFORMERS or AGENT is None, REASON + " and transformers")
class EngineLoopTest(AgentOnGpu):
    def peer(self, *args):
        with open(os.path.join(self.folder.name, "peers.log"), "ab") as log:  # the child keeps its own descriptor
            return subprocess.Popen([sys.executable, "-m", "tests.engine_peers", *args], cwd=os.path.dirname(HERE),
                                    stdout=log, stderr=subprocess.STDOUT)

    def records(self, mode):
        path = os.path.join(self.folder.name, f"engine-{mode}.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def wait_for(self, condition, what, timeout=120):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"{what} did not happen in {timeout} s; agent: {self.agent_log()[-3000:]}")
            time.sleep(0.05)

    def test_generation_follows_every_version_exactly_and_survives_the_agent_being_killed(self):
        folder = self.folder.name
        engines = {mode: self.peer("engine", self.socket, folder, mode) for mode in ("flip", "copy-in")}
        self.wait_for(lambda: all(self.records(m) for m in engines), "both engines generating")
        trainer = self.peer("trainer", self.socket, folder, str(VERSIONS), str(PAUSE_AFTER))
        try:
            self.wait_for(lambda: os.path.exists(os.path.join(folder, "trainer-paused"))
                          and all(any(r["version"] == PAUSE_AFTER for r in self.records(m)) for m in engines), f"both engines on version {PAUSE_AFTER}")
            self.agent.kill()
            killed = {m: len(self.records(m)) for m in engines}
            time.sleep(3)  # the engines go on generating with no agent
            during = {m: self.records(m)[killed[m]:] for m in engines}
            self.agent.start()
            open(os.path.join(folder, "resume"), "w").close()
            self.wait_for(lambda: all(any(r["version"] == VERSIONS for r in self.records(m)) for m in engines), f"both engines on version {VERSIONS}")
            self.assertEqual(trainer.wait(60), 0, "the trainer failed")
        finally:
            open(os.path.join(folder, "stop"), "w").close()
            for process in [*engines.values(), trainer]:
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
        for mode, process in engines.items():
            self.assertEqual(process.returncode, 0, f"the {mode} engine failed")
            records = self.records(mode)
            served = [r["version"] for r in records if r["version"]]
            versions = [v for i, v in enumerate(served) if i == 0 or v != served[i - 1]]
            self.assertEqual(versions, list(range(versions[0], VERSIONS + 1)), f"{mode}: versions served in order")
            self.assertFalse([r for r in records if "error" in r], f"{mode}: a generation step failed")
            wrong = [r for r in records if r["version"] and not r["tokens_ok"]]
            self.assertFalse(wrong, f"{mode}: steps whose tokens are not the trainer's for the version served: {wrong[:3]}")
            checked = [r for r in records if "bytes_ok" in r]
            self.assertTrue(all(r["bytes_ok"] for r in checked), f"{mode}: weights differ from the trainer's: {checked}")
            self.assertGreaterEqual(len(checked), VERSIONS - versions[0] + 1, f"{mode}: every version's bytes checked")
            self.assertTrue(during[mode] and all(r["version"] == PAUSE_AFTER and r["tokens_ok"] for r in during[mode]),
                            f"{mode}: with the agent dead, generation went on with version {PAUSE_AFTER}")
            steps = sorted(r["step_us"] for r in records)
            print(f"\n{mode}: {len(records)} generation steps, {len(during[mode])} while the agent was dead; versions {versions}; "
                  f"step() host time p50 {statistics.median(steps):.1f} µs, p99 {steps[int(0.99 * (len(steps) - 1))]:.1f} µs, max {steps[-1]:.1f} µs; "
                  f"sessions {records[-1]['sessions']}", file=sys.stderr)

"""The Python publisher and consumers against a real agent process (``nccl-swap serve``, host backend).

The agent is the executable named by $NCCL_SWAP_AGENT (``./build.sh test`` sets it to the one it built), or the
one a Release build leaves in src/NcclSwap.Agent; without either, these tests are skipped, saying why.
"""

import os
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

from nccl_swap import COPY_IN, FLIP, AgentError, Consumer, Publisher, RefusedError, Status, connect, pack_state, RequestKind
from nccl_swap.local_agent import LocalAgent

from . import synthetic

HERE = os.path.dirname(os.path.abspath(__file__))
BUILT = os.path.join(HERE, "..", "..", "NcclSwap.Agent", "bin", "Release", "net10.0", "linux-x64", "nccl-swap")
AGENT = os.environ.get("NCCL_SWAP_AGENT") or (BUILT if os.path.exists(BUILT) else None)


@unittest.skipIf(AGENT is None, "needs the agent: run ./build.sh test, or set NCCL_SWAP_AGENT to an nccl-swap executable")
class AgentTest(unittest.TestCase):
    def setUp(self):
        self.folder = tempfile.TemporaryDirectory(prefix="nccl-swap-py-")
        self.agent = LocalAgent(AGENT, self.folder.name, Backend="host", UpdatePolicy="queue")
        self.socket = self.agent.socket

    def agent_log(self):
        return self.agent.log()

    def tearDown(self):
        self.agent.stop()
        self.folder.cleanup()

    def step_until(self, consumer, version, timeout=30.0):
        deadline = time.monotonic() + timeout
        while consumer.version != version:
            consumer.step()
            if time.monotonic() > deadline:
                self.fail(f"the {consumer.mode} consumer serves {consumer.version}, not {version} ({consumer.last_error}); agent: {self.agent_log()}")
            time.sleep(0.001)

    def test_versions_reach_flip_and_copy_in_consumers_intact_and_rollback_restores_the_previous_bytes(self):
        layout = synthetic.layout()
        with Publisher("llama", layout, self.socket) as publisher, Consumer("llama", layout, FLIP, self.socket) as flip, \
                Consumer("llama", layout, COPY_IN, self.socket) as copy_in, connect("operator", "llama", self.socket) as operator:
            self.assertEqual(flip.version, 0)
            self.assertFalse(flip.step())  # nothing published yet
            for version in range(1, 6):
                synthetic.fill(publisher.region, version)
                response = publisher.publish(version, wait=True).check()
                self.assertEqual(response.version >> 8, version)
                self.step_until(flip, version)
                self.step_until(copy_in, version)
                self.assertTrue(synthetic.holds(flip.weights(), version))
                self.assertTrue(synthetic.holds(copy_in.weights(), version))
            self.assertEqual(flip.switches, 5)

            rollback = operator.call(operator.request(RequestKind.ROLLBACK)).check()
            self.assertEqual(rollback.version, pack_state(4, 1))  # version 4 again, in the slot version 5 did not use (5 went to slot 0)
            self.step_until(flip, 4)
            self.step_until(copy_in, 4)
            self.assertTrue(synthetic.holds(flip.weights(), 4))
            self.assertTrue(synthetic.holds(copy_in.weights(), 4))
            again = operator.call(operator.request(RequestKind.ROLLBACK))
            self.assertEqual(again.status, Status.E_NOT_FOUND)
            self.assertIn("no last good version", again.detail)

            stale = publisher.publish(5)
            self.assertEqual(stale.status, Status.E_STALE)
            with self.assertRaisesRegex(AgentError, "e_stale: version 3 is not newer than 5"):
                publisher.publish(3).check()
            refused = operator.call(operator.request(RequestKind.PUBLISH, 9))
            self.assertEqual(refused.status, Status.E_NOT_PERMITTED)
            self.assertEqual(flip.version, 4)

    def test_a_registration_that_does_not_match_the_weight_set_is_refused_naming_the_tensor(self):
        layout = synthetic.layout()
        with Publisher("llama", layout, self.socket):
            other = synthetic.tensors()
            other[0] = (other[0][0], "F32", other[0][2])
            with self.assertRaisesRegex(RefusedError, f"tensor '{other[0][0]}' is F32, not BF16"):
                Consumer("llama", synthetic.Layout.packed(other), FLIP, self.socket)
            with self.assertRaisesRegex(RefusedError, "already has a publisher"):
                Publisher("llama", layout, self.socket)

    def test_a_consumer_process_reading_without_pause_never_sees_a_torn_version(self):
        layout = synthetic.layout()
        reader = textwrap.dedent(f"""
            import sys, time
            sys.path[:0] = [{os.path.dirname(HERE)!r}]
            from nccl_swap import Consumer
            from tests import synthetic
            consumer = Consumer("llama", synthetic.layout(), sys.argv[1], {self.socket!r})
            print("ready", flush=True)
            torn = reads = 0
            seen = []
            while consumer.version != 40:
                if consumer.step():
                    seen.append(consumer.version)
                if consumer.version:
                    reads += 1
                    if not synthetic.holds(consumer.weights(), consumer.version):
                        torn += 1
            print("seen", *seen, flush=True)
            print("reads", reads, "torn", torn, flush=True)
            consumer.close()
            """)
        readers = [subprocess.Popen([sys.executable, "-c", reader, mode], stdout=subprocess.PIPE, text=True) for mode in (FLIP, COPY_IN)]
        for r in readers:
            self.assertEqual(r.stdout.readline().strip(), "ready")
        with Publisher("llama", layout, self.socket) as publisher:
            for version in range(1, 41):
                synthetic.fill(publisher.region, version)
                publisher.publish(version).check()
        for r, mode in zip(readers, (FLIP, COPY_IN)):
            out, _ = r.communicate(timeout=120)
            self.assertEqual(r.returncode, 0, out)
            lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
            seen = [int(v) for v in lines["seen"].split()]
            self.assertEqual(seen, sorted(set(seen)), f"{mode}: versions went back or repeated")
            self.assertEqual(seen[-1], 40)
            self.assertTrue(lines["reads"].endswith(" torn 0"), f"{mode}: {lines['reads']}")

    def test_a_killed_agent_leaves_consumers_on_their_version_and_they_rejoin_the_restarted_one(self):
        layout = synthetic.layout()
        publisher = Publisher("llama", layout, self.socket)
        flip = Consumer("llama", layout, FLIP, self.socket)
        try:
            synthetic.fill(publisher.region, 1)
            publisher.publish(1, wait=True).check()
            self.step_until(flip, 1)
            self.agent.kill()
            self.assertFalse(flip.step())
            self.assertTrue(synthetic.holds(flip.weights(), 1))  # its own memory: untouched by the agent's death

            self.agent.start()
            deadline = time.monotonic() + 30
            while flip.sessions < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertEqual(flip.sessions, 2, flip.last_error)
            publisher.reconnect()
            synthetic.fill(publisher.region, 2)
            publisher.publish(2, wait=True).check()
            self.step_until(flip, 2)
            self.assertTrue(synthetic.holds(flip.weights(), 2))
            self.assertIn("recovered active version 1", self.agent_log())
        finally:
            flip.close()
            publisher.close()


if __name__ == "__main__":
    unittest.main()

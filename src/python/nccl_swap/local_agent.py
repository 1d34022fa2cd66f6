"""An agent process (``nccl-swap serve``) in a folder of its own, for tests, benchmarks and trying things out."""

import os
import signal
import socket
import subprocess
import time
from typing import Optional


class LocalAgent:
    """Starts ``executable serve`` with its socket, state and log in ``folder`` (staging too, unless
    ``staging`` names another directory), every role for this uid, and ``settings`` (``Backend``,
    ``UpdatePolicy``, …) as its ``NCCL_SWAP_Agent__*`` environment; waits until it listens.
    """

    def __init__(self, executable: str, folder: str, staging: Optional[str] = None, timeout: float = 60.0, **settings: str):
        self.executable = executable
        self.folder = folder
        self.socket = os.path.join(folder, "agent.sock")
        self.log_path = os.path.join(folder, "agent.log")
        self.env = dict(os.environ)
        self.env.update({
            "NCCL_SWAP_Agent__SocketPath": self.socket,
            "NCCL_SWAP_Agent__StateDirectory": os.path.join(folder, "state"),
            "NCCL_SWAP_Agent__StagingDirectory": staging or os.path.join(folder, "staging"),
            f"NCCL_SWAP_Agent__Roles__Users__{os.getuid()}": "publisher,consumer,operator",
        })
        self.env.update({f"NCCL_SWAP_Agent__{key}": str(value) for key, value in settings.items()})
        self.timeout = timeout
        self.process: Optional[subprocess.Popen] = None
        self._log = None
        self.start()

    def start(self) -> None:
        """Starts it (again, on the same folder: a restart) and waits until it listens; raises with its log if not."""
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([self.executable, "serve"], env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(self.socket)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the agent did not start: {self.log()[-4000:]}") from None
                time.sleep(0.05)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        """SIGTERM (a clean stop), if it still runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        if self._log is not None:
            self._log.close()
            self._log = None

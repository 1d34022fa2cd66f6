"""The inference engine's side: its own weights (two slots, or one set of buffers), one check per step."""

import threading
import time
from typing import List, Optional

from . import abi
from .channel import DEFAULT_SOCKET, AgentError, ClosedError, RefusedError, Session, connect
from .layout import Layout
from .region import WeightRegion
from .version_table import unpack_state

FLIP = "flip"
COPY_IN = "copy-in"


class Consumer:
    """A consumer of weight set ``weight_set`` in ``mode`` "flip" (slots A and B of its own; the agent fills the one
    not in use and the consumer switches) or "copy-in" (one set of buffers; the agent copies a new version in while
    the consumer does not read).

    Call :meth:`step` at every step boundary: when nothing is new it is one load of the version table. Then read
    :meth:`weights`. If the agent goes away the consumer keeps serving what it has and stops following the table;
    a watcher thread reconnects, telling the new agent what it serves. A copy-in interrupted by the agent's death
    leaves the buffers unknown: :attr:`serving` is then 0 and the engine must not read them until the next step
    that brings a version.
    """

    def __init__(self, weight_set: str, layout: Layout, mode: str = FLIP, socket_path: str = DEFAULT_SOCKET, timeout: float = 120.0):
        if mode not in (FLIP, COPY_IN):
            raise ValueError(f"mode '{mode}' is not {FLIP} or {COPY_IN}")
        self.weight_set = weight_set
        self.mode = mode
        self.socket_path = socket_path
        self.timeout = timeout
        names = ["slot0", "slot1"] if mode == FLIP else ["weights"]
        self.regions: List[WeightRegion] = []
        try:
            for name in names:
                self.regions.append(WeightRegion(name, layout))
            self.session: Session = self._register(0)
        except BaseException:
            for region in self.regions:
                region.close()
            raise
        self.serving = 0
        self.switches = 0
        self.sessions = 1
        self.last_pause = 0.0
        self.last_error: Optional[str] = None
        self._gate = threading.Lock()
        self._closed = False
        self._retired: List[Session] = []  # the engine's thread may still be reading their tables
        self._watcher = threading.Thread(target=self._watch, name=f"nccl-swap consumer of {weight_set}", daemon=True)
        self._watcher.start()

    @property
    def layout(self) -> Layout:
        return self.regions[0].layout

    @property
    def version(self) -> int:
        return unpack_state(self.serving)[0]

    def weights(self) -> WeightRegion:
        """The region to read for the version served (flip: the slot the state names)."""
        return self.regions[unpack_state(self.serving)[1]] if self.mode == FLIP else self.regions[0]

    def tensor(self, name: str) -> memoryview:
        return self.weights().tensor(name)

    def _register(self, serving: int) -> Session:
        return connect("consumer", self.weight_set, self.socket_path, self.timeout, self.regions[0].layout, self.regions, self.mode, serving)

    def step(self) -> bool:
        """The per-step check; True when the weights now hold a different version than before the call."""
        session = self.session
        state = session.table.target(session.row, session.lane)
        if state == self.serving or state == 0:
            return False
        return self._switch(session, state)

    def _switch(self, session: Session, state: int) -> bool:
        with self._gate:
            if session is not self.session or not session.alive():
                return False  # the watcher reconnects; until then, keep serving what we have
            started = time.perf_counter()
            session.drain()
            before = self.serving
            if self.mode == FLIP:
                self.serving = state
                session.send(session.request(abi.RequestKind.ACK, state))
            else:
                try:
                    response = session.call(session.request(abi.RequestKind.COPY_IN), self.timeout)
                    if response.status == abi.Status.OK:
                        self.serving = response.version
                    else:
                        self.last_error = f"copy-in: {AgentError(response.status, response.detail)}"
                        if response.status == abi.Status.E_CORRUPT:
                            self.serving = 0  # the agent wrote, and what it wrote is wrong
                except (ClosedError, TimeoutError) as e:
                    self.last_error = f"copy-in: {e}"
                    self.serving = 0  # the copy may have stopped half way
            if self.serving == before:
                return False
            self.last_pause = time.perf_counter() - started
            self.switches += 1
            return True

    def _watch(self) -> None:
        while not self._closed:
            self.session.wait_until_closed()
            while not self._closed:
                time.sleep(0.1)
                try:
                    with self._gate:
                        if self._closed:
                            return
                        fresh = self._register(self.serving)
                        self._retired.append(self.session)
                        self.session = fresh
                        self.sessions += 1
                    break
                except (RefusedError, OSError, ValueError) as e:
                    self.last_error = f"reconnecting: {e}"

    def close(self) -> None:
        with self._gate:
            self._closed = True
            self.session.close()  # ends the watcher's wait
        self._watcher.join()
        for session in self._retired:
            session.close()
        for region in self.regions:
            region.close()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

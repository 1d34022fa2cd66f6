"""Connecting to the agent: the front-door handshake, then the session's rings and the version table."""

import itertools
import json
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from . import abi
from .layout import Layout
from .region import WeightRegion
from .ring import SharedRing
from .version_table import VersionTable

DEFAULT_SOCKET = "/run/nccl-swap/agent.sock"
_ONE = (1).to_bytes(8, "little")


class RefusedError(Exception):
    """The agent refused the connection; the message says why (role, identity, registration, malformed hello)."""


class ClosedError(ConnectionError):
    """The agent closed the session (it stopped, died, or ended the lease) while a request waited."""


class AgentError(Exception):
    """The agent answered a request with an error status; ``status`` is the code, the message its reason."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{_status_name(status)}: {detail}")
        self.status = status
        self.detail = detail


def _status_name(status: int) -> str:
    try:
        return abi.Status(status).name.lower()
    except ValueError:
        return f"status {status}"


@dataclass
class Response:
    """An answer of the agent: status (0 or a negative errno), the request's id, a version or state word, a detail text."""

    status: int
    id: int
    version: int
    detail: str

    @classmethod
    def parse(cls, raw: bytes) -> "Response":
        r = abi.Response.from_buffer_copy(raw)
        return cls(r.status, r.id, r.version, bytes(r.detail)[:min(r.detail_bytes, abi.PAYLOAD_BYTES)].decode("utf-8", "replace"))

    def check(self) -> "Response":
        """Itself if the status is 0, else raises :class:`AgentError`."""
        if self.status != abi.Status.OK:
            raise AgentError(self.status, self.detail)
        return self


@dataclass
class Session:
    """A connected client: its id and role, the version table, its private request and response rings, and
    (from an agent) its weight set's row and the active state when it was accepted.

    Keep it open for as long as the client works: the socket is the lease, and closing it ends the session.
    """

    id: int
    role: str
    table: VersionTable
    requests: SharedRing
    responses: SharedRing
    _socket: socket.socket
    _bell: int = -1
    row: int = -1
    state: int = 0
    lane: int = -1
    _ids: "itertools.count" = field(default_factory=lambda: itertools.count(1))

    def request(self, kind: abi.RequestKind, version: int = 0, flags: int = 0) -> bytes:
        """A request entry of this session: a fresh id, this session's row."""
        return bytes(abi.Request(magic=abi.REQUEST_MAGIC, kind=kind, flags=flags, id=next(self._ids), version=version, weight_set=max(self.row, 0)))

    def send(self, entry: bytes, timeout: float = 1.0) -> bool:
        """Writes a request without waiting for its answer (which :meth:`drain` later drops), and rings the agent's bell.

        Python cannot fence between the ring's head and the dispatcher's announcement of its sleep, so it rings the
        bell after every request (one system call) rather than only when the dispatcher sleeps.
        """
        if not self.requests.write(entry, timeout):
            return False
        if self._bell >= 0:
            try:
                os.write(self._bell, _ONE)
            except BlockingIOError:
                pass  # the counter is full: it is rung all the same
        return True

    def call(self, entry: bytes, timeout: float = 60.0) -> Response:
        """Sends a request and waits for its response; others that come first are dropped.

        Raises :class:`ClosedError` if the agent goes away meanwhile, :class:`TimeoutError` after ``timeout`` s.
        """
        wanted = abi.Request.from_buffer_copy(entry).id
        deadline = time.monotonic() + timeout
        while not self.send(entry, 0.05):
            self._check(deadline)
        while True:
            raw = self.responses.read(0.05)
            if raw is not None:
                response = Response.parse(raw)
                if response.id == wanted:
                    return response
                continue
            self._check(deadline)

    def drain(self) -> None:
        """Drops responses nobody waits for (answers to acknowledgements), so the ring never fills."""
        while self.responses.try_read() is not None:
            pass

    def alive(self) -> bool:
        """False once the agent has closed the session (a poll of the socket: a system call, not for every step)."""
        try:
            readable, _, _ = select.select([self._socket], [], [], 0)
            return not readable or self._socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (OSError, ValueError):
            return False

    def wait_until_closed(self) -> None:
        """Blocks until the agent closes the session (or this client closes it)."""
        try:
            while self._socket.recv(64):
                pass
        except (OSError, ValueError):
            pass

    def _check(self, deadline: float) -> None:
        if not self.alive():
            raise ClosedError(f"the agent closed session {self.id}")
        if time.monotonic() > deadline:
            raise TimeoutError("no answer from the agent in time")

    def close(self) -> None:
        if self._bell >= 0:
            os.close(self._bell)
            self._bell = -1
        self.requests.close()
        self.responses.close()
        self.table.close()
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(role: str, weight_set: str, socket_path: str = DEFAULT_SOCKET, timeout: float = 10.0,
            layout: Optional[Layout] = None, regions: Sequence[WeightRegion] = (), mode: Optional[str] = None,
            serving: int = 0) -> Session:
    """Opens a session as ``role`` ("publisher", "consumer" or "operator") for ``weight_set``.

    A publisher or consumer registers where its tensors lie (``layout``) and the regions holding them (a
    publisher one, a flip consumer two slots, a copy-in consumer one): shared memory, passed to the agent as
    descriptors, or GPU memory (:class:`nccl_swap.gpu.CudaRegion`, by CUDA IPC handle), then a GPU consumer's gate;
    ``mode`` is "flip" or "copy-in"; ``serving`` the state word the consumer serves already (0: none).
    """
    hello = {"role": role, "weight_set": weight_set}
    # A region with a descriptor (shared memory) is named; a GPU region says where its allocations are itself.
    shared = [r for r in regions if hasattr(r, "fd")]
    if layout is not None:
        hello.update(tensors=layout.to_json(), regions=[r.name if hasattr(r, "fd") else r.to_json() for r in regions], serving=serving)
        if mode is not None:
            hello["mode"] = mode
    data = json.dumps(hello).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        # The descriptors ride on the first bytes; the rest of a long hello follows.
        sent = socket.send_fds(sock, [data], [r.fd for r in shared]) if shared else 0
        sock.sendall(data[sent:])
        # One line of JSON; on success it carries the table's and the rings' descriptors (SCM_RIGHTS).
        reply, fds, _, _ = socket.recv_fds(sock, 65536, 8)
        try:
            if not reply:
                raise RefusedError(f"{socket_path}: the agent closed the connection without an answer")
            answer = json.loads(reply)
            if not answer.get("ok"):
                raise RefusedError(f"{socket_path}: {answer.get('error')}")
            if answer.get("descriptors") != ["table", "requests", "responses", "bell"] or len(fds) != 4:
                raise RefusedError(f"{socket_path}: expected the table, two rings and the bell, got {len(fds)} descriptors")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        sock.settimeout(None)
        table, requests, responses, bell = fds
        return Session(answer["session"], answer["role"], VersionTable(table), SharedRing(requests), SharedRing(responses), sock,
                       bell, answer.get("row", -1), answer.get("state", 0), answer.get("lane", -1))
    except BaseException:
        sock.close()
        raise

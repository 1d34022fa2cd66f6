"""Connecting to the agent: the front-door handshake, then the session's rings and the version table."""

import json
import os
import socket
from dataclasses import dataclass

from .ring import SharedRing
from .version_table import VersionTable

DEFAULT_SOCKET = "/run/nccl-swap/agent.sock"


class RefusedError(Exception):
    """The agent refused the connection; the message says why (role, identity, malformed hello)."""


@dataclass
class Session:
    """A connected client: its id and role, the version table, and its private request and response rings.

    Keep it open for as long as the client works: the socket is the lease, and closing it ends the session.
    """

    id: int
    role: str
    table: VersionTable
    requests: SharedRing
    responses: SharedRing
    _socket: socket.socket

    def close(self) -> None:
        self.requests.close()
        self.responses.close()
        self.table.close()
        self._socket.close()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(role: str, weight_set: str, socket_path: str = DEFAULT_SOCKET, timeout: float = 10.0) -> Session:
    """Opens a session as ``role`` ("publisher", "consumer" or "operator") for ``weight_set``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(json.dumps({"role": role, "weight_set": weight_set}).encode() + b"\n")
        # One line of JSON; on success it carries the table's and the rings' descriptors (SCM_RIGHTS).
        reply, fds, _, _ = socket.recv_fds(sock, 4096, 8)
        try:
            if not reply:
                raise RefusedError(f"{socket_path}: the agent closed the connection without an answer")
            answer = json.loads(reply)
            if not answer.get("ok"):
                raise RefusedError(f"{socket_path}: {answer.get('error')}")
            if answer.get("descriptors") != ["table", "requests", "responses"] or len(fds) != 3:
                raise RefusedError(f"{socket_path}: expected the table and two rings, got {len(fds)} descriptors")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        sock.settimeout(None)
        table, requests, responses = fds
        return Session(answer["session"], answer["role"], VersionTable(table), SharedRing(requests), SharedRing(responses), sock)
    except BaseException:
        sock.close()
        raise

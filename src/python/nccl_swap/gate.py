"""A GPU consumer's gate (nccl_swap_gate): a page of shared memory whose words its stream and the agent's stream
write and wait on, so that neither host thread waits for the other."""

import ctypes
import fcntl
import mmap
import os
from typing import Optional

from . import abi, cuda

NAME = "gate"


class Gate:
    """The page, sent last with a GPU consumer's hello, and registered with the driver so streams reach its words.

    Copy-in N: :meth:`quiesce_then_wait` puts on the engine's stream "write quiesced = N, then wait until done >= N";
    the agent's stream waits for quiesced, copies, writes done. Flip: :meth:`passed` puts "write passed = state" on
    the engine's stream after it switched slots. If the agent dies, :meth:`release` writes done from the CPU so that
    the engine's stream never waits forever.
    """

    def __init__(self):
        self.name = NAME
        self.length = mmap.PAGESIZE
        self.fd = os.memfd_create("nccl-swap-gate", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._map: Optional[mmap.mmap] = None
        self._registered = False
        try:
            os.ftruncate(self.fd, self.length)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self._map = mmap.mmap(self.fd, self.length)
            self.words = abi.Gate.from_buffer(self._map)
            self._host = ctypes.addressof(self.words)
            self._device = cuda.host_register(self._host, self.length, "the consumer's gate")
            self._registered = True
        except BaseException:
            self.close()
            raise

    def _at(self, field: str) -> int:
        return self._device + getattr(abi.Gate, field).offset

    def quiesce_then_wait(self, stream: int, sequence: int) -> None:
        """Copy-in ``sequence``: the stream says it no longer reads its weights, then waits for the agent's copy."""
        cuda.stream_write_value(stream, self._at("quiesced"), sequence, "gate: quiesced")
        cuda.stream_wait_value(stream, self._at("done"), sequence, "gate: wait for done")

    def passed(self, stream: int, state: int) -> None:
        """Flip: once the stream's work so far is done, the old slot is no longer read."""
        cuda.stream_write_value(stream, self._at("passed"), state & 0xFFFFFFFF, "gate: passed")

    def done(self, sequence: int) -> bool:
        """Whether the agent's copy ``sequence`` has completed (its stream wrote done)."""
        return ((self.words.done - sequence) & 0xFFFFFFFF) < 0x80000000

    def release(self, sequence: int) -> None:
        """Writes done = ``sequence`` from the CPU (the agent will not): the engine's stream goes on."""
        if not self.done(sequence):
            self.words.done = sequence & 0xFFFFFFFF

    def close(self) -> None:
        if self._registered:
            cuda.host_unregister(self._host, "the consumer's gate")
            self._registered = False
        if self._map is not None:
            self.words = None
            self._map.close()
            self._map = None
            os.close(self.fd)

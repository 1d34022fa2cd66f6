"""A single-producer single-consumer ring in shared memory (nccl_swap_ring_header), the client's end.

Entries are fixed-size byte strings. Writes publish the entry before the head, reads take the entry before
advancing the tail, which x86-64's store order makes safe from Python. Python has no atomic
read-modify-write, so this side never registers as a sleeper: it waits by polling with short sleeps, and
after every step it changes the doorbell word and wakes whoever sleeps on it (the agent side).
"""

import ctypes
import time
from typing import Optional, Union

from . import abi
from ._shm import map_region

_HEADER = ctypes.sizeof(abi.RingHeader)
_SYS_FUTEX = 202  # x86-64
_FUTEX_WAKE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SharedRing:
    """A ring mapped from a file path, or from a descriptor received from the agent (which it then owns)."""

    def __init__(self, source: Union[str, int]):
        self._map, self.path = map_region(source, writable=True)
        path = self.path
        if len(self._map) < _HEADER:
            raise ValueError(f"{path}: {len(self._map)} bytes is too small for a ring header ({_HEADER})")
        self._header = abi.RingHeader.from_buffer(self._map)
        h = self._header
        if h.magic != abi.RING_MAGIC:
            raise ValueError(f"{path}: not an nccl-swap ring (magic 0x{h.magic:016x})")
        if h.abi_version != abi.ABI_VERSION:
            raise ValueError(f"{path}: ABI version {h.abi_version}, this client speaks {abi.ABI_VERSION}")
        if h.capacity == 0 or h.capacity & (h.capacity - 1) or h.entry_bytes % 8 or len(self._map) < _HEADER + h.capacity * h.entry_bytes:
            raise ValueError(f"{path}: capacity {h.capacity} x {h.entry_bytes} bytes does not fit its {len(self._map)}-byte file")
        self.capacity = h.capacity
        self.entry_bytes = h.entry_bytes
        self._doorbell_address = ctypes.addressof(self._header) + abi.RingHeader.doorbell.offset

    def _slot(self, index: int) -> int:
        return _HEADER + (index & (self.capacity - 1)) * self.entry_bytes

    def try_write(self, entry: bytes) -> bool:
        """Appends ``entry`` unless the ring is full (producer side)."""
        self._check(entry)
        head = self._header.head
        if (head - self._header.tail) & 0xFFFFFFFF >= self.capacity:
            return False
        start = self._slot(head)
        self._map[start:start + self.entry_bytes] = entry
        self._header.head = (head + 1) & 0xFFFFFFFF
        self._ring()
        return True

    def try_read(self) -> Optional[bytes]:
        """The oldest entry, or None if the ring is empty (consumer side)."""
        tail = self._header.tail
        if self._header.head == tail:
            return None
        start = self._slot(tail)
        entry = bytes(self._map[start:start + self.entry_bytes])
        self._header.tail = (tail + 1) & 0xFFFFFFFF
        self._ring()
        return entry

    def write(self, entry: bytes, timeout: float) -> bool:
        """Appends ``entry``, waiting at most ``timeout`` seconds for room; False if there was none."""
        return self._wait(lambda: self.try_write(entry), timeout)

    def read(self, timeout: float) -> Optional[bytes]:
        """The oldest entry, waiting at most ``timeout`` seconds for one; None if none came."""
        taken = []

        def attempt() -> bool:
            entry = self.try_read()
            if entry is not None:
                taken.append(entry)
            return entry is not None

        return taken[0] if self._wait(attempt, timeout) else None

    def _wait(self, attempt, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        pause = 0.00001
        while True:
            if attempt():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.0002)

    def _ring(self) -> None:
        self._header.doorbell = (self._header.doorbell + 1) & 0xFFFFFFFF
        _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(self._doorbell_address), ctypes.c_int(_FUTEX_WAKE),
                      ctypes.c_int(0x7FFFFFFF), None, None, ctypes.c_int(0))

    def _check(self, entry: bytes) -> None:
        if len(entry) != self.entry_bytes:
            raise ValueError(f"an entry of {self.path} is {self.entry_bytes} bytes, not {len(entry)}")

    def close(self) -> None:
        del self._header
        self._map.close()

    def __enter__(self) -> "SharedRing":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

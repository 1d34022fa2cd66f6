"""The consumer's view of the agent's version table."""

import ctypes
from typing import Tuple, Union

from . import abi
from ._shm import map_region

_HEADER = ctypes.sizeof(abi.VersionTableHeader)
_ENTRY = ctypes.sizeof(abi.VersionEntry)


def pack_state(version: int, slot: int) -> int:
    """The one word the agent stores on activation: (version << 8) | (slot << 1) | 1."""
    if not 0 <= version < 1 << 56:
        raise ValueError(f"version {version} does not fit in 56 bits")
    if slot not in (0, 1):
        raise ValueError(f"slot {slot} is not 0 or 1")
    return (version << 8) | (slot << 1) | 1


def unpack_state(state: int) -> Tuple[int, int]:
    """(version, slot) of a state word; (0, 0) before the first activation."""
    return state >> 8, (state >> 1) & 1


class VersionTable:
    """A mapped version table. ``state(row)`` is the per-step check: one aligned 8-byte load."""

    def __init__(self, source: Union[str, int]):
        """Maps the table from its path, or from a read-only descriptor received from the agent (then owned here)."""
        self._map, self.path = map_region(source, writable=False)
        path = self.path
        if len(self._map) < _HEADER:
            raise ValueError(f"{path}: {len(self._map)} bytes is too small for a version table header ({_HEADER})")
        header = abi.VersionTableHeader.from_buffer_copy(self._map)
        if header.magic != abi.TABLE_MAGIC:
            raise ValueError(f"{path}: not an nccl-swap version table (magic 0x{header.magic:016x})")
        if header.abi_version != abi.ABI_VERSION:
            raise ValueError(f"{path}: ABI version {header.abi_version}, this client speaks {abi.ABI_VERSION}")
        needed = _HEADER + header.capacity * _ENTRY
        if len(self._map) < needed:
            raise ValueError(f"{path}: {header.capacity} rows need {needed} bytes, the file has {len(self._map)}")
        self.capacity = header.capacity
        # An aligned 8-byte view per row: reading one element is a single 8-byte load.
        self._words = memoryview(self._map).cast("Q")

    def entry(self, row: int) -> abi.VersionEntry:
        self._check(row)
        return abi.VersionEntry.from_buffer_copy(self._map, _HEADER + row * _ENTRY)

    def find(self, name: str) -> int:
        """The row of weight set ``name``, or -1."""
        encoded = name.encode("utf-8")
        for row in range(self.capacity):
            entry = self.entry(row)
            if entry.flags & abi.ENTRY_IN_USE and entry.name == encoded:
                return row
        return -1

    def state(self, row: int) -> int:
        """The packed (version, slot) word of ``row``, read with one aligned 8-byte load."""
        return self._words[(_HEADER + row * _ENTRY) // 8]

    def target(self, row: int, lane: int) -> int:
        """The state word the consumer with ``lane`` must serve: the canary version while its lane is set, else ``state``."""
        base = (_HEADER + row * _ENTRY) // 8
        if lane >= 0 and (self._words[base + 13] >> lane) & 1:  # canary_lanes, at byte 104 of the entry
            canary = self._words[base + 14]  # canary_state, at byte 112
            if canary:
                return canary
        return self._words[base]

    def _check(self, row: int) -> None:
        if not 0 <= row < self.capacity:
            raise IndexError(f"row {row} is not in [0, {self.capacity}) of {self.path}")

    def close(self) -> None:
        self._words.release()
        self._map.close()

    def __enter__(self) -> "VersionTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

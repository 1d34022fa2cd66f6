"""A client's shared memory for its tensors: a memfd sealed against resizing, which the agent maps."""

import fcntl
import mmap
import os
from typing import Optional

from .layout import Layout


class WeightRegion:
    """An anonymous memfd of at least one page holding ``layout``; ``tensor(name)`` is a writable memoryview.

    The region is sealed against shrinking and growing: the agent maps only regions that cannot be cut short
    under it. It is the client's own memory and stays valid whatever happens to the agent.
    """

    def __init__(self, name: str, layout: Layout):
        self.name = name
        self.layout = layout
        self.length = max(layout.length, mmap.PAGESIZE)
        self.fd = os.memfd_create(f"nccl-swap-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.length)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            self._map: Optional[mmap.mmap] = mmap.mmap(self.fd, self.length)
        except BaseException:
            os.close(self.fd)
            raise
        self.view = memoryview(self._map)

    def tensor(self, name: str) -> memoryview:
        """The bytes of tensor ``name`` (a slice of the region: writes go straight to shared memory)."""
        t = self.layout[name]
        return self.view[t.offset:t.offset + t.nbytes]

    def close(self) -> None:
        if self._map is None:
            return
        self.view.release()
        self._map.close()
        self._map = None
        os.close(self.fd)

    def __enter__(self) -> "WeightRegion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

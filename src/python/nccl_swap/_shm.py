"""Mapping a shared region given as a file path, or as a descriptor received from the agent."""

import mmap
import os
from typing import Tuple, Union


def map_region(source: Union[str, int], writable: bool) -> Tuple[mmap.mmap, str]:
    """Maps ``source`` whole; a descriptor is owned here and closed once mapped. Returns the map and a name for messages."""
    access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
    if isinstance(source, str):
        with open(source, "r+b" if writable else "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=access), source
    try:
        return mmap.mmap(source, 0, access=access), f"descriptor {source}"
    finally:
        os.close(source)

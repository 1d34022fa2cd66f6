"""Python client of the nccl-swap agent.

The control channel is pure Python (standard library only): the shared-memory version table that a
consumer checks each step, and the request/response rings. The PyTorch side (registering tensors,
CUDA IPC) comes with the co-located GPU path.
"""

from .abi import ABI_VERSION, RequestKind
from .channel import RefusedError, Session, connect
from .ring import SharedRing
from .version_table import VersionTable, pack_state, unpack_state

__all__ = ["ABI_VERSION", "RefusedError", "RequestKind", "Session", "connect", "SharedRing", "VersionTable", "pack_state", "unpack_state"]

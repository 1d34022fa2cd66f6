"""Python client of the nccl-swap agent (standard library only).

- :class:`Publisher`: a trainer's tensors in shared memory, registered once; ``publish(version)`` per step.
- :class:`Consumer`: an engine's own weights (flip: two slots; copy-in: one set of buffers); ``step()`` at every
  step boundary is one load of the version table when nothing is new.
- :func:`connect`: a raw session (any role), its rings and the version table; :class:`Layout` says where tensors lie.

The PyTorch side is :mod:`nccl_swap.gpu` (imported on its own, it needs torch): :class:`~nccl_swap.gpu.GpuPublisher`
and :class:`~nccl_swap.gpu.GpuConsumer` register CUDA tensors by CUDA IPC handle.
"""

from .abi import ABI_VERSION, RequestKind, Status
from .channel import AgentError, ClosedError, RefusedError, Response, Session, connect
from .consumer import COPY_IN, FLIP, Consumer
from .layout import Layout, LayoutError, Tensor
from .publisher import Publisher
from .region import WeightRegion
from .ring import SharedRing
from .version_table import VersionTable, pack_state, unpack_state

__all__ = [
    "ABI_VERSION", "AgentError", "COPY_IN", "ClosedError", "Consumer", "FLIP", "Layout", "LayoutError", "Publisher", "RefusedError",
    "RequestKind", "Response", "Session", "SharedRing", "Status", "Tensor", "VersionTable", "WeightRegion", "connect", "pack_state", "unpack_state",
]

"""The PyTorch side: a trainer's and an engine's CUDA tensors registered with the agent by CUDA IPC handle.

Needs PyTorch with CUDA (imported here, not by ``nccl_swap`` itself). The engine's weights stay the engine's own
memory: killing or restarting the agent never takes them away.
"""

import threading
import time
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from . import abi, cuda
from .channel import DEFAULT_SOCKET, AgentError, ClosedError, RefusedError, Response, Session, connect
from .consumer import COPY_IN, FLIP
from .gate import Gate
from .layout import PACKED_ALIGNMENT, Layout, LayoutError, Tensor
from .publisher import Publisher
from .version_table import unpack_state

_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def dtype_name(name: str, tensor: torch.Tensor) -> str:
    try:
        return _DTYPES[tensor.dtype]
    except KeyError:
        raise LayoutError(f"tensor '{name}': dtype {tensor.dtype} has no safetensors name") from None


class CudaRegion:
    """Named CUDA tensors as one region. For each allocation that holds some of them (its IPC handle names it from
    its base), the span from its first tensor to the end of its last is placed in the region's offsets, in address
    order, at least 256 bytes after the one before; a tensor's offset is its span's place plus its distance from the
    span's start. So tensors laid out alike from the start of their span (two slots) get the same offsets wherever
    the allocator put them. Any allocator whose memory cuIpcGetMemHandle accepts will do (PyTorch's caching
    allocator does; expandable segments do not)."""

    def __init__(self, name: str, tensors: Mapping[str, torch.Tensor]):
        self.name = name
        device = None
        bases: Dict[str, int] = {}
        spans: Dict[int, List[int]] = {}  # allocation base -> [first byte, end] of its tensors, from the base
        for tname, t in tensors.items():
            if not t.is_cuda:
                raise LayoutError(f"tensor '{tname}' is on {t.device}, not a GPU")
            if device is None:
                device = t.device
            elif t.device != device:
                raise LayoutError(f"tensor '{tname}' is on {t.device}, the others on {device}: one region, one GPU")
            if not t.is_contiguous():
                raise LayoutError(f"tensor '{tname}' is not contiguous: the agent copies whole byte ranges")
            if t.numel() == 0:
                continue
            base, _ = cuda.address_range(t.data_ptr(), f"tensor '{tname}'")
            bases[tname] = base
            start, end = t.data_ptr() - base, t.data_ptr() - base + t.numel() * t.element_size()
            span = spans.setdefault(base, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
        self.device = device
        place, at = {}, 0
        for base in sorted(spans):
            place[base] = at
            at = (at + spans[base][1] - spans[base][0] + 2 * PACKED_ALIGNMENT - 1) // PACKED_ALIGNMENT * PACKED_ALIGNMENT
        placed = []
        for tname, t in tensors.items():
            offset = 0
            if tname in bases:
                base = bases[tname]
                offset = place[base] + t.data_ptr() - base - spans[base][0]
            placed.append(Tensor(tname, dtype_name(tname, t), tuple(t.shape), offset, t.numel() * t.element_size()))
        self.layout = Layout(placed)
        self.segments = [{"handle": cuda.ipc_handle(base, f"region '{name}'").hex(), "offset": spans[base][0],
                          "bytes": spans[base][1] - spans[base][0], "at": place[base]} for base in sorted(spans)]

    def to_json(self) -> dict:
        """The hello's entry for this region."""
        return {"name": self.name, "cuda": self.segments}


class GpuPublisher(Publisher):
    """A trainer's CUDA tensors, registered once; :meth:`publish` per step returns once the agent has its own copy
    (with flip consumers, in their slots). :meth:`reconnect` after the agent restarted, as for :class:`Publisher`."""

    def __init__(self, weight_set: str, tensors: Mapping[str, torch.Tensor], socket_path: str = DEFAULT_SOCKET, timeout: float = 60.0):
        self.weight_set = weight_set
        self.socket_path = socket_path
        self.timeout = timeout
        self.tensors = dict(tensors)  # held: the agent reads their memory
        self.region = CudaRegion("tensors", self.tensors)
        self.session: Session = self._register()

    def tensor(self, name: str) -> torch.Tensor:  # type: ignore[override]
        return self.tensors[name]

    def publish(self, version: int, wait: bool = False, timeout: Optional[float] = None) -> Response:
        """Publishes ``version`` once the trainer's GPU work on the tensors is done (see :meth:`Publisher.publish`)."""
        torch.cuda.synchronize(self.region.device)
        return super().publish(version, wait, timeout)

    def close(self) -> None:
        self.session.close()  # the tensors are the trainer's


class GpuConsumer:
    """An engine's weights on the GPU, kept up to date by the agent.

    ``parameters``: the engine's tensors by name (``dict(model.named_parameters())``).

    - copy-in: the agent writes new versions into these very tensors, gated on the engine's stream.
    - flip: two slots are allocated, and at a switch every parameter is made to view the new slot (``p.data``).

    Call :meth:`step` at every step boundary, on the thread that enqueues the engine's GPU work (the current stream
    is the one gated): one load of the version table when nothing is new, and it never waits for the agent.
    """

    def __init__(self, weight_set: str, parameters: Mapping[str, torch.Tensor], mode: str = FLIP,
                 socket_path: str = DEFAULT_SOCKET, timeout: float = 120.0):
        if mode not in (FLIP, COPY_IN):
            raise ValueError(f"mode '{mode}' is not {FLIP} or {COPY_IN}")
        self.weight_set = weight_set
        self.mode = mode
        self.socket_path = socket_path
        self.timeout = timeout
        self.parameters = dict(parameters)
        self.device = next(iter(self.parameters.values())).device
        self.serving = 0
        self.switches = 0
        self.sessions = 1
        self.last_error: Optional[str] = None
        self._sequence = 0
        self._pending: Optional[Tuple[int, int, int, int]] = None  # copy-in: (sequence, request id, state, state before)
        self._lock = threading.Lock()
        self._closed = False
        self._retired: List[Session] = []
        self.gate = Gate()
        try:
            if mode == FLIP:
                packed = Layout.packed((n, dtype_name(n, t), tuple(t.shape)) for n, t in self.parameters.items())
                self.slots = [torch.empty(max(packed.length, 1), dtype=torch.uint8, device=self.device) for _ in range(2)]
                self.views = [{t.name: slot[t.offset:t.offset + t.nbytes].view(self.parameters[t.name].dtype).view(t.shape) for t in packed}
                              for slot in self.slots]
                self.regions = [CudaRegion(f"slot{i}", self.views[i]) for i in range(2)]
                if self.regions[0].layout.to_json() != self.regions[1].layout.to_json():
                    raise LayoutError("the two slots' tensors lie differently")  # one layout serves both in the hello
            else:
                self.regions = [CudaRegion("weights", self.parameters)]
            self.session: Session = self._register(0)
        except BaseException:
            self.gate.close()
            raise
        self._watcher = threading.Thread(target=self._watch, name=f"nccl-swap GPU consumer of {weight_set}", daemon=True)
        self._watcher.start()

    @property
    def version(self) -> int:
        return unpack_state(self.serving)[0]

    def _register(self, serving: int) -> Session:
        return connect("consumer", self.weight_set, self.socket_path, self.timeout, self.regions[0].layout,
                       [*self.regions, self.gate], self.mode, serving)

    def step(self) -> bool:
        """The per-step check; True when work enqueued from now on sees a different version."""
        session = self.session
        if self._pending is not None:
            self._collect(session)
            return False
        state = session.table.target(session.row, session.lane)
        if state == self.serving or state == 0:
            return False
        if not self._lock.acquire(blocking=False):
            return False  # the watcher is swapping sessions: next step
        try:
            # A dead session's table may show what a restarted agent activated without this consumer (its slot or
            # buffers were not written), and its rings have nobody to answer: follow only a live session.
            if session is not self.session or self._closed or not session.alive():
                return False
            session.drain()
            stream = torch.cuda.current_stream(self.device).cuda_stream
            before = self.serving
            if self.mode == FLIP:
                slot = unpack_state(state)[1]
                for name, parameter in self.parameters.items():
                    parameter.data = self.views[slot][name]
                self.gate.passed(stream, state)
                session.send(session.request(abi.RequestKind.ACK, state))
            else:
                self._sequence = (self._sequence + 1) & 0xFFFFFFFF or 1
                self.gate.quiesce_then_wait(stream, self._sequence)
                entry = session.request(abi.RequestKind.COPY_IN, self._sequence)
                if not session.send(entry):
                    self.gate.release(self._sequence)  # the agent never heard of it: the stream goes on, on the old bytes
                    self.last_error = "copy-in: the request ring stayed full"
                    return False
                self._pending = (self._sequence, abi.Request.from_buffer_copy(entry).id, state, before)
            self.serving = state
            self.switches += 1
            return True
        finally:
            self._lock.release()

    def _collect(self, session: Session) -> None:
        """Copy-in: reads the agent's answer if it came (no waiting); an error makes the next step copy in again."""
        raw = session.responses.try_read()
        if raw is None or self._pending is None:
            return
        response = Response.parse(raw)
        sequence, wanted, state, before = self._pending
        if response.id != wanted:
            return
        self._pending = None
        if response.status == abi.Status.OK:
            self.serving = response.version
        else:
            self.last_error = f"copy-in {sequence}: {AgentError(response.status, response.detail)}"
            self.serving = before if response.status == abi.Status.E_NOT_FOUND else 0

    def _watch(self) -> None:
        while not self._closed:
            self.session.wait_until_closed()
            with self._lock:
                if self._closed:
                    return
                if self._pending is not None:
                    sequence = self._pending[0]
                    if not self.gate.done(sequence):
                        self.serving = 0  # the copy may have stopped half way: the engine must not trust its weights
                    self.gate.release(sequence)  # the engine's stream goes on, whatever the agent did
                    self._pending = None
            while not self._closed:
                time.sleep(0.1)
                try:
                    fresh = self._register(self.serving)
                except (RefusedError, OSError, ValueError) as e:
                    self.last_error = f"reconnecting: {e}"
                    continue
                with self._lock:
                    self._retired.append(self.session)
                    self.session = fresh
                    self.sessions += 1
                break

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.session.close()
        self._watcher.join()
        if self._pending is not None:
            self.gate.release(self._pending[0])  # nobody will answer it now
        torch.cuda.synchronize(self.device)  # no stream may still wait on the gate
        for session in self._retired:
            session.close()
        self.gate.close()

    def __enter__(self) -> "GpuConsumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

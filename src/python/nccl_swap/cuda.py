"""The few CUDA driver calls the GPU clients need, through ctypes (no CUDA Python package): allocation ranges,
IPC handles, host memory registration and stream memory operations. Loaded on first use, so that importing
nccl_swap works on machines without a GPU."""

import ctypes
from typing import Optional, Tuple

_lib: Optional[ctypes.CDLL] = None

IPC_HANDLE_BYTES = 64
_HOST_REGISTER_PORTABLE = 0x1
_HOST_REGISTER_DEVICEMAP = 0x2


class CudaError(RuntimeError):
    """A driver call failed; the message names the call, the driver's error name and what it was for."""


def _driver() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaError(f"libcuda.so.1 cannot be loaded ({e}): the GPU clients need the NVIDIA driver") from None
        u64, u32, vp, sz = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t
        signatures = {
            "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
            "cuMemGetAddressRange_v2": [ctypes.POINTER(u64), ctypes.POINTER(sz), u64],
            "cuIpcGetMemHandle": [ctypes.c_char * IPC_HANDLE_BYTES, u64],
            "cuMemHostRegister_v2": [vp, sz, ctypes.c_uint],
            "cuMemHostUnregister": [vp],
            "cuMemHostGetDevicePointer_v2": [ctypes.POINTER(u64), vp, ctypes.c_uint],
            # _v2: the stream memory operations that need no NVreg_EnableStreamMemOPs; flags 0 = cyclic >= / fenced write.
            "cuStreamWaitValue32_v2": [vp, u64, u32, ctypes.c_uint],
            "cuStreamWriteValue32_v2": [vp, u64, u32, ctypes.c_uint],
        }
        for name, arguments in signatures.items():
            function = getattr(lib, name)
            function.argtypes = arguments
            function.restype = ctypes.c_int
        _lib = lib
    return _lib


def _check(result: int, call: str, what: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _driver().cuGetErrorName(result, ctypes.byref(name))
        raise CudaError(f"{what}: {call} failed: {(name.value or b'?').decode()} ({result})")


def address_range(pointer: int, what: str) -> Tuple[int, int]:
    """The base and size of the allocation that holds device address ``pointer``."""
    base, size = ctypes.c_uint64(), ctypes.c_size_t()
    _check(_driver().cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size), pointer), "cuMemGetAddressRange", what)
    return base.value, size.value


def ipc_handle(base: int, what: str) -> bytes:
    """The CUDA IPC handle of the allocation at ``base`` (memory from cudaMalloc/cuMemAlloc, as PyTorch's allocator gives)."""
    handle = (ctypes.c_char * IPC_HANDLE_BYTES)()
    _check(_driver().cuIpcGetMemHandle(handle, base), "cuIpcGetMemHandle", what)
    return bytes(handle)


def host_register(address: int, length: int, what: str) -> int:
    """Page-locks ``length`` bytes of host memory at ``address`` and maps them for the GPU; returns the device address."""
    _check(_driver().cuMemHostRegister_v2(address, length, _HOST_REGISTER_PORTABLE | _HOST_REGISTER_DEVICEMAP), "cuMemHostRegister", what)
    device = ctypes.c_uint64()
    try:
        _check(_driver().cuMemHostGetDevicePointer_v2(ctypes.byref(device), address, 0), "cuMemHostGetDevicePointer", what)
    except CudaError:
        _driver().cuMemHostUnregister(address)
        raise
    return device.value


def host_unregister(address: int, what: str) -> None:
    _check(_driver().cuMemHostUnregister(address), "cuMemHostUnregister", what)


def stream_wait_value(stream: int, device_address: int, value: int, what: str) -> None:
    """Later work on ``stream`` waits, on the GPU, until the 32-bit word reaches ``value`` (cyclic >=)."""
    _check(_driver().cuStreamWaitValue32_v2(stream, device_address, value & 0xFFFFFFFF, 0), "cuStreamWaitValue32", what)


def stream_write_value(stream: int, device_address: int, value: int, what: str) -> None:
    """Writes ``value`` to the 32-bit word once ``stream``'s earlier work is done (fenced)."""
    _check(_driver().cuStreamWriteValue32_v2(stream, device_address, value & 0xFFFFFFFF, 0), "cuStreamWriteValue32", what)

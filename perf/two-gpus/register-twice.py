"""Two processes page-lock the same shared memory with cuMemHostRegister, as a receiving engine and its agent do.

    python3 perf/two-gpus/register-twice.py [BYTES]

Each case: a first process creates a memfd of BYTES, maps it for writing, fills it and (unless the case says not)
registers it PORTABLE|DEVICEMAP on its device; a second process maps the same file (read-only or for writing) and
registers it on its device with the case's flags. Prints each case's two results (the driver's error name).
"""

import ctypes
import mmap
import os
import subprocess
import sys
import time

PORTABLE, DEVICEMAP, READ_ONLY = 0x01, 0x02, 0x08


def driver(device: int) -> ctypes.CDLL:
    cuda = ctypes.CDLL("libcuda.so.1")
    cuda.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    cuda.cuInit(0)
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    cuda.cuDeviceGet(ctypes.byref(dev), device)
    cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
    cuda.cuCtxSetCurrent(ctx)
    return cuda


def name(cuda: ctypes.CDLL, result: int) -> str:
    text = ctypes.c_char_p()
    cuda.cuGetErrorName(result, ctypes.byref(text))
    return (text.value or b"?").decode()


def mapped(fd: int, size: int, writable: bool) -> int:
    """The address of a shared mapping of ``fd`` (libc mmap: Python's own cannot give a read-only mapping's address)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    address = libc.mmap(None, size, mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0), mmap.MAP_SHARED, fd, 0)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    return address


def register(cuda: ctypes.CDLL, address: int, size: int, flags: int) -> str:
    return name(cuda, cuda.cuMemHostRegister_v2(address, size, flags))


def first(size: int, device: int, do_register: bool) -> None:
    cuda = driver(device)
    fd = os.memfd_create("register-twice")
    os.ftruncate(fd, size)
    address = mapped(fd, size, writable=True)
    ctypes.memmove(address, os.urandom(1 << 20) * (size >> 20), size)
    result = register(cuda, address, size, PORTABLE | DEVICEMAP) if do_register else "not registered"
    print(f"{os.getpid()} {fd} {result}", flush=True)
    sys.stdin.readline()


def second(path: str, size: int, device: int, writable: bool, flags: int) -> None:
    cuda = driver(device)
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    print(register(cuda, mapped(fd, size, writable), size, flags), flush=True)


def case(title: str, size: int, first_device: int, first_registers: bool, second_device: int, writable: bool, flags: int) -> None:
    a = subprocess.Popen([sys.executable, __file__, "first", str(size), str(first_device), str(int(first_registers))],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid, fd, result = a.stdout.readline().split(maxsplit=2)
    b = subprocess.run([sys.executable, __file__, "second", f"/proc/{pid}/fd/{fd}", str(size), str(second_device), str(int(writable)), str(flags)],
                       capture_output=True, text=True)
    a.stdin.write("\n")
    a.stdin.flush()
    a.wait()
    print(f"{title}: first {result.strip()}; second {b.stdout.strip() or b.stderr.strip()}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "first":
        first(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")
    elif len(sys.argv) > 1 and sys.argv[1] == "second":
        second(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1", int(sys.argv[6]))
    else:
        size = int(sys.argv[1]) if len(sys.argv) > 1 else 64 << 20
        devices = int(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.count("GPU "))
        other = 1 if devices > 1 else 0
        start = time.time()
        case("agent alone, read-only mapping, READ_ONLY (the demo)", size, 0, False, 0, False, PORTABLE | DEVICEMAP | READ_ONLY)
        case("engine registered, agent read-only mapping, READ_ONLY (the failing pair)", size, 0, True, 0, False, PORTABLE | DEVICEMAP | READ_ONLY)
        case("engine registered, agent writable mapping, no READ_ONLY", size, 0, True, 0, True, PORTABLE | DEVICEMAP)
        case("engine registered, agent read-only mapping, no READ_ONLY", size, 0, True, 0, False, PORTABLE | DEVICEMAP)
        case(f"engine registered on GPU {other}, agent on GPU 0, read-only, READ_ONLY", size, other, True, 0, False, PORTABLE | DEVICEMAP | READ_ONLY)
        case(f"engine registered on GPU {other}, agent on GPU {other}, read-only, READ_ONLY", size, other, True, other, False, PORTABLE | DEVICEMAP | READ_ONLY)
        print(f"{time.time() - start:.1f} s")

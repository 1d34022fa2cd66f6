"""The shared-memory layout: ctypes mirrors of native/include/nccl_swap_abi.h, the one definition.

Field names are the header's; tests compile the header and check every offset and size.
"""

import ctypes
import enum

ABI_VERSION = 1
TABLE_MAGIC = 0x315442544E535750
RING_MAGIC = 0x31474E524E535750
REQUEST_MAGIC = 0x5152534E
RESPONSE_MAGIC = 0x5352534E
NAME_BYTES = 64
PAYLOAD_BYTES = 96
ENTRY_IN_USE = 0x1
ENTRY_PAUSED = 0x2
PUBLISH_WAIT = 0x1


class RequestKind(enum.IntEnum):
    PING = 1
    PUBLISH = 2
    ACK = 3
    ROLLBACK = 4
    STATUS = 5
    COPY_IN = 6
    REPORT = 7


class Status(enum.IntEnum):
    """nccl_swap_status: 0 or a negative errno."""

    OK = 0
    E_NOT_PERMITTED = -1
    E_NOT_FOUND = -2
    E_BUSY = -16
    E_INVALID = -22
    E_NOT_IMPLEMENTED = -38
    E_CORRUPT = -74
    E_TIMED_OUT = -110
    E_STALE = -116
    E_CANCELED = -125


class VersionEntry(ctypes.LittleEndianStructure):
    """nccl_swap_version_entry: one weight set's row of the version table."""

    _fields_ = [
        ("state", ctypes.c_uint64),
        ("last_good", ctypes.c_uint64),
        ("manifest_digest", ctypes.c_uint64),
        ("activated_ns", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("reserved0", ctypes.c_uint32),
        ("name", ctypes.c_char * NAME_BYTES),
        ("canary_lanes", ctypes.c_uint64),
        ("canary_state", ctypes.c_uint64),
        ("reserved1", ctypes.c_uint8 * 8),
    ]


class VersionTableHeader(ctypes.LittleEndianStructure):
    """nccl_swap_version_table: the header; entries follow it."""

    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("abi_version", ctypes.c_uint32),
        ("capacity", ctypes.c_uint32),
        ("generation", ctypes.c_uint64),
        ("agent_pid", ctypes.c_uint64),
        ("reserved", ctypes.c_uint8 * 32),
    ]


class RingHeader(ctypes.LittleEndianStructure):
    """nccl_swap_ring_header: a single-producer single-consumer ring; entries follow it."""

    _fields_ = [
        ("magic", ctypes.c_uint64),
        ("abi_version", ctypes.c_uint32),
        ("capacity", ctypes.c_uint32),
        ("entry_bytes", ctypes.c_uint32),
        ("pad0", ctypes.c_uint8 * 44),
        ("head", ctypes.c_uint32),
        ("pad1", ctypes.c_uint8 * 60),
        ("tail", ctypes.c_uint32),
        ("pad2", ctypes.c_uint8 * 60),
        ("doorbell", ctypes.c_uint32),
        ("sleepers", ctypes.c_uint32),
        ("pad3", ctypes.c_uint8 * 56),
    ]


class Request(ctypes.LittleEndianStructure):
    """nccl_swap_request."""

    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("kind", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("id", ctypes.c_uint64),
        ("version", ctypes.c_uint64),
        ("weight_set", ctypes.c_uint32),
        ("payload_bytes", ctypes.c_uint32),
        ("payload", ctypes.c_uint8 * PAYLOAD_BYTES),
    ]


class Response(ctypes.LittleEndianStructure):
    """nccl_swap_response."""

    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("status", ctypes.c_int32),
        ("id", ctypes.c_uint64),
        ("version", ctypes.c_uint64),
        ("detail_bytes", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("detail", ctypes.c_char * PAYLOAD_BYTES),
    ]


class Gate(ctypes.LittleEndianStructure):
    """nccl_swap_gate: the words a GPU consumer's stream and the agent's stream order copy-ins and switches with."""

    _fields_ = [
        ("quiesced", ctypes.c_uint32),
        ("pad0", ctypes.c_uint8 * 60),
        ("done", ctypes.c_uint32),
        ("pad1", ctypes.c_uint8 * 60),
        ("passed", ctypes.c_uint32),
        ("pad2", ctypes.c_uint8 * 124),
    ]


REPORT_BUCKETS = 40


class Report(ctypes.LittleEndianStructure):
    """nccl_swap_report: a consumer's counters since its last report (a REPORT request's payload)."""

    _fields_ = [
        ("requests", ctypes.c_uint32),
        ("errors", ctypes.c_uint32),
        ("quality_count", ctypes.c_uint32),
        ("quality_sum", ctypes.c_float),
        ("latency", ctypes.c_uint16 * REPORT_BUCKETS),
    ]


STRUCTS = {
    "nccl_swap_report": Report,
    "nccl_swap_version_entry": VersionEntry,
    "nccl_swap_version_table": VersionTableHeader,
    "nccl_swap_ring_header": RingHeader,
    "nccl_swap_request": Request,
    "nccl_swap_response": Response,
    "nccl_swap_gate": Gate,
}

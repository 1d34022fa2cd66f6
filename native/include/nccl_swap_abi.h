/*
 * nccl-swap control-channel ABI, version 1: the layout of the shared-memory regions the agent shares with
 * publishers and consumers. This header is the one definition; the C# structs (src/NcclSwap.ControlPlane/Abi)
 * and the Python client (src/python/nccl_swap/abi.py) are checked against it, field by field, by tests that
 * compile it.
 *
 * All integers are little-endian and naturally aligned. Regions are mapped shared (memfd or /dev/shm).
 *
 * How a client gets them (the front door, a Unix socket; JSON lines, not part of the layout checks):
 *   hello  {"role": "publisher"|"consumer"|"operator", "weight_set": NAME,
 *           "tensors": [{"name", "dtype", "shape", "offset"}, ...],   where the client's tensors lie
 *           "regions": [REGION, ...], a publisher 1, a flip consumer 2 (slots 0 and 1), a copy-in consumer 1;
 *                     each either NAME: shared memory, one descriptor sent with the hello (SCM_RIGHTS) in order, a
 *                                memfd sealed against shrinking;
 *                     or {"name": NAME, "cuda": [{"handle": HEX, "offset": O, "bytes": N, "at": A}, ...]}: GPU
 *                                memory, one entry per allocation: its CUDA IPC handle (128 hex digits; it names the
 *                                allocation from its base), N bytes from O of it, placed at A of the region's offsets
 *                                (the tensors' "offset"), in order, at least 256 bytes apart; every tensor lies in one.
 *                                All of a client's regions share its one "tensors" layout.
 *                     A consumer with GPU regions adds, last, the memfd "gate" (one page, nccl_swap_gate).
 *           "mode": "flip"|"copy-in", "serving": STATE}   consumers: how they take versions, what they serve now
 *          A session may register nothing (tensors and regions left out): it can ping and ask for status.
 *   reply  {"ok": true, "session", "role", "table", "descriptors": ["table", "requests", "responses", "bell"],
 *           "entry_bytes", "row", "state"}  with those four descriptors, or {"ok": false, "error": REASON}.
 * The session lives as long as the connection. "bell" is an eventfd: while the agent's dispatcher sleeps it
 * raises `sleepers` of every request ring; a client that finds it raised after writing a request (with a full
 * fence between the head's store and that load) writes 1 to the bell.
 */
#ifndef NCCL_SWAP_ABI_H
#define NCCL_SWAP_ABI_H

#include <stdint.h>

#define NCCL_SWAP_ABI_VERSION 1u
#define NCCL_SWAP_TABLE_MAGIC 0x315442544E535750ull /* "PWSNTBT1" little-endian: version table */
#define NCCL_SWAP_RING_MAGIC 0x31474E524E535750ull  /* "PWSNRNG1": request or response ring */
#define NCCL_SWAP_REQUEST_MAGIC 0x5152534Eu         /* "NSRQ" */
#define NCCL_SWAP_RESPONSE_MAGIC 0x5352534Eu        /* "NSRS" */
#define NCCL_SWAP_NAME_BYTES 64
#define NCCL_SWAP_PAYLOAD_BYTES 96

/*
 * Version table: one row per weight set, written only by the agent, read by consumers.
 *
 * `state` is the one word a consumer loads each step: (version << 8) | (slot << 1) | 1, stored by the agent
 * with a single release store after the version's bytes are staged, verified and (for flip) written to that
 * slot. 0 means "no version yet". A consumer that sees a state different from the one it serves switches.
 *
 * Canaries: while a new version proves itself on some consumers first, the agent stores its state word in
 * `canary_state`, then sets those consumers' lanes in `canary_lanes` (each consumer learns its lane, 0..63, in the
 * hello's reply; -1: never a canary). A consumer's target each step is therefore: load `canary_lanes`; if its bit is
 * set and `canary_state` is not 0, `canary_state`; else `state`. Promotion stores the version in `state`, then
 * clears the lanes and `canary_state`; a rollback clears the lanes, then `canary_state`: every interleaving of a
 * consumer's loads gives it a version that it may serve.
 */
typedef struct nccl_swap_version_entry {
    uint64_t state;            /*   0: (version << 8) | (slot << 1) | 1, or 0 */
    uint64_t last_good;        /*   8: the version rollback returns to, 0 if none */
    uint64_t manifest_digest;  /*  16: block digest of the active version's manifest */
    uint64_t activated_ns;     /*  24: CLOCK_MONOTONIC time of the last activation */
    uint32_t flags;            /*  32: NCCL_SWAP_ENTRY_* */
    uint32_t reserved0;        /*  36 */
    char name[NCCL_SWAP_NAME_BYTES]; /* 40: weight-set name, UTF-8, NUL-padded */
    uint64_t canary_lanes;     /* 104: bit L set: the consumer given lane L (its hello's reply) serves canary_state */
    uint64_t canary_state;     /* 112: the state word of a version on canaries only, or 0 */
    uint8_t reserved1[8];      /* 120 */
} nccl_swap_version_entry;     /* 128 bytes */

#define NCCL_SWAP_ENTRY_IN_USE 0x1u
#define NCCL_SWAP_ENTRY_PAUSED 0x2u    /* an operator paused the weight set's rollout: nothing new is activated */

typedef struct nccl_swap_version_table {
    uint64_t magic;            /*  0: NCCL_SWAP_TABLE_MAGIC */
    uint32_t abi_version;      /*  8: NCCL_SWAP_ABI_VERSION */
    uint32_t capacity;         /* 12: number of entries that follow */
    uint64_t generation;       /* 16: bumped when a row is added or removed */
    uint64_t agent_pid;        /* 24 */
    uint8_t reserved[32];      /* 32 */
    /* 64: nccl_swap_version_entry entries[capacity]; */
} nccl_swap_version_table;     /* 64 bytes */

/*
 * Ring: single producer, single consumer, fixed-size entries, capacity a power of two. `head` and `tail`
 * count entries forever (they wrap at 2^32); entry i lives at index i & (capacity - 1). The producer writes
 * the entry, then release-stores head + 1; the consumer acquire-loads head, reads, then release-stores
 * tail + 1. A side that finds nothing to do sleeps on `doorbell` (futex) after raising `sleepers`; the
 * other side bumps `doorbell` and wakes it when `sleepers` is non-zero.
 */
typedef struct nccl_swap_ring_header {
    uint64_t magic;            /*   0: NCCL_SWAP_RING_MAGIC */
    uint32_t abi_version;      /*   8 */
    uint32_t capacity;         /*  12: entries, a power of two */
    uint32_t entry_bytes;      /*  16 */
    uint8_t pad0[44];          /*  20 */
    uint32_t head;             /*  64: written by the producer only (own cache line) */
    uint8_t pad1[60];          /*  68 */
    uint32_t tail;             /* 128: written by the consumer only (own cache line) */
    uint8_t pad2[60];          /* 132 */
    uint32_t doorbell;         /* 192: futex word */
    uint32_t sleepers;         /* 196: how many sides wait on the doorbell */
    uint8_t pad3[56];          /* 200 */
    /* 256: entries[capacity] of entry_bytes each */
} nccl_swap_ring_header;       /* 256 bytes */

enum nccl_swap_request_kind {
    NCCL_SWAP_REQ_PING = 1,
    NCCL_SWAP_REQ_PUBLISH = 2,
    NCCL_SWAP_REQ_ACK = 3,
    NCCL_SWAP_REQ_ROLLBACK = 4,
    NCCL_SWAP_REQ_STATUS = 5,
    NCCL_SWAP_REQ_COPY_IN = 6,
    NCCL_SWAP_REQ_REPORT = 7,
};

/*
 * REPORT's payload: what a consumer served since its last report, on the state word in `version`. Latencies are
 * counted in buckets: bucket i (0..38) holds those at most 2^(i/2) ms, bucket 39 the longer ones.
 */
#define NCCL_SWAP_REPORT_BUCKETS 40
typedef struct nccl_swap_report {
    uint32_t requests;         /*  0 */
    uint32_t errors;           /*  4 */
    uint32_t quality_count;    /*  8: requests that carry a quality score */
    float quality_sum;         /* 12: the sum of their scores */
    uint16_t latency[NCCL_SWAP_REPORT_BUCKETS]; /* 16 */
} nccl_swap_report;            /* 96 bytes: a request's payload */

/*
 * What each request means (the session's role and weight set come from the front door, never from the entry):
 *   PING      any role: answered at once.
 *   PUBLISH   publisher: `version` (greater than every version published before) is snapshotted from the tensors
 *             the publisher registered into the agent's staging; answered once the snapshot is taken, or with
 *             NCCL_SWAP_PUBLISH_WAIT in `flags` once the version is activated, superseded or failed.
 *   ACK       consumer (flip): `version` holds the state word the consumer now serves.
 *   ROLLBACK  operator: re-activates the last good version; answered once it is active (or it failed).
 *   STATUS    any role: `version` 0 asks for the weight set's state; otherwise for that version's outcome.
 *   COPY_IN   consumer (copy-in), at a step boundary while it does not read its weights: the agent copies
 *             the version the consumer's target names (the active one, or the canary version for a canary's
 *             lane) into the consumer's buffers, verifies them and answers with the state word
 *             of what the buffers now hold in `version`. A consumer with a gate puts the copy-in's sequence
 *             number in `version` and does not wait: see nccl_swap_gate.
 *   REPORT    consumer: its counters since the last report (nccl_swap_report in the payload) on the state word in
 *             `version`; the agent's rollout policy compares canaries with the consumers on the previous version.
 *   PUBLISH's payload, when the version is signed: the key's id (8 bytes, little-endian: the first 8 bytes of the
 *             SHA-256 of its SubjectPublicKeyInfo) and the ECDSA P-256 signature r || s (64 bytes) over SHA-256 of
 *             "nccl-swap-version/1\n" NAME "\n" VERSION "\n" MANIFEST_SHA256_HEX; payload_bytes 72.
 * `weight_set` must be the session's row in the version table.
 */
#define NCCL_SWAP_PUBLISH_WAIT 0x1u

enum nccl_swap_status {
    NCCL_SWAP_OK = 0,
    NCCL_SWAP_E_NOT_PERMITTED = -1,  /* EPERM: the session's role may not make this request */
    NCCL_SWAP_E_NOT_FOUND = -2,      /* ENOENT: no such version (or no last good version to return to) */
    NCCL_SWAP_E_BUSY = -16,          /* EBUSY */
    NCCL_SWAP_E_INVALID = -22,       /* EINVAL: malformed entry, or a request that does not fit the session */
    NCCL_SWAP_E_NOT_IMPLEMENTED = -38, /* ENOSYS */
    NCCL_SWAP_E_CORRUPT = -74,       /* EBADMSG: bytes did not match their digest; nothing was activated */
    NCCL_SWAP_E_TIMED_OUT = -110,    /* ETIMEDOUT */
    NCCL_SWAP_E_STALE = -116,        /* ESTALE: not newer than a version already published */
    NCCL_SWAP_E_CANCELED = -125,     /* ECANCELED: superseded by a newer version, or abandoned at shutdown */
};

typedef struct nccl_swap_request {
    uint32_t magic;            /*  0: NCCL_SWAP_REQUEST_MAGIC */
    uint16_t kind;             /*  4: nccl_swap_request_kind */
    uint16_t flags;            /*  6 */
    uint64_t id;               /*  8: the client's correlation id, echoed in the response */
    uint64_t version;          /* 16 */
    uint32_t weight_set;       /* 24: row of the version table */
    uint32_t payload_bytes;    /* 28: bytes of payload in use */
    uint8_t payload[NCCL_SWAP_PAYLOAD_BYTES]; /* 32 */
} nccl_swap_request;           /* 128 bytes */

typedef struct nccl_swap_response {
    uint32_t magic;            /*  0: NCCL_SWAP_RESPONSE_MAGIC */
    int32_t status;            /*  4: 0 success, negative errno-style codes otherwise */
    uint64_t id;               /*  8: the request's id */
    uint64_t version;          /* 16 */
    uint32_t detail_bytes;     /* 24: bytes of detail in use */
    uint32_t reserved;         /* 28 */
    char detail[NCCL_SWAP_PAYLOAD_BYTES]; /* 32: UTF-8 message, e.g. why a request was refused */
} nccl_swap_response;          /* 128 bytes */

/*
 * Gate: how a consumer with GPU regions and the agent order their GPU work without either host thread waiting
 * for the other. It lies in a page of shared memory the consumer sends last with its hello ("gate"); both sides
 * register it with the driver (cuMemHostRegister) and write and wait on its words from their CUDA streams with
 * stream memory operations (cuStreamWriteValue32, cuStreamWaitValue32: cyclic greater-or-equal, so the counters
 * may wrap). A side whose peer died writes the word itself from the CPU, so that no stream waits forever.
 *
 *   copy-in  the consumer's stream writes `quiesced` = N after the last work that reads its weights and then waits
 *            until `done` >= N; its host sends COPY_IN with `version` N and goes on enqueueing the next step. The
 *            agent's stream waits until `quiesced` >= N, copies the active version in, writes `done` = N; the
 *            answer (the state word copied, or why not) follows once the agent has checked the bytes.
 *   flip     after switching slots the consumer's stream writes `passed` = the low 32 bits of the new state word,
 *            then its host sends ACK: once `passed` equals the acknowledged state, no work of the consumer reads
 *            the other slot any more, and the agent may write it.
 */
typedef struct nccl_swap_gate {
    uint32_t quiesced;         /*   0: copy-in: written by the consumer's stream */
    uint8_t pad0[60];          /*   4 */
    uint32_t done;             /*  64: copy-in: written by the agent's stream */
    uint8_t pad1[60];          /*  68 */
    uint32_t passed;           /* 128: flip: written by the consumer's stream */
    uint8_t pad2[124];         /* 132 */
} nccl_swap_gate;              /* 256 bytes */

#endif /* NCCL_SWAP_ABI_H */

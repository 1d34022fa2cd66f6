// The block digest on the GPU: bit-for-bit the algorithm of BlockDigest.cs (src/NcclSwap.DataPlane).
//
//   leaves   XXH64 (seed 0) of each 4096-byte block of the data; the last block may be short; empty
//            data has one empty leaf.
//   levels   while more than one hash remains: XXH64 (seed 0) of each group of 512 consecutive hashes,
//            taken as little-endian 8-byte words.
//   digest   XXH64 (seed 0) of the 16 bytes root || length (both little-endian); done on the host.
//
// copy_digest_ranges hashes the leaves of many ranges in one launch (a model's tensors), copying them on the
// way when asked (so a copy yields the digests of what it read), or only copies; digest_level_ranges builds one
// level of every range's tree per launch. Regenerate digest.ptx with native/build-ptx.sh.

#include <stdint.h>

#define LEAF_BYTES 4096
#define FANOUT 512
#define TILE_LEAVES 128
#define BATCH 8           // stripes (32 bytes) of each leaf loaded before they are hashed
#define ROW (BATCH * 32 + 32)

#define P1 0x9E3779B185EBCA87ull
#define P2 0xC2B2AE3D27D4EB4Full
#define P3 0x165667B19E3779F9ull
#define P4 0x85EBCA77C2B2AE63ull
#define P5 0x27D4EB2F165667C5ull

__device__ __forceinline__ uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

__device__ __forceinline__ uint64_t xxh_round(uint64_t acc, uint64_t input)
{
    acc += input * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}

__device__ __forceinline__ uint64_t xxh_merge(uint64_t acc, uint64_t value)
{
    acc ^= xxh_round(0, value);
    return acc * P1 + P4;
}

__device__ __forceinline__ uint64_t xxh_avalanche(uint64_t h)
{
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

__device__ __forceinline__ uint64_t xxh_converge(uint64_t v1, uint64_t v2, uint64_t v3, uint64_t v4)
{
    uint64_t h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
    h = xxh_merge(h, v1);
    h = xxh_merge(h, v2);
    h = xxh_merge(h, v3);
    return xxh_merge(h, v4);
}

__device__ __forceinline__ uint64_t load64_bytes(const uint8_t* p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i)
        v = (v << 8) | p[i];
    return v;
}

__device__ __forceinline__ uint32_t load32_bytes(const uint8_t* p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

__device__ __forceinline__ uint64_t load64(const uint8_t* p, bool aligned)
{
    return aligned ? *(const uint64_t*)p : load64_bytes(p);
}

__device__ __forceinline__ uint32_t load32(const uint8_t* p, bool aligned)
{
    return aligned ? *(const uint32_t*)p : load32_bytes(p);
}

// The end of XXH64 from the accumulated h (length already added): the bytes from p to end, fewer than 32.
__device__ uint64_t xxh64_finish(uint64_t h, const uint8_t* p, const uint8_t* end, bool aligned)
{
    while (p + 8 <= end) {
        h ^= xxh_round(0, load64(p, aligned));
        h = rotl64(h, 27) * P1 + P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)load32(p, aligned) * P1;
        h = rotl64(h, 23) * P2 + P3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * P5;
        h = rotl64(h, 11) * P1;
        ++p;
    }
    return xxh_avalanche(h);
}

// XXH64 of len bytes; aligned: p is 8-byte aligned, so words load whole.
__device__ uint64_t xxh64_bytes(const uint8_t* p, uint64_t len, uint64_t seed, bool aligned)
{
    const uint8_t* end = p + len;
    uint64_t h;
    if (len >= 32) {
        const uint8_t* limit = end - 32;
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        do {
            v1 = xxh_round(v1, load64(p, aligned));
            v2 = xxh_round(v2, load64(p + 8, aligned));
            v3 = xxh_round(v3, load64(p + 16, aligned));
            v4 = xxh_round(v4, load64(p + 24, aligned));
            p += 32;
        } while (p <= limit);
        h = xxh_converge(v1, v2, v3, v4);
    } else {
        h = seed + P5;
    }
    return xxh64_finish(h + len, p, end, aligned);
}

// XXH64 (seed 0) of count 8-byte words, 8-byte aligned.
__device__ uint64_t xxh64_words(const uint64_t* w, uint64_t count)
{
    uint64_t i = 0, h;
    if (count >= 4) {
        uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0 - P1;
        for (; i + 4 <= count; i += 4) {
            v1 = xxh_round(v1, w[i]);
            v2 = xxh_round(v2, w[i + 1]);
            v3 = xxh_round(v3, w[i + 2]);
            v4 = xxh_round(v4, w[i + 3]);
        }
        h = xxh_converge(v1, v2, v3, v4);
    } else {
        h = P5;
    }
    h += count * 8;
    for (; i < count; ++i) {
        h ^= xxh_round(0, w[i]);
        h = rotl64(h, 27) * P1 + P4;
    }
    return xxh_avalanche(h);
}

// A batch of ranges for one launch, passed by value (kernel parameters of up to 32 KiB need CUDA 12.1 and
// Volta or later; __grid_constant__ reads them in place rather than copying them per thread). MAX_RANGES and
// the layouts below are mirrored by GpuDigest.cs.
#define MAX_RANGES 640

struct range_desc {
    const uint8_t* src;   // the bytes hashed (and copied)
    uint8_t* dst;         // where they are copied; null: hash only
    uint64_t length;
    uint64_t* leaves;     // where its leaf hashes go; null: copy only
    uint64_t first_tile;  // the first block of the grid that works on this range
};

struct range_batch {
    uint32_t count;
    uint32_t tiles;       // the tiles of all ranges; a launch of fewer blocks goes over them in strides
    range_desc r[MAX_RANGES];
};

struct level_desc {
    const uint64_t* in;   // count hashes of the level below
    uint64_t count;
    uint64_t* out;        // ceil(count / FANOUT) hashes
    uint64_t first_block;
};

struct level_batch {
    uint32_t count;
    uint32_t reserved;
    level_desc d[MAX_RANGES];
};

// The index of the last entry whose first block is at most block: every thread of a block finds the same one.
template <typename T>
__device__ __forceinline__ uint32_t find_entry(const T* entries, uint32_t count, uint64_t block, uint64_t T::*first)
{
    uint32_t lo = 0, hi = count - 1;
    while (lo < hi) {
        const uint32_t mid = (lo + hi + 1) / 2;
        if (entries[mid].*first <= block)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

// A tile is TILE_LEAVES leaves (512 KiB) of a range, worked on by one block; blockDim.x must be 2 * TILE_LEAVES.
// A block takes tiles blockIdx.x, blockIdx.x + gridDim.x, ...: a grid of one block per tile runs at the memory's
// bandwidth, a smaller one leaves bandwidth to other work (a transfer's wire beside its digests).
//
// With leaves: two threads per leaf. XXH64 keeps four lanes, each fed every fourth 8-byte word; the even thread
// keeps lanes 1 and 2 (the first 16 bytes of each 32-byte stripe), the odd one lanes 3 and 4, so a warp's
// 16-byte loads fill whole 32-byte sectors, and the two meet through a shuffle at the end. With a destination the
// bytes are written as they are hashed, so a copy yields the digests of what it read. Without leaves: a plain
// copy. The fast paths need the source and destination 16-byte aligned; a source that is not is hashed bytewise
// (the host never asks to copy it).
__device__ __forceinline__ void copy_digest_tile(const range_batch& batch, const uint64_t tile)
{
    const range_desc& r = batch.r[find_entry(batch.r, batch.count, tile, &range_desc::first_tile)];
    const uint8_t* data = r.src;
    uint8_t* dst = r.dst;
    const uint64_t length = r.length;
    uint64_t* out = r.leaves;
    const uint64_t leaves = length == 0 ? 1 : (length + LEAF_BYTES - 1) / LEAF_BYTES;
    const uint64_t first = (tile - r.first_tile) * TILE_LEAVES;
    const bool aligned = ((uintptr_t)data & 15) == 0 && ((uintptr_t)dst & 15) == 0;

    if (out == nullptr) {
        if (!aligned)
            return;
        const uint64_t start = first * LEAF_BYTES;
        const uint64_t end = length - start < (uint64_t)TILE_LEAVES * LEAF_BYTES ? length : start + (uint64_t)TILE_LEAVES * LEAF_BYTES;
        const uint64_t step = 2 * TILE_LEAVES * 16;
        uint64_t at = start + threadIdx.x * 16ull;
        for (; at + 3 * step + 16 <= end; at += 4 * step) {
            uint4 v[4];
            #pragma unroll
            for (int k = 0; k < 4; ++k)
                v[k] = __ldg((const uint4*)(data + at + k * step));
            #pragma unroll
            for (int k = 0; k < 4; ++k)
                *(uint4*)(dst + at + k * step) = v[k];
        }
        for (; at + 16 <= end; at += step)
            *(uint4*)(dst + at) = __ldg((const uint4*)(data + at));
        if (threadIdx.x == 0 && end == length)
            for (uint64_t b = length & ~15ull; b < length; ++b)
                if (b >= start)
                    dst[b] = data[b];
        return;
    }

    const uint64_t leaf = first + threadIdx.x / 2;
    const int half = threadIdx.x & 1;
    const uint64_t at = leaf * LEAF_BYTES;
    if (!aligned) {
        if (half == 0 && leaf < leaves)
            out[leaf] = xxh64_bytes(data + at, length - at < LEAF_BYTES ? length - at : LEAF_BYTES, 0, false);
        return;
    }
    const uint32_t n = leaf < leaves ? (uint32_t)(length - at < LEAF_BYTES ? length - at : LEAF_BYTES) : 0;
    const uint32_t stripes = n / 32;
    const uint4* from = (const uint4*)(data + at) + half;
    uint64_t a = half == 0 ? P1 + P2 : 0, b = half == 0 ? P2 : 0 - P1;
    // The copy's writes go through shared memory, so that each warp writes whole 256-byte runs: this warp's 16
    // leaves x BATCH stripes, one padded row per leaf (rows 288 bytes apart: a quarter-warp's 16-byte stores
    // hit every bank once).
    __shared__ __align__(16) uint8_t rows[2 * TILE_LEAVES / 32][16][ROW];
    const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
    const uint64_t warp_at = (first + warp * 16ull) * LEAF_BYTES;
    for (uint32_t s = 0; s < LEAF_BYTES / 32; s += BATCH) {
        uint4 v[BATCH];
        #pragma unroll
        for (int k = 0; k < BATCH; ++k)
            if (s + k < stripes)
                v[k] = __ldg(from + 2 * (s + k));
        #pragma unroll
        for (int k = 0; k < BATCH; ++k)
            if (s + k < stripes) {
                if (dst != nullptr)
                    *(uint4*)(rows[warp][lane / 2] + k * 32 + half * 16) = v[k];
                a = xxh_round(a, ((uint64_t)v[k].y << 32) | v[k].x);
                b = xxh_round(b, ((uint64_t)v[k].w << 32) | v[k].z);
            }
        if (dst != nullptr) {
            __syncwarp();
            // Lane i writes bytes [16 (i % 16), +16) of the run of rows 2j + i / 16.
            #pragma unroll
            for (int j = 0; j < 8; ++j) {
                const int row = 2 * j + lane / 16, column = lane % 16;
                const uint64_t row_at = warp_at + (uint64_t)row * LEAF_BYTES;
                const uint64_t left = row_at < length ? length - row_at : 0;
                const uint32_t whole = left < LEAF_BYTES ? (uint32_t)left / 32 * 32 : LEAF_BYTES; // its bytes in full stripes
                if (s * 32 + column * 16 + 16 <= whole)
                    *(uint4*)(dst + row_at + s * 32 + column * 16) = *(const uint4*)(rows[warp][row] + column * 16);
            }
            __syncwarp();
        }
    }
    const uint64_t c = __shfl_down_sync(0xffffffffu, a, 1);
    const uint64_t d = __shfl_down_sync(0xffffffffu, b, 1);
    if (half == 0 && leaf < leaves) {
        const uint8_t* rest = data + at + stripes * 32;
        if (dst != nullptr)
            for (uint32_t k = stripes * 32; k < n; ++k)
                dst[at + k] = data[at + k];
        const uint64_t h = n >= 32 ? xxh_converge(a, b, c, d) : P5;
        out[leaf] = xxh64_finish(h + n, rest, data + at + n, true);
    }
}

extern "C" __global__ void __launch_bounds__(2 * TILE_LEAVES)
copy_digest_ranges(const __grid_constant__ range_batch batch)
{
    for (uint64_t tile = blockIdx.x; tile < batch.tiles; tile += gridDim.x)
        copy_digest_tile(batch, tile);
}

// One thread per group of FANOUT hashes of the level below, for every entry of the batch: entry i's groups are
// the threads of blocks [first_block, next entry's first_block).
extern "C" __global__ void digest_level_ranges(const __grid_constant__ level_batch batch)
{
    const level_desc& d = batch.d[find_entry(batch.d, batch.count, blockIdx.x, &level_desc::first_block)];
    const uint64_t group = (blockIdx.x - d.first_block) * blockDim.x + threadIdx.x;
    const uint64_t groups = (d.count + FANOUT - 1) / FANOUT;
    if (group >= groups)
        return;
    const uint64_t n = d.count - group * FANOUT < FANOUT ? d.count - group * FANOUT : FANOUT;
    d.out[group] = xxh64_words(d.in + group * FANOUT, n);
}

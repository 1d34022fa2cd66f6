// The block digest on the GPU: bit-for-bit the algorithm of BlockDigest.cs (src/NcclSwap.DataPlane).
//
//   leaves   XXH64 (seed 0) of each 4096-byte block of the data; the last block may be short; empty
//            data has one empty leaf.
//   levels   while more than one hash remains: XXH64 (seed 0) of each group of 512 consecutive hashes,
//            taken as little-endian 8-byte words.
//   digest   XXH64 (seed 0) of the 16 bytes root || length (both little-endian); done on the host.
//
// digest_leaves stages 128 leaves at a time through shared memory, so that global reads are coalesced
// 16-byte loads even though each thread hashes its own 4 KiB leaf; the last, partial tile and data that
// is not 16-byte aligned take a byte-wise path. Regenerate digest.ptx with native/build-ptx.sh.

#include <stdint.h>

#define LEAF_BYTES 4096
#define FANOUT 512
#define TILE_LEAVES 128
#define CHUNK 256
#define ROW (CHUNK + 16)  // padded row: a quarter-warp's 16-byte reads hit all 32 banks once

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

// XXH64 of len bytes at any alignment.
__device__ uint64_t xxh64_bytes(const uint8_t* p, uint64_t len, uint64_t seed)
{
    const uint8_t* end = p + len;
    uint64_t h;
    if (len >= 32) {
        const uint8_t* limit = end - 32;
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        do {
            v1 = xxh_round(v1, load64_bytes(p));
            v2 = xxh_round(v2, load64_bytes(p + 8));
            v3 = xxh_round(v3, load64_bytes(p + 16));
            v4 = xxh_round(v4, load64_bytes(p + 24));
            p += 32;
        } while (p <= limit);
        h = xxh_converge(v1, v2, v3, v4);
    } else {
        h = seed + P5;
    }
    h += len;
    while (p + 8 <= end) {
        h ^= xxh_round(0, load64_bytes(p));
        h = rotl64(h, 27) * P1 + P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)load32_bytes(p) * P1;
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

// One thread per leaf; blockDim.x must be TILE_LEAVES. out receives max(1, ceil(length / 4096)) hashes.
extern "C" __global__ void __launch_bounds__(TILE_LEAVES)
digest_leaves(const uint8_t* __restrict__ data, uint64_t length, uint64_t* __restrict__ out)
{
    __shared__ __align__(16) uint8_t tile[TILE_LEAVES * ROW];
    const uint64_t leaves = length == 0 ? 1 : (length + LEAF_BYTES - 1) / LEAF_BYTES;
    const uint64_t first = (uint64_t)blockIdx.x * TILE_LEAVES;
    const uint64_t leaf = first + threadIdx.x;
    const bool aligned = ((uintptr_t)data & 15) == 0;
    const bool full_tile = (first + TILE_LEAVES) * LEAF_BYTES <= length;

    if (aligned && full_tile) {
        const uint8_t* base = data + first * LEAF_BYTES;
        uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0 - P1;
        for (int c = 0; c < LEAF_BYTES / CHUNK; ++c) {
            // 128 leaves x 256 bytes: each warp reads two whole 256-byte runs.
            #pragma unroll
            for (int j = 0; j < CHUNK / 16; ++j) {
                const int e = j * TILE_LEAVES + threadIdx.x;
                const int l = e / (CHUNK / 16), part = e % (CHUNK / 16);
                const uint4 v = __ldg((const uint4*)(base + (uint64_t)l * LEAF_BYTES + c * CHUNK) + part);
                *(uint4*)(tile + l * ROW + part * 16) = v;
            }
            __syncthreads();
            const uint8_t* row = tile + threadIdx.x * ROW;
            #pragma unroll
            for (int s = 0; s < CHUNK / 32; ++s) {
                const uint4 a = *(const uint4*)(row + s * 32);
                const uint4 b = *(const uint4*)(row + s * 32 + 16);
                v1 = xxh_round(v1, ((uint64_t)a.y << 32) | a.x);
                v2 = xxh_round(v2, ((uint64_t)a.w << 32) | a.z);
                v3 = xxh_round(v3, ((uint64_t)b.y << 32) | b.x);
                v4 = xxh_round(v4, ((uint64_t)b.w << 32) | b.z);
            }
            __syncthreads();
        }
        out[leaf] = xxh_avalanche(xxh_converge(v1, v2, v3, v4) + LEAF_BYTES);
    } else if (leaf < leaves) {
        const uint64_t start = leaf * LEAF_BYTES;
        const uint64_t n = length - start < LEAF_BYTES ? length - start : LEAF_BYTES;
        out[leaf] = xxh64_bytes(data + start, n, 0);
    }
}

// One thread per group of FANOUT hashes of the level below.
extern "C" __global__ void digest_level(const uint64_t* __restrict__ in, uint64_t count, uint64_t* __restrict__ out)
{
    const uint64_t group = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const uint64_t groups = (count + FANOUT - 1) / FANOUT;
    if (group >= groups)
        return;
    const uint64_t n = count - group * FANOUT < FANOUT ? count - group * FANOUT : FANOUT;
    out[group] = xxh64_words(in + group * FANOUT, n);
}

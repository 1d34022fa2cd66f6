// Strided copies in one launch: packing tensor parts cut along a later dimension into a bucket (rows of a few
// hundred bytes, thousands of them, at a pitch), which the copy engines move row by row far below the memory's
// bandwidth. Each entry of a batch copies `rows` rows of `row_bytes` bytes from src + r * src_pitch to
// dst + r * dst_pitch. The work is cut into units of one row's CHUNK bytes at most; a warp copies a unit, 16 bytes a
// lane at a time where the entry's addresses, pitches and row length are 16-byte aligned, a byte a lane otherwise.
// Regenerate pack.ptx with native/build-ptx.sh.

#include <stdint.h>

#define CHUNK 16384          // bytes of a row one warp copies
#define WARPS 8              // warps (units) per block
#define MAX_STRIDED 480      // entries per launch: the batch travels as a kernel parameter (at most 32 KiB)

struct strided_desc
{
    uint64_t src, dst;
    uint64_t src_pitch, dst_pitch;
    uint64_t row_bytes, rows;
    uint64_t chunks;         // units per row: ceil(row_bytes / CHUNK)
    uint64_t first_block;    // the entry's first block in the grid
};

struct strided_batch
{
    uint32_t count;
    uint32_t pad;
    strided_desc d[MAX_STRIDED];
};

extern "C" __global__ void __launch_bounds__(WARPS * 32) copy_strided(const __grid_constant__ strided_batch batch)
{
    // The entry whose blocks hold this one: the last whose first block is not after it.
    uint32_t low = 0, high = batch.count - 1;
    while (low < high)
    {
        uint32_t mid = (low + high + 1) / 2;
        if (batch.d[mid].first_block <= blockIdx.x)
            low = mid;
        else
            high = mid - 1;
    }
    const strided_desc& d = batch.d[low];
    const uint64_t unit = (blockIdx.x - d.first_block) * WARPS + threadIdx.x / 32;
    if (unit >= d.rows * d.chunks)
        return;
    const uint32_t lane = threadIdx.x % 32;
    const uint64_t row = unit / d.chunks, start = unit % d.chunks * CHUNK;
    const uint64_t end = min(start + (uint64_t)CHUNK, d.row_bytes);
    const uint8_t* from = (const uint8_t*)(d.src + row * d.src_pitch);
    uint8_t* to = (uint8_t*)(d.dst + row * d.dst_pitch);
    if (((d.src | d.dst | d.src_pitch | d.dst_pitch | d.row_bytes) & 15) == 0)
    {
        for (uint64_t at = start + lane * 16; at < end; at += 32 * 16)
            *(uint4*)(to + at) = *(const uint4*)(from + at);
    }
    else
    {
        for (uint64_t at = start + lane; at < end; at += 32)
            to[at] = from[at];
    }
}

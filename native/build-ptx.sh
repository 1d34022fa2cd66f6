#!/usr/bin/env bash
# Regenerates the committed PTX from the CUDA sources in native/kernels; needs nvcc (CUDA 12.x or 13.x).
# PTX for compute_80 runs on Ampere and every later GPU: the driver JIT-compiles it at load time.
set -euo pipefail
cd "$(dirname "$0")"
for source in kernels/*.cu; do
  name=$(basename "$source" .cu)
  nvcc -ptx -arch=compute_80 -O3 -o "ptx/$name.ptx" "$source"
  echo "ptx/$name.ptx"
done
# Resource use on Hopper (registers, shared memory, spills), for the record:
for source in kernels/*.cu; do nvcc -cubin -arch=sm_90 -O3 -Xptxas -v -o /dev/null "$source" 2>&1 | grep -E 'Function properties|Used|spill' || true; done

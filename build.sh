#!/usr/bin/env bash
# Build, test and package nccl-swap.
#
#   ./build.sh test            all tests on this machine, C# and Python (GPU tests report as skipped where there is no GPU)
#   ./build.sh publish         the agent as one NativeAOT binary: artifacts/bin/nccl-swap
#   ./build.sh gpu-test        package the GPU suite (self-contained, no .NET needed) and the agent into
#                              artifacts/gpu/, for a GPU machine
#   ./build.sh gpu-test DIR    on the GPU machine: run `nccl-swap doctor --bench`, the suite packaged in DIR, the Python
#                              client's GPU tests (PyTorch), the demo (CUDA, then host) and the GPU benchmarks of perf/
#                              (digest, checkpoint load, transfer plan over NCCL, co-located path), logging to $OUT (or DIR/logs)
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

# Sums dotnet test's per-project "Passed: N", "Failed: N", "Skipped: N" and unittest's "Ran N tests" /
# "OK (skipped=N)" / "FAILED (failures=N, errors=N)" into one closing line.
summarize() {
  awk '/^ +(Passed|Failed|Skipped): [0-9]+$/ { n[$1] += $2 }
       /^Ran [0-9]+ tests?/ { ran += $2 }
       /^(OK|FAILED)( \(|$)/ {
         if (match($0, /failures=[0-9]+/)) bad += substr($0, RSTART + 9, RLENGTH - 9)
         if (match($0, /errors=[0-9]+/)) bad += substr($0, RSTART + 7, RLENGTH - 7)
         if (match($0, /skipped=[0-9]+/)) skip += substr($0, RSTART + 8, RLENGTH - 8) }
       END { printf "tests: %d passed, %d failed, %d skipped\n",
               n["Passed:"] + ran - bad - skip, n["Failed:"] + bad, n["Skipped:"] + skip }' "$1"
}

case "${1:-}" in
  test)
    log=$(mktemp)
    status=0
    dotnet test nccl-swap.sln -c Release --logger "console;verbosity=normal" --blame-hang-timeout 10m 2>&1 | tee "$log" || status=$?
    echo "== Python client (src/python, unittest; against the agent just built)"
    (cd src/python && NCCL_SWAP_AGENT="$PWD/../NcclSwap.Agent/bin/Release/net10.0/linux-x64/nccl-swap" python3 -m unittest discover -s tests -t . -v) 2>&1 | tee -a "$log" || status=$?
    summarize "$log"
    rm -f "$log"
    exit $status
    ;;
  publish)
    dotnet publish src/NcclSwap.Agent/NcclSwap.Agent.csproj -c Release -r linux-x64 -o artifacts/bin
    rm -f artifacts/bin/*.dbg
    ls -l artifacts/bin/nccl-swap
    ;;
  gpu-test)
    if [ $# -ge 2 ]; then
      dir=$(cd "$2" && pwd)
      logs=${OUT:-$dir/logs}
      mkdir -p "$logs"
      work=$(mktemp -d)
      tar -xJf "$dir/gpu-tests.tar.xz" -C "$work"
      echo "== nccl-swap doctor --bench" | tee "$logs/doctor.log"
      "$dir/nccl-swap" doctor --bench 2>&1 | tee -a "$logs/doctor.log"
      echo "== GPU test suite" | tee "$logs/gpu-tests.log"
      status=0
      "$work/suite/NcclSwap.Gpu.Tests" -noColor -reporter verbose 2>&1 | tee -a "$logs/gpu-tests.log" || status=$?
      echo "== Python client on the GPU (PyTorch, CUDA IPC; the engine in the loop), against the agent in DIR" | tee "$logs/python-gpu.log"
      (cd src/python && NCCL_SWAP_AGENT="$dir/nccl-swap" python3 -m unittest tests.test_gpu tests.test_engine_loop -v) 2>&1 | tee -a "$logs/python-gpu.log" || status=$?
      echo "== nccl-swap demo (CUDA backend), then the same on the host backend" | tee "$logs/demo.log"
      "$dir/nccl-swap" demo 2>&1 | tee -a "$logs/demo.log" || status=$?
      "$dir/nccl-swap" demo --backend host 2>&1 | tee -a "$logs/demo.log" || status=$?
      echo "== perf: gpu-digest, load" | tee "$logs/perf.log"
      "$work/suite/NcclSwap.Perf" gpu-digest 8 2>&1 | tee -a "$logs/perf.log" || status=$?
      "$work/suite/NcclSwap.Perf" load 8 8 2>&1 | tee -a "$logs/perf.log" || status=$?
      echo "== perf: one destination's share of a transfer plan over NCCL (Qwen3-235B-A22B shapes, TP8; Llama-3-8B, TP1)" | tee "$logs/transfer.log"
      "$work/suite/NcclSwap.Perf" transfer perf/layouts/qwen3-235b-a22b.json --tp 8 --layers 10 2>&1 | tee -a "$logs/transfer.log" || status=$?
      "$work/suite/NcclSwap.Perf" transfer perf/layouts/llama-3-8b.json --tp 1 2>&1 | tee -a "$logs/transfer.log" || status=$?
      echo "== perf: co-located GPU path against the copy limit and PyTorch peers (perf/colocated.py)" | tee "$logs/colocated.log"
      python3 perf/colocated.py "$dir/nccl-swap" 2>&1 | tee -a "$logs/colocated.log" || status=$?
      grep -E 'Total:|\[FAIL\]' "$logs/gpu-tests.log" || true
      exit $status
    fi
    rm -rf artifacts/gpu
    dotnet publish tests/NcclSwap.Gpu.Tests/NcclSwap.Gpu.Tests.csproj -c Release -r linux-x64 --self-contained -o artifacts/gpu/suite
    dotnet publish perf/NcclSwap.Perf/NcclSwap.Perf.csproj -c Release -r linux-x64 --self-contained -o artifacts/gpu/suite
    tar -cJf artifacts/gpu/gpu-tests.tar.xz -C artifacts/gpu suite
    rm -rf artifacts/gpu/suite
    dotnet publish src/NcclSwap.Agent/NcclSwap.Agent.csproj -c Release -r linux-x64 -o artifacts/gpu/agent
    mv artifacts/gpu/agent/nccl-swap artifacts/gpu/nccl-swap
    rm -rf artifacts/gpu/agent
    ls -l artifacts/gpu
    ;;
  *)
    usage
    exit 2
    ;;
esac

#!/usr/bin/env bash
# On a machine with two GPUs, after ./build.sh gpu-test here and with artifacts/gpu carried there:
#   bash perf/two-gpus/run.sh   (logs under $OUT)
# The NCCL and transfer GPU tests, then nccl-swap transfer between GPU 0 (trainer) and GPU 1 (engine): a 265 MB
# layout (hashes to compare with the same run on the host backend), Llama-3-8B TP1 for the rate, and the engine
# publishing to a serve agent.
set -u
A=$PWD/artifacts/gpu/nccl-swap
w=$(mktemp -d); tar -xJf artifacts/gpu/gpu-tests.tar.xz -C $w
nvidia-smi --query-gpu=index,name --format=csv,noheader
nvidia-smi topo -m | head -4
$w/suite/NcclSwap.Gpu.Tests -noColor -reporter verbose -class NcclSwap.Gpu.Tests.NcclTests -class NcclSwap.Gpu.Tests.TransferGpuTests > $OUT/gpu-tests.log 2>&1
grep -E "Total:|\[FAIL\]|\[SKIP\]" $OUT/gpu-tests.log
sed 's/29517/29531/' perf/two-gpus/group.json > /tmp/g1.json
run2() { # layout tp versions extra...
  local g=$1; shift
  $A transfer --group $g --member 0 "$@" > $OUT/m0.log 2>&1 &
  local p=$!
  $A transfer --group $g --member 1 "$@" 2>&1 | tee -a $OUT/m1.log
  wait $p; echo "member 0 exit $?"; tail -3 $OUT/m0.log
}
echo "== mid layout (expect hashes 0bf820ce3fe90b27, 577a20cdff00f27e)"
run2 /tmp/g1.json --layout perf/two-gpus/mid.json --tp 1 --versions 2 --backend cuda
echo "== Llama-3-8B TP1, 4 versions"
sed 's/29517/29532/' perf/two-gpus/group.json > /tmp/g2.json
run2 /tmp/g2.json --layout perf/layouts/llama-3-8b.json --tp 1 --versions 4 --backend cuda
echo "== engine publishes to a serve agent on GPU 1"
mkdir -p /tmp/ag
NCCL_SWAP_Agent__SocketPath=/tmp/ag/agent.sock NCCL_SWAP_Agent__StateDirectory=/tmp/ag/state NCCL_SWAP_Agent__StagingDirectory=/tmp/ag/staging \
NCCL_SWAP_Agent__Backend=cuda NCCL_SWAP_Agent__Roles__Users__0=publisher,consumer,operator $A serve > $OUT/serve.log 2>&1 &
sp=$!
for i in $(seq 100); do [ -S /tmp/ag/agent.sock ] && break; sleep 0.1; done
sed 's/29517/29533/' perf/two-gpus/group.json > /tmp/g3.json
$A transfer --group /tmp/g3.json --member 0 --layout perf/two-gpus/mid.json --tp 1 --versions 2 --backend cuda > $OUT/p0.log 2>&1 &
p=$!
$A transfer --group /tmp/g3.json --member 1 --layout perf/two-gpus/mid.json --tp 1 --versions 2 --backend cuda --agent /tmp/ag/agent.sock --weight-set mid 2>&1 | tee $OUT/p1.log
wait $p; echo "member 0 exit $?"
$A audit show --log /tmp/ag/state/audit.jsonl | tail -4
kill $sp; wait $sp

#!/usr/bin/env bash
# On a machine with two GPUs, after ./build.sh gpu-test here and with artifacts/gpu carried there:
#   bash perf/two-gpus/run.sh   (logs under $OUT)
# 1. The NCCL and transfer GPU tests with two GPUs; two processes page-locking one shared region (register-twice.py).
# 2. Raw NCCL between the GPUs (NcclSwap.Perf nccl), then the transfer benchmark with the source on GPU 0 and the
#    destination on GPU 1: Llama-3-8B TP1, and Qwen3-235B-A22B layers as a TP8 engine's destination 0.
# 3. nccl-swap transfer, trainer on GPU 0, engine on GPU 1: hashes of a 265 MB layout (to compare with the host run),
#    then the engine publishing into a serve agent on GPU 1 with a flip and a copy-in consumer that check every read
#    (host memory, then on GPU 1 through the Python client); an agent with its staging on disk warning at start.
# 4. Faults with those consumers: the engine SIGKILLed while versions stream, the engine stopped (SIGSTOP) past the
#    group's deadline, the agent SIGKILLed; each consumer must still serve whole versions only (torn=0).
# 5. Llama-3-8B end to end through the agent.
# BACKEND=host A=PATH-TO-nccl-swap runs parts 3 and 4 on the host backend (a check of the script without GPUs).
set -u
OUT=${OUT:-$PWD/two-gpus-logs}; mkdir -p $OUT
B=${BACKEND:-cuda}
A=${A:-$PWD/artifacts/gpu/nccl-swap}
now() { date +%s.%N; }
since() { awk "BEGIN { printf \"%.1f\", $(now) - $1 }"; }

if [ $B = cuda ]; then
w=$(mktemp -d); tar -xJf artifacts/gpu/gpu-tests.tar.xz -C $w
P=$w/suite/NcclSwap.Perf
nvidia-smi --query-gpu=index,name --format=csv,noheader
nvidia-smi topo -m | head -4
echo "== 1. the GPU test suite with two GPUs"
timeout 400 $w/suite/NcclSwap.Gpu.Tests -noColor -reporter verbose > $OUT/gpu-tests.log 2>&1
grep -E "Total:|\[FAIL\]|\[SKIP\]" $OUT/gpu-tests.log
echo "== 1b. two processes page-lock one shared region"
timeout 120 python3 perf/two-gpus/register-twice.py 2>&1 | tee $OUT/register-twice.log

echo "== 2. raw NCCL between the GPUs, 1 GiB"
timeout 120 $P nccl --gib 1 2>&1 | tee $OUT/nccl.log
echo "== 2b. transfer benchmark: Llama-3-8B TP1, source GPU 0, destination GPU 1"
timeout 300 $P transfer perf/layouts/llama-3-8b.json --tp 1 --gpus 2 --runs 3 2>&1 | tee $OUT/transfer-llama.log
echo "== 2c. transfer benchmark: Qwen3-235B-A22B layers 0..12, TP8 destination 0 on GPU 1"
timeout 300 $P transfer perf/layouts/qwen3-235b-a22b.json --tp 8 --gpus 2 --layers 13 --runs 3 2>&1 | tee $OUT/transfer-qwen.log
fi

group() { sed "s/29517/$1/; s/\"timeout_seconds\": 60/\"timeout_seconds\": ${2:-60}/" perf/two-gpus/group.json > /tmp/g$1.json; echo /tmp/g$1.json; }
echo "== 3. mid layout, no agent (expect hashes 0bf820ce3fe90b27, 577a20cdff00f27e)"
g=$(group 29531)
$A transfer --group $g --member 0 --layout perf/two-gpus/mid.json --tp 1 --versions 2 --backend $B > $OUT/mid-m0.log 2>&1 &
p=$!
timeout 120 $A transfer --group $g --member 1 --layout perf/two-gpus/mid.json --tp 1 --versions 2 --backend $B 2>&1 | tee $OUT/mid-m1.log
wait $p; echo "member 0 exit $?"; cat $OUT/mid-m0.log

# The agent serves GPU 1 (its device 0); consumers read from stdin until "stop".
agent() { # NAME
  rm -rf /tmp/$1; mkdir -p /tmp/$1
  CUDA_VISIBLE_DEVICES=1 NCCL_SWAP_Agent__SocketPath=/tmp/$1/agent.sock NCCL_SWAP_Agent__StateDirectory=/tmp/$1/state \
    NCCL_SWAP_Agent__StagingDirectory=/dev/shm/$1 NCCL_SWAP_Agent__Backend=$B NCCL_SWAP_Agent__Roles__Users__0=publisher,consumer,operator \
    $A serve > $OUT/$1-serve.log 2>&1 &
  echo $! > /tmp/$1/pid
  for i in $(seq 200); do [ -S /tmp/$1/agent.sock ] && break; sleep 0.1; done
}
consumers() { # AGENT LAYOUT [gpu]: a flip and a copy-in consumer of weight set m, in host memory (demo-peer) or on GPU 1 (Python)
  for mode in flip copy-in; do
    mkfifo /tmp/$1/$mode.in
    if [ "${3:-}" = gpu ]; then
      CUDA_VISIBLE_DEVICES=1 python3 perf/two-gpus/gpu_consumer.py /tmp/$1/agent.sock m "$2" $mode < /tmp/$1/$mode.in > $OUT/$1-$mode.log 2>&1 &
    else
      $A demo-peer consumer /tmp/$1/agent.sock m "layout:$2" $mode < /tmp/$1/$mode.in > $OUT/$1-$mode.log 2>&1 &
    fi
    echo $! > /tmp/$1/$mode.pid
  done
  exec 7>/tmp/$1/flip.in 8>/tmp/$1/copy-in.in
  for i in $(seq 600); do grep -q ready $OUT/$1-flip.log 2>/dev/null && grep -q ready $OUT/$1-copy-in.log 2>/dev/null && break; sleep 0.1; done
}
stop_consumers() { # AGENT
  echo stop >&7; echo stop >&8; exec 7>&- 8>&-
  for mode in flip copy-in; do wait $(cat /tmp/$1/$mode.pid); echo "$mode consumer exit $?: $(grep -c '^switch' $OUT/$1-$mode.log) switches, $(grep summary $OUT/$1-$mode.log)"; done
}
wait_for() { # FILE PATTERN SECONDS
  for i in $(seq $(($3 * 10))); do grep -q "$2" $1 2>/dev/null && return 0; sleep 0.1; done; return 1
}

if [ $B = cuda ]; then
  echo "== 3a. an agent whose staging directory is on disk ($(stat -f -c %T /tmp)) says so at start (and serves on)"
  NCCL_SWAP_Agent__SocketPath=/tmp/disk/agent.sock NCCL_SWAP_Agent__StateDirectory=/tmp/disk/state NCCL_SWAP_Agent__StagingDirectory=/tmp/disk/staging \
    NCCL_SWAP_Agent__Backend=cuda NCCL_SWAP_Agent__Roles__Users__0=publisher timeout 10 $A serve > $OUT/disk-serve.log 2>&1
  echo "exit $? (124: still serving after 10 s)"; grep -m1 -i "staging directory" $OUT/disk-serve.log
fi
echo "== 3b. mid layout through a serve agent on GPU 1 with a flip and a copy-in consumer, 3 versions"
agent e2e; consumers e2e perf/two-gpus/mid.json
g=$(group 29533)
$A transfer --group $g --member 0 --layout perf/two-gpus/mid.json --tp 1 --versions 3 --backend $B > $OUT/e2e-m0.log 2>&1 &
p=$!
timeout 180 $A transfer --group $g --member 1 --layout perf/two-gpus/mid.json --tp 1 --versions 3 --backend $B --agent /tmp/e2e/agent.sock --weight-set m 2>&1 | tee $OUT/e2e-m1.log
wait $p; echo "member 0 exit $?"; cat $OUT/e2e-m0.log
sleep 1; stop_consumers e2e
$A audit show --log /tmp/e2e/state/audit.jsonl | tail -3

if [ $B = cuda ]; then
  echo "== 3c. the same with GPU consumers on GPU 1 (the Python client's GpuConsumer, checking every version on the GPU), 3 versions"
  agent gpu; consumers gpu perf/two-gpus/mid.json gpu
  g=$(group 29538)
  $A transfer --group $g --member 0 --layout perf/two-gpus/mid.json --tp 1 --versions 3 --backend $B > $OUT/gpu-m0.log 2>&1 &
  p=$!
  timeout 180 $A transfer --group $g --member 1 --layout perf/two-gpus/mid.json --tp 1 --versions 3 --backend $B --agent /tmp/gpu/agent.sock --weight-set m 2>&1 | tee $OUT/gpu-m1.log
  wait $p; echo "member 0 exit $?"
  sleep 1; stop_consumers gpu
  grep -E "activated|staging in" $OUT/gpu-serve.log
fi

# An agent NAME on GPU 1 with its two consumers, then both members streaming VERSIONS versions of the 265 MB layout
# (deadline 10 s), the engine publishing to that agent; returns once the engine has published version 3 (p0, p1 set).
stream_versions() { # NAME PORT VERSIONS
  local g; g=$(group $2 10)
  agent $1; consumers $1 perf/two-gpus/mid.json
  $A transfer --group $g --member 0 --layout perf/two-gpus/mid.json --tp 1 --versions $3 --backend $B > $OUT/$1-m0.log 2>&1 &
  p0=$!
  $A transfer --group $g --member 1 --layout perf/two-gpus/mid.json --tp 1 --versions $3 --backend $B --agent /tmp/$1/agent.sock --weight-set m > $OUT/$1-m1.log 2>&1 &
  p1=$!
  wait_for $OUT/$1-m1.log "version 3:" 120
}

echo "== 4a. faults: the engine (rank 1) SIGKILLed while versions stream; deadline 10 s"
stream_versions kill 29534 40
t=$(now); kill -9 $p1
wait_for $OUT/kill-m0.log "failed" 60 && echo "member 0 reported the failure $(since $t) s after the kill (polled every 0.1 s):"
grep -m1 failed $OUT/kill-m0.log
kill $p0; wait $p0 2>/dev/null
sleep 2; stop_consumers kill

echo "== 4b. faults: the engine (rank 1) stopped with SIGSTOP past the deadline (10 s)"
stream_versions stall 29535 40
t=$(now); kill -STOP $p1
wait_for $OUT/stall-m0.log "failed" 60 && echo "member 0 reported the failure $(since $t) s after the stop (deadline 10 s):"
grep -m1 failed $OUT/stall-m0.log
kill $p0; wait $p0 2>/dev/null; kill -9 $p1
sleep 2; stop_consumers stall

echo "== 4c. faults: the engine's agent SIGKILLed while versions stream"
stream_versions dead 29536 8
kill -9 $(cat /tmp/dead/pid)
wait $p1; echo "member 1 exit $?"; grep -m2 failed $OUT/dead-m1.log
wait $p0; echo "member 0 exit $?"
sleep 2; stop_consumers dead

[ $B = cuda ] || { for a in e2e kill stall dead; do kill $(cat /tmp/$a/pid) 2>/dev/null; done; wait; exit 0; }
echo "== 5. Llama-3-8B TP1 end to end through the agent on GPU 1, 3 versions"
agent llama; consumers llama perf/layouts/llama-3-8b.json
g=$(group 29537)
$A transfer --group $g --member 0 --layout perf/layouts/llama-3-8b.json --tp 1 --versions 3 --backend $B > $OUT/llama-m0.log 2>&1 &
p=$!
timeout 300 $A transfer --group $g --member 1 --layout perf/layouts/llama-3-8b.json --tp 1 --versions 3 --backend $B --agent /tmp/llama/agent.sock --weight-set m 2>&1 | tee $OUT/llama-m1.log
wait $p; echo "member 0 exit $?"; cat $OUT/llama-m0.log
sleep 3; stop_consumers llama
for a in e2e gpu kill stall dead llama; do kill $(cat /tmp/$a/pid) 2>/dev/null; done; wait
rm -rf /dev/shm/e2e /dev/shm/gpu /dev/shm/kill /dev/shm/stall /dev/shm/dead /dev/shm/llama

#!/usr/bin/env bash
# The GPU host's checks, in one run (the device time is scarce): the connector's GPU path
# through a real daemon (also across a kill -9 of every worker), host-to-device copies from a
# live worker's registered arena, the layer-wise load, then the same-host bench on that host's
# CPUs. Each step has its own limit and writes its output to $OUT (or ./gpu-checks); a step
# that fails does not stop the others.
#
#   bash scripts/gpu_checks.sh            # needs torch with CUDA and lmcached's dependencies
set -u
out=${OUT:-gpu-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its output, report its status
    local name=$1 limit=$2
    shift 2
    echo "=== $name"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    local rc=$?
    cat "$out/$name.txt"
    echo "=== $name: exit $rc"
}

{ nvidia-smi -L; nproc; free -g | sed -n 2p; $py -c 'import torch; print(torch.__version__)'; } 2>&1

step connector_llama8b 150 $py scripts/gpu_connector_path.py --repeats 5
step connector_bench 90 $py scripts/gpu_connector_path.py --model bench --tokens 2048 --repeats 5
step connector_kill9 120 $py scripts/gpu_connector_path.py --repeats 3 --kill-workers
step arena_h2d_file 60 $py scripts/gpu_arena_h2d.py

# The same measurement over a live worker's arena (its first 32 MiB after the header).
runtime=$(mktemp -d /tmp/lmgpu-XXXXXX)
printf 'port: 0\nnum_workers: 2\nmax_local_cpu_size: 1GiB\nmetrics_port: null\nruntime_dir: %s\n' \
    "$runtime" >"$runtime/lmcached.yaml"
$py -m lmcached start --config "$runtime/lmcached.yaml" >"$out/daemon.txt" 2>&1 &
daemon=$!
for _ in $(seq 60); do
    arena=$(ls /dev/shm/lmcached-arena-* 2>/dev/null | head -1)
    [ -n "$arena" ] && break
    sleep 0.5
done
echo "live arena: ${arena:-none}"
step arena_h2d_live 60 $py scripts/gpu_arena_h2d.py --arena "$arena"
kill "$daemon"
wait "$daemon"
rm -rf "$runtime"

step kv_load 60 $py scripts/gpu_kv_load.py --repeats 10
step bench 240 $py -m lmcached bench --workload throughput,lookup \
    --sizes 256KiB,2MiB,32MiB --clients 1,4 --transports shm,ipc

#!/usr/bin/env bash
# Several JAX processes on this machine, joined by jax.distributed on localhost: the multi-host
# path of a TPU pod, proven on one CPU host. Each process gets DEVICES CPU devices of its own.
#
#   bash launch/local_multihost.sh N [train overrides ...]     # N processes, all in the foreground
#   DEVICES=4 PORT=12355 LOG_DIR=runs/multihost_logs bash launch/local_multihost.sh 2 phase1.steps=4
#
# Process i runs `python -m safemoe_jax.train` with JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT,
# JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i and its log in LOG_DIR/process_i.log (process 0's is also
# printed). The script exits with the first non-zero status of any process (0 when all succeed);
# SIGTERM / SIGINT to the script is passed on to every process.
set -uo pipefail

N=${1:?usage: local_multihost.sh N [train overrides ...]}
shift
DEVICES=${DEVICES:-4}
PORT=${PORT:-$((12000 + RANDOM % 20000))}
LOG_DIR=${LOG_DIR:-runs/multihost_logs}
PYTHON=${PYTHON:-python}
mkdir -p "$LOG_DIR"

pids=()
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < N; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i" \
    XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES ${XLA_FLAGS:-}" \
    JAX_PLATFORMS=cpu "$PYTHON" -m safemoe_jax.train "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done
echo "started $N processes x $DEVICES devices (coordinator 127.0.0.1:$PORT): ${pids[*]}; logs in $LOG_DIR"

status=0
for pid in "${pids[@]}"; do
  while true; do
    wait "$pid"; s=$?
    # wait returns > 128 when a trapped signal interrupts it; the process may still be running
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    break
  done
  if (( s != 0 && status == 0 )); then status=$s; fi
done
cat "$LOG_DIR/process_0.log"
exit "$status"

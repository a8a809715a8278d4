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
# SIGTERM / SIGINT to the script is passed on to every process. When one process fails, the others
# are stopped after GRACE seconds (default 60) rather than left waiting for it.
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

# Wait for all. A process that fails leaves the others waiting in a collective for ever (JAX
# does not notice a peer that exited between steps), so once one exits non-zero the others get
# GRACE seconds to end by themselves (a SIGTERM on one process stops all at the same step), then
# SIGTERM, then after GRACE more SIGKILL.
GRACE=${GRACE:-60}
status=0
failed_at=
left=("${pids[@]}")
while ((${#left[@]})); do
  still=()
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ " ${left[*]} " == *" $pid "* ]] || continue
    if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
    wait "$pid"; s=$?
    if (( s != 0 )); then
      if (( status == 0 )); then status=$s; fi
      if [[ -z $failed_at ]]; then
        failed_at=$SECONDS
        echo "process $i exited with status $s; the others get ${GRACE}s to stop" >&2
      fi
    fi
  done
  left=("${still[@]}")
  ((${#left[@]})) || break
  if [[ -n $failed_at ]]; then
    waited=$((SECONDS - failed_at))
    if (( waited >= 2 * GRACE )); then
      echo "still running after $((2 * GRACE))s: SIGKILL to ${left[*]}" >&2
      kill -s KILL "${left[@]}" 2>/dev/null
    elif (( waited >= GRACE )) && [[ -z ${termed:-} ]]; then
      termed=1
      echo "still running after ${GRACE}s: SIGTERM to ${left[*]}" >&2
      kill -s TERM "${left[@]}" 2>/dev/null
    fi
  fi
  sleep 0.5 & wait $!  # wakes for a trapped signal too
done
cat "$LOG_DIR/process_0.log"
exit "$status"

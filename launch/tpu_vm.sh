#!/usr/bin/env bash
# Cloud TPU VM slice: create it, copy this project to every worker, install it with the `tpu`
# extra, and run `python -m safemoe_jax.train` on every worker at once (multi-host).
#
#   bash launch/tpu_vm.sh create                     # the slice (ACCELERATOR, ZONE, TPU_NAME)
#   bash launch/tpu_vm.sh copy                       # this checkout -> ~/safemoe_jax on all workers
#   bash launch/tpu_vm.sh install                    # venv + pip install -e '.[tpu]' on all workers
#   bash launch/tpu_vm.sh train [key=value ...]      # the config on all workers, in the background
#   bash launch/tpu_vm.sh logs | status | ssh | delete
#   bash launch/tpu_vm.sh all [key=value ...]        # create, copy, install, train
#
#   DRY_RUN=1 bash launch/tpu_vm.sh all              # print the commands, run nothing
#
# Settings (environment):
#   TPU_NAME     safemoe
#   ACCELERATOR  v5litepod-8 (v5e, 8 chips, 1 host); v5p-8 (4 chips), v6e-8, v5litepod-16 (2 hosts)...
#   ZONE         a zone that has the accelerator, e.g. us-west4-a (v5e), us-east5-a (v5p),
#                us-east5-b (v6e)
#   RUNTIME      TPU VM software version; default chosen from ACCELERATOR
#   CONFIG       configs/llama31_8b_tpu.yaml
#   SPOT=1       a Spot (preemptible) slice; training resumes from its checkpoints when re-run
#   HF_TOKEN     passed to the workers for gated Hub models (Llama) and datasets
#
# Multi-host: every worker runs the same command; safemoe_jax calls jax.distributed.initialize()
# when TPU_WORKER_HOSTNAMES lists several workers (set here from the slice's endpoints) and each
# process reads its own rows of every global batch. Check memory first, without a TPU:
#   python -m safemoe_jax.bench aot --config "$CONFIG" --topology v5e:2x4
# After a preemption or a crash, `train` again resumes from the latest checkpoint in output_dir
# (on the workers' disks; on a multi-host slice give output_dir a shared filesystem path).
set -euo pipefail

TPU_NAME=${TPU_NAME:-safemoe}
ACCELERATOR=${ACCELERATOR:-v5litepod-8}
ZONE=${ZONE:-us-west4-a}
CONFIG=${CONFIG:-configs/llama31_8b_tpu.yaml}
REMOTE_DIR=${REMOTE_DIR:-safemoe_jax}
if [[ -z "${RUNTIME:-}" ]]; then
  case "$ACCELERATOR" in
    v5litepod-*|v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
    v4-*) RUNTIME=tpu-ubuntu2204-base ;;
    *) echo "set RUNTIME for accelerator $ACCELERATOR" >&2; exit 2 ;;
  esac
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

run() {  # print (secrets masked), then run unless DRY_RUN=1
  local line
  line=$(printf ' %q' "$@")
  [[ -n "${HF_TOKEN:-}" ]] && line=${line//"$HF_TOKEN"/***}
  echo "+$line"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then "$@"; fi
}

on_all() {  # a shell command on every worker of the slice
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

worker_hosts() {  # comma-separated internal IPs of the workers
  if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "10.0.0.2,10.0.0.3"; return; fi
  gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" \
    --format='value(networkEndpoints[].ipAddress)' | tr ';' ','
}

create() {
  local extra=()
  [[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR" --version "$RUNTIME" "${extra[@]}"
}

copy() {
  local tgz=/tmp/safemoe_jax_src.tgz
  run tar -C "$HERE" -czf "$tgz" --exclude=.venv --exclude=.git --exclude=runs \
    --exclude='*.egg-info' --exclude=__pycache__ .
  run gcloud compute tpus tpu-vm scp "$tgz" "$TPU_NAME:~/safemoe_jax_src.tgz" --zone "$ZONE" \
    --worker=all
  on_all "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf ~/safemoe_jax_src.tgz"
}

install() {
  on_all "cd ~/$REMOTE_DIR && python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip && \
~/venv/bin/pip install -q -e '.[tpu]' && ~/venv/bin/python -c 'import jax; print(jax.devices())'"
}

train() {
  local hosts overrides=""
  hosts=$(worker_hosts)
  for o in "$@"; do overrides+=" $(printf '%q' "$o")"; done
  local env=""
  [[ -n "${HF_TOKEN:-}" ]] && env+="export HF_TOKEN=$HF_TOKEN; "
  [[ "$hosts" == *,* ]] && env+="export TPU_WORKER_HOSTNAMES=$hosts; "
  on_all "${env}cd ~/$REMOTE_DIR && nohup ~/venv/bin/python -m safemoe_jax.train \
--config $CONFIG$overrides > ~/train.log 2>&1 < /dev/null &"
  echo "training started on every worker of $TPU_NAME; follow with: bash launch/tpu_vm.sh logs"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  create) create ;;
  copy) copy ;;
  install) install ;;
  train) train "$@" ;;
  all) create; copy; install; train "$@" ;;
  logs) run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 \
          --command "tail -n 50 -f ~/train.log" ;;
  status) on_all "pgrep -af safemoe_jax.train || echo 'not running'; tail -n 3 ~/train.log" ;;
  ssh) run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="${WORKER:-0}" ;;
  delete) run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet ;;
  *) sed -n '2,30p' "$0"; [[ "$cmd" == help ]] || exit 2 ;;
esac

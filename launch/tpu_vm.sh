#!/usr/bin/env bash
# Cloud TPU VM slice: create it, copy this project to every worker, install it with the `tpu`
# extra in a Python >= 3.11 environment, and run `python -m safemoe_jax.train` on every worker at
# once (multi-host).
#
#   bash launch/tpu_vm.sh create                     # the slice (ACCELERATOR, ZONE, TPU_NAME)
#   bash launch/tpu_vm.sh copy                       # this checkout -> ~/safemoe_jax on all workers
#   bash launch/tpu_vm.sh install                    # uv + Python $PYTHON_VERSION venv + '.[tpu]' on all workers
#   bash launch/tpu_vm.sh train [key=value ...]      # the config on all workers, in the background
#   bash launch/tpu_vm.sh logs | status | ssh | delete
#   bash launch/tpu_vm.sh all [key=value ...]        # create, copy, install, train
#   SPOT=1 OUTPUT_DIR=gs://B/P bash launch/tpu_vm.sh watch [key=value ...]
#                                                    # all, then after each preemption: delete the
#                                                    # SUSPENDED queued resource, create it again,
#                                                    # copy, install, train (resumes from OUTPUT_DIR)
#
#   DRY_RUN=1 bash launch/tpu_vm.sh all              # print the commands, run nothing
#
# Settings (environment):
#   TPU_NAME        safemoe
#   ACCELERATOR     v5litepod-8 (v5e, 8 chips, 1 host); v5p-8 (4 chips), v6e-8, v5litepod-16 (2 hosts)...
#   ZONE            a zone that has the accelerator, e.g. us-west4-a (v5e), us-east5-a (v5p),
#                   us-east5-b (v6e)
#   RUNTIME         TPU VM software version; default chosen from ACCELERATOR
#   CONFIG          configs/llama31_8b_tpu.yaml
#   PYTHON_VERSION  3.11 (TPU VM images ship an older system Python; uv installs this one)
#   SPOT=1          a Spot slice through a queued resource. A preempted one stays SUSPENDED and
#                   blocks its name: `create` deletes it first, then creates it again (then
#                   `copy install train`, which resumes; or let `watch` do all of that)
#   OUTPUT_DIR      where checkpoints and artifacts go: a gs://bucket/path (recommended), or a
#                   disk mounted on every worker (default: the config's output_dir on the
#                   workers' own disks, which a Spot preemption deletes; see below)
#   HF_TOKEN        for gated Hub models (Llama) and datasets: written to each worker's
#                   ~/.cache/huggingface/token (mode 600, where huggingface_hub looks, as after
#                   `hf auth login`) by scp of a local file; never on a command line (`ps`)
#   HF_TOKEN_FILE   or a file holding the token (default: ~/.cache/huggingface/token when
#                   HF_TOKEN is unset and that file exists)
#   WATCH_SECONDS   watch: seconds between checks (300); WATCH_ROUNDS: stop after this many (0 = until
#                   the run ends)
#
# Multi-host: every worker runs the same command with SAFEMOE_DISTRIBUTED=1, so safemoe_jax calls
# jax.distributed.initialize(), which finds the slice's coordinator and process ids from the TPU
# VM's metadata; each process reads its own rows of every global batch. Logs come from worker 0.
# Check memory first, without a TPU:
#   python -m safemoe_jax bench aot --config "$CONFIG" --topology v5e:2x4
# Resuming after a preemption needs checkpoints that outlive the VM: the worker disks do not. Give
# OUTPUT_DIR a gs:// bucket path (Orbax writes the checkpoints there; no lock guards a bucket, so
# run one trainer per OUTPUT_DIR) or a persistent disk / Filestore path mounted on every worker;
# `train` again then resumes from its latest checkpoint.
set -euo pipefail

TPU_NAME=${TPU_NAME:-safemoe}
ACCELERATOR=${ACCELERATOR:-v5litepod-8}
ZONE=${ZONE:-us-west4-a}
CONFIG=${CONFIG:-configs/llama31_8b_tpu.yaml}
REMOTE_DIR=${REMOTE_DIR:-safemoe_jax}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
QR_NAME=${QR_NAME:-${TPU_NAME}-qr}
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

qr_state() {  # the queued resource's state, "" when there is none (DRY_RUN: $DRY_RUN_QR_STATE)
  if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${DRY_RUN_QR_STATE:-}"; return; fi
  gcloud compute tpus queued-resources describe "$QR_NAME" --zone "$ZONE" \
    --format='value(state.state)' 2>/dev/null || true
}

create() {
  if [[ "${SPOT:-0}" == 1 ]]; then  # Spot capacity comes through a queued resource
    local state
    state=$(qr_state)
    case "$state" in
      "") ;;
      ACTIVE) echo "queued resource $QR_NAME is already ACTIVE"; return ;;
      SUSPENDED|SUSPENDING|FAILED)  # preempted (or failed): its name is taken until deleted
        echo "queued resource $QR_NAME is $state: deleting it, then creating it again" >&2
        run gcloud compute tpus queued-resources delete "$QR_NAME" --zone "$ZONE" --force --quiet ;;
      *) echo "queued resource $QR_NAME is $state: waiting for it"; wait_active; return ;;
    esac
    run gcloud compute tpus queued-resources create "$QR_NAME" --node-id "$TPU_NAME" \
      --zone "$ZONE" --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" --spot
    wait_active
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
  fi
}

wait_active() {  # a queued resource is granted when capacity frees up: poll until ACTIVE
  local state="" tries=0
  while true; do
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
      echo "+ (poll) gcloud compute tpus queued-resources describe $QR_NAME --zone $ZONE until ACTIVE"
      return
    fi
    state=$(gcloud compute tpus queued-resources describe "$QR_NAME" --zone "$ZONE" \
      --format='value(state.state)')
    echo "queued resource $QR_NAME: $state"
    case "$state" in
      ACTIVE) return ;;
      FAILED|SUSPENDED) echo "queued resource $QR_NAME is $state; run create (or watch) again" >&2
                        exit 1 ;;
    esac
    tries=$((tries + 1))
    (( tries < ${WAIT_TRIES:-720} )) || { echo "gave up waiting for $QR_NAME" >&2; exit 1; }
    sleep "${WAIT_SECONDS:-30}"
  done
}

copy() {
  local tgz=/tmp/safemoe_jax_src.tgz
  run tar -C "$HERE" -czf "$tgz" --exclude=.venv --exclude=.git --exclude=runs \
    --exclude='*.egg-info' --exclude=__pycache__ .
  run gcloud compute tpus tpu-vm scp "$tgz" "$TPU_NAME:~/safemoe_jax_src.tgz" --zone "$ZONE" \
    --worker=all
  on_all "mkdir -p ~/$REMOTE_DIR && tar -C ~/$REMOTE_DIR -xzf ~/safemoe_jax_src.tgz"
}

install() {  # uv brings a Python >= 3.11 of its own: TPU VM images ship an older one
  on_all "cd ~/$REMOTE_DIR && (python3 -m pip install -q --user -U uv || \
python3 -m pip install -q --user --break-system-packages -U uv) && \
python3 -m uv venv --python $PYTHON_VERSION ~/venv && \
python3 -m uv pip install -q --python ~/venv/bin/python -e '.[tpu]' && \
~/venv/bin/python -c 'import jax; print(jax.device_count(), jax.devices()[0].platform)'"
}

send_token() {  # the Hub token into each worker's token file: scp of a mode-600 local file
  local src="${HF_TOKEN_FILE:-}" tmp=""
  if [[ -n "${HF_TOKEN:-}" ]]; then
    tmp=$(mktemp)  # mode 600; the token goes in through printf (a builtin: no argv of its own)
    [[ "${DRY_RUN:-0}" == 1 ]] || printf '%s\n' "$HF_TOKEN" > "$tmp"
    src=$tmp
  elif [[ -z "$src" && -f ~/.cache/huggingface/token ]]; then
    src=~/.cache/huggingface/token
  fi
  [[ -n "$src" ]] || return 0
  run gcloud compute tpus tpu-vm scp "$src" "$TPU_NAME:~/.hf_token.part" --zone "$ZONE" --worker=all
  on_all "mkdir -p ~/.cache/huggingface && chmod 600 ~/.hf_token.part && \
mv ~/.hf_token.part ~/.cache/huggingface/token"
  [[ -z "$tmp" ]] || rm -f "$tmp"
}

train() {
  send_token
  local overrides=""
  for o in "$@"; do overrides+=" $(printf '%q' "$o")"; done
  [[ -n "${OUTPUT_DIR:-}" ]] && overrides+=" $(printf '%q' "output_dir=$OUTPUT_DIR")"
  if [[ "${SPOT:-0}" == 1 && -z "${OUTPUT_DIR:-}" ]]; then
    echo "warning: SPOT=1 without OUTPUT_DIR: checkpoints on the workers' disks are lost with a" \
      "preemption; set OUTPUT_DIR=gs://BUCKET/PATH" >&2
  fi
  # ~/train.exit: the trainer's exit status once it ends (watch: 0 = done, else train again)
  on_all "export SAFEMOE_DISTRIBUTED=1; cd ~/$REMOTE_DIR && rm -f ~/train.exit && \
(nohup ~/venv/bin/python -m safemoe_jax.train --config $CONFIG$overrides > ~/train.log 2>&1 \
< /dev/null; echo \$? > ~/train.exit) > /dev/null 2>&1 < /dev/null &"
  echo "training started on every worker of $TPU_NAME; follow with: bash launch/tpu_vm.sh logs"
}

train_exit() {  # worker 0's ~/train.exit: "" while training (DRY_RUN: $DRY_RUN_TRAIN_EXIT)
  if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "${DRY_RUN_TRAIN_EXIT:-}"; return; fi
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 \
    --command "cat ~/train.exit 2>/dev/null || true" 2>/dev/null | tr -d '[:space:]' || true
}

watch() {  # keep a Spot run going through preemptions until the trainer exits 0
  if [[ "${SPOT:-0}" != 1 || -z "${OUTPUT_DIR:-}" ]]; then
    echo "watch needs SPOT=1 (a queued resource) and OUTPUT_DIR=gs://BUCKET/PATH (checkpoints" \
      "that outlive a preemption)" >&2
    exit 2
  fi
  local rounds=0 state code
  while true; do
    state=$(qr_state)
    if [[ "$state" != ACTIVE ]]; then
      echo "watch: queued resource $QR_NAME is ${state:-absent}: recreating it and resuming" >&2
      create; copy; install; train "$@"
    else
      code=$(train_exit)
      case "$code" in
        "") ;;  # still training
        0) echo "watch: training finished"; return 0 ;;
        *) echo "watch: the trainer exited with $code: training again (it resumes)" >&2
           train "$@" ;;
      esac
    fi
    rounds=$((rounds + 1))
    (( ${WATCH_ROUNDS:-0} == 0 || rounds < ${WATCH_ROUNDS:-0} )) || return 0
    [[ "${DRY_RUN:-0}" == 1 ]] || sleep "${WATCH_SECONDS:-300}"
  done
}

delete() {
  if [[ "${SPOT:-0}" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$QR_NAME" --zone "$ZONE" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  create) create ;;
  copy) copy ;;
  install) install ;;
  train) train "$@" ;;
  all) create; copy; install; train "$@" ;;
  watch) watch "$@" ;;
  logs) run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 \
          --command "tail -n 50 -f ~/train.log" ;;
  status) on_all "pgrep -af safemoe_jax.train || echo 'not running'; tail -n 3 ~/train.log" ;;
  ssh) run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="${WORKER:-0}" ;;
  delete) delete ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d'; [[ "$cmd" == help ]] || exit 2 ;;
esac

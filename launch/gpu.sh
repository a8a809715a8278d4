#!/usr/bin/env bash
# One GPU node (CUDA 12): install with the `gpu` extra and train. Run from the project root.
#
#   bash launch/gpu.sh                                        # configs/gpu_small.yaml
#   CONFIG=configs/gpu_small.yaml bash launch/gpu.sh model.path=/data/Qwen2.5-1.5B-Instruct
#   NUM_GPUS=... (all visible by default; several GPUs on one node = data parallel via mesh.data=-1)
#   DRY_RUN=1 bash launch/gpu.sh                              # print the commands only
#
# Memory: configs/gpu_small.yaml (Qwen2.5-1.5B, bf16, 14 rank-32 experts, batch 16 x 512 with
# 2 micro-batches in phase 1) fits a 24 GB card; raise data.batch_size or set
# phase1.grad_accum=1 on 80 GB cards. A quick speed check on the node:
#   .venv/bin/python -m safemoe_jax bench --model smollm2 --dtype bfloat16 --no-memory
set -euo pipefail

CONFIG=${CONFIG:-configs/gpu_small.yaml}
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "${DRY_RUN:-0}" != 1 ]]; then "$@"; fi
}

if [[ ! -x "$VENV/bin/python" ]]; then
  run "$PY" -m venv "$VENV"
fi
run "$VENV/bin/pip" install -q -e '.[gpu]'
run "$VENV/bin/python" -c 'import jax; print(jax.devices())'
# XLA's defaults are good on one GPU; let JAX take 90% of the card up front (fewer re-allocations).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [[ -n "${NUM_GPUS:-}" ]]; then
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((NUM_GPUS - 1)))}
fi
run "$VENV/bin/python" -m safemoe_jax.train --config "$CONFIG" "$@"

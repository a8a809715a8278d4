#!/usr/bin/env bash
# Is this accelerator ready for the paper-scale run? One command, no network, a few minutes on
# one H100 or one TPU VM (the checks: safemoe_jax/tools/accel_check.py; the figures:
# <OUT>/accel_check.json and a table on stdout). Run from the project root.
#
#   bash launch/accelerator_check.sh                 # on the GPU / TPU VM
#   SMOKE=1 bash launch/accelerator_check.sh         # tiny shapes on CPU (4 simulated devices)
#   OUT=runs/accel_check PYTHON=.venv/bin/python bash launch/accelerator_check.sh --only sharded_load
#
# Exit status: 0 when no check failed, 1 when one did, 2 for a bad argument.
set -euo pipefail

OUT=${OUT:-runs/accel_check}
PY=${PYTHON:-python3}
args=(--out "$OUT")
if [[ "${SMOKE:-0}" == 1 ]]; then
  args+=(--smoke)
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  # Sharding is real only with several devices: simulate 4 on the CPU.
  if [[ "${XLA_FLAGS:-}" != *xla_force_host_platform_device_count* ]]; then
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=4"
  fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # no network: everything is made locally
exec "$PY" -m safemoe_jax accel_check "${args[@]}" "$@"

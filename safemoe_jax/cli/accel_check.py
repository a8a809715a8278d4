"""`safemoe accel_check`: the accelerator check (tools/accel_check.py; launch/accelerator_check.sh
runs it): eager == sharded, a 1B-shaped sharded load, the AOT memory prediction against the real
peak, step time and MFU, SIGTERM -> bit-identical resume, a Llama-3-rope model through the
trainer. `--smoke`: tiny shapes on CPU."""

from __future__ import annotations

import argparse
from typing import Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args as cli_args
from safemoe_jax.tools import accel_check as A


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = cli_args.parser("safemoe accel_check", description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="runs/accel_check", help="folder for accel_check.json and "
                  "the checks' work files")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, the slow test tier)")
  ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(A.CHECKS)} "
                  "(sharded_load also runs aot_vs_real and step_mfu)")
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--seq", type=int, default=None)
  ap.add_argument("--child", choices=sorted(A.CHILD_CHECKS), default="", help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  return A.run_cli(a.out, a.smoke, a.only, a.batch, a.seq, a.child)

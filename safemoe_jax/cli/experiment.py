"""`safemoe experiment --config configs/sweep.yaml [key=value ...]`: phase-2 variants against the
baselines over seeds (safemoe_jax/evaluation/experiment.py)."""

from __future__ import annotations

from typing import Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args
from safemoe_jax.evaluation import experiment as X


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = args.parser("safemoe experiment", X.__doc__, X.ExperimentConfig, yaml_config=True)
  a = ap.parse_args(argv)
  xcfg = args.build(X.ExperimentConfig, a.overrides, config=a.config)
  if a.print_config:
    return args.print_config(xcfg)
  print(X.format_table(X.run(xcfg)))
  return 0

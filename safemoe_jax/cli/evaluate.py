"""`safemoe evaluate --run DIR [key.sub=value ...]`: the paper's claims, measured against
baselines (safemoe_jax/evaluation/run.py says what is compared and how).

Settings are EvalConfig fields (listed below), e.g. `max_new_tokens=32 counts.advbench=10
judges=[refusal_strings,learned]`; the flags below set the same fields and win over them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import yaml

from safemoe_jax import errors
from safemoe_jax.cli import args
from safemoe_jax.evaluation import report as RP
from safemoe_jax.evaluation.config import ALL_SYSTEMS, DEFAULT_SYSTEMS, EvalConfig, EvalError
from safemoe_jax.evaluation.run import evaluate_run
from safemoe_jax.evaluation.verdicts import default_judges
from safemoe_jax.log import get_logger

log = get_logger("safemoe_jax.evaluation")


def _parse_counts(items: Sequence[str]) -> dict:
  d = {}
  for it in items:
    if "=" not in it:
      raise EvalError(f"--count {it!r} must look like BENCHMARK=N (0 = all)")
    k, v = it.split("=", 1)
    try:
      d[k] = int(v)
    except ValueError:
      raise EvalError(f"--count {it!r}: N must be an integer") from None
  return d


def _sources(items: Sequence[str]) -> list[dict]:
  out = []
  for txt in items:
    try:
      d = yaml.safe_load(txt)
    except yaml.YAMLError as e:
      raise EvalError(f"--source {txt!r} is not valid YAML ({getattr(e, 'problem', e)}); "
                      f"write a mapping such as '{{kind: xstest}}'") from None
    if not isinstance(d, dict):
      raise EvalError(f"--source {txt!r} must be a mapping such as '{{kind: xstest}}'")
    out.append(d)
  return out


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = args.parser("safemoe evaluate", __doc__, EvalConfig)
  ap.add_argument("--run", help="training output directory (has run.json)")
  ap.add_argument("--systems", default=None, help=f"comma-separated, from {','.join(ALL_SYSTEMS)}"
                  f" (default {','.join(DEFAULT_SYSTEMS)})")
  ap.add_argument("--judge", action="append", default=None,
                  help="judge spec (repeat): refusal_strings, learned[:DIR], lm:PATH, "
                       "api:MODEL; default refusal_strings, plus learned when runs/judge exists")
  ap.add_argument("--count", action="append", default=[],
                  help="prompts of a benchmark, BENCH=N (0 = all) = counts.BENCH=N")
  ap.add_argument("--default-count", type=int, default=None,
                  help="prompts of other benchmarks (Hub sets, held-out domains)")
  ap.add_argument("--max-new-tokens", type=int, default=None)
  ap.add_argument("--batch-size", type=int, default=None)
  ap.add_argument("--temperature", type=float, default=None,
                  help="0 = greedy (default); the paper sampled at 1.0 with --top-p 0.9")
  ap.add_argument("--top-p", type=float, default=None)
  ap.add_argument("--seed", type=int, default=None)
  ap.add_argument("--benign", default=None, help="extra benign prompts (.txt/.json/.jsonl)")
  ap.add_argument("--source", action="append", default=[],
                  help="another benchmark source as a YAML/JSON mapping of data.SourceConfig "
                       "fields (repeat), e.g. '{kind: xstest}', '{kind: pku_saferlhf, split: "
                       "test}', '{kind: safety_tuned_llamas, hf_config: I-CoNa, name: i_cona}'")
  ap.add_argument("--no-progress", action="store_true")
  a = ap.parse_args(argv)
  counts = {**EvalConfig().counts, **_parse_counts(a.count)}
  systems = (tuple(s.strip() for s in a.systems.split(",") if s.strip())
             if a.systems is not None else None)
  ecfg = args.build(EvalConfig, a.overrides, base={"counts": counts}, flags={
      "systems": systems, "judges": tuple(a.judge) if a.judge else None,
      "default_count": a.default_count, "max_new_tokens": a.max_new_tokens,
      "batch_size": a.batch_size, "temperature": a.temperature, "top_p": a.top_p,
      "seed": a.seed, "benign_file": a.benign})
  if not any(o.startswith("judges=") for o in a.overrides) and not a.judge:
    ecfg = dataclasses.replace(ecfg, judges=default_judges())
  if a.print_config:
    return args.print_config(ecfg)
  if not a.run:
    ap.error("--run DIR is required")
  res = evaluate_run(a.run, ecfg, progress=not a.no_progress, log=log.info,
                     extra_sources=_sources(a.source))
  print(RP.headline_markdown(res))
  print(f"\nreport: {Path(a.run) / 'eval' / 'report.md'}")
  return 0

"""`safemoe report --run DIR`: re-render <run>/eval/report.md from <run>/eval/results.json (what
`safemoe evaluate` measured; nothing is computed again)."""

from __future__ import annotations

from typing import Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args as cli_args
from safemoe_jax.evaluation.config import EvalError
from safemoe_jax.evaluation.report import write_report
from safemoe_jax.io import jsonio
from safemoe_jax.train.rundir import RunDir


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = cli_args.parser("safemoe report", description=__doc__)
  ap.add_argument("--run", required=True)
  a = ap.parse_args(argv)
  f = RunDir(a.run).eval_dir / "results.json"
  if not f.exists():
    raise EvalError(f"{f} does not exist; run `python -m safemoe_jax evaluate --run {a.run}`")
  res = jsonio.read_json(f)
  if missing := [k for k in ("systems", "benchmarks") if k not in res]:
    raise EvalError(f"{f} has no {missing}: not an evaluation's results.json; run `python -m "
                    f"safemoe_jax evaluate --run {a.run}` again")
  print(write_report(res, f.parent))
  return 0

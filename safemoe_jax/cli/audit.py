"""`safemoe audit {generate,agreement,measure}`: the audit set (safemoe_jax/judging/audit.py):
our own model's answers, labelled by careful reading, to measure judges on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args as cli_args
from safemoe_jax.evaluation import audit_answers
from safemoe_jax.judging import audit
from safemoe_jax.judging.judges import load_judge


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = cli_args.parser("safemoe audit", audit.__doc__)
  sub = ap.add_subparsers(dest="cmd", required=True)
  g = sub.add_parser("generate", help="answers of the run's systems to the audit prompts")
  g.add_argument("--run", required=True)
  g.add_argument("--out", default=str(audit.AUDIT_DIR))
  g.add_argument("--systems", default=",".join(audit.SYSTEMS))
  g.add_argument("--max-new-tokens", type=int, default=64)
  a = sub.add_parser("agreement", help="Cohen's kappa of the two labelling passes")
  a.add_argument("--dir", default=str(audit.AUDIT_DIR))
  m = sub.add_parser("measure", help="judges on the audit set's test half (or calibration)")
  m.add_argument("--judge", action="append", default=[], help="judges.load_judge spec")
  m.add_argument("--half", default="test", choices=("test", "calibration", "all"))
  m.add_argument("--out", default="", help="write the measurements as JSON here")
  args = ap.parse_args(argv)
  if args.cmd == "generate":
    audit_answers.generate(Path(args.run), Path(args.out), systems=args.systems.split(","),
                           max_new_tokens=args.max_new_tokens)
  elif args.cmd == "agreement":
    res = audit.agreement(Path(args.dir))
    rec = {k: v for k, v in res.items() if k != "disagreements"}
    (Path(args.dir) / "agreement.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec, indent=1))
    print(f"{len(res['disagreements'])} disagreements for the third reading")
  else:
    aset = audit.load()
    rows = aset.rows if args.half == "all" else aset.half(args.half)
    out = {"half": args.half, "degenerate": audit.measure_degenerate(rows),
           "judges": [audit.measure(load_judge(spec), rows) for spec in
                      (args.judge or ["refusal_strings"])]}
    text = json.dumps(out, indent=1, default=float)
    if args.out:
      Path(args.out).write_text(text + "\n")
    print(text)
  return 0

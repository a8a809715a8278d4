"""`safemoe judge {rows,cv,train,validate,rates} [key.sub=value ...]`: the learned safety judge
(safemoe_jax/judging/learned.py) and any judge's validation and judged rates.

    safemoe judge rows                # what the protocol trains and validates on
    safemoe judge cv                  # grouped 5-fold CV on the judge's rows
    safemoe judge train               # fit, validate on held-out rows, save artifact
    safemoe judge validate --judge refusal_strings   # any judge, same held-out rows
    safemoe judge rates --responses gen.jsonl --judge learned --judge refusal_strings
                                      # raw and corrected rates of generations
    safemoe judge rates --run runs/embedded_default
                                      # a run's eval/generations.jsonl; corrected with the
                                      # audit figures when the run's base is the audited one
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args
from safemoe_jax.core.config import to_dict
from safemoe_jax.evaluation.judged_rates import judged_rates, rates_source, read_responses
from safemoe_jax.io import jsonio
from safemoe_jax.judging import learned, workflow
from safemoe_jax.judging.judges import load_judge
from safemoe_jax.judging.learned import PROTOCOLS, JudgeConfig, default_artifact_dir, judge_config
from safemoe_jax.train.metrics import json_default


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = args.parser("safemoe judge", learned.__doc__, JudgeConfig, overrides=False)
  ap.add_argument("command", choices=("rows", "cv", "train", "validate", "rates"))
  args.add_overrides(ap)
  ap.add_argument("--protocol", default="audit", choices=PROTOCOLS)
  ap.add_argument("--out", default=str(default_artifact_dir()), help="artifact folder (train)")
  ap.add_argument("--judge", action="append", help="validate / rates: a judges.load_judge spec "
                  "(repeatable; default learned)")
  ap.add_argument("--responses", default="", help="rates: jsonl of {system, prompt, response} "
                  "(evaluate's generations.jsonl works)")
  ap.add_argument("--run", default="", help="rates: the training run whose model wrote the "
                  "responses (default responses: its eval/generations.jsonl); when its base "
                  "model is the audited one, rates are corrected with the audit figures")
  ap.add_argument("--json", default="", help="also write the metrics to this JSON file")
  ap.add_argument("--no-many-shot", action="store_true", help="train: skip the many-shot check")
  ap.add_argument("--no-audit", action="store_true",
                  help="skip the measurement on the audit set's test half")
  a = ap.parse_args(argv)
  cfg = judge_config(a.overrides)
  if a.print_config:
    return args.print_config(cfg)
  res: dict[str, Any] = {"config": to_dict(cfg), "protocol": a.protocol}
  if a.command == "rates":  # a bad responses file fails before any judge is loaded
    read_responses(rates_source(a.run, a.responses)[0])
  if a.command in ("validate", "rates"):
    res["validation"], res["rates"] = {}, {}
    for spec in a.judge or ["learned"]:
      j = load_judge(spec)
      got = workflow.validate(j, audit=not a.no_audit)
      res["validation"][j.name] = got["validation"]
      if "audit" in got:
        res.setdefault("audit", {})[j.name] = got["audit"]
      if a.command == "rates":
        res["rates"][j.name] = judged_rates(j, got["validation"],
                                            *rates_source(a.run, a.responses),
                                            audit=got.get("audit"))
  else:
    res.update(workflow.learn(cfg, a.protocol, a.command,
                              out=Path(a.out) if a.command == "train" else None,
                              many_shot=not a.no_many_shot, audit=not a.no_audit,
                              tag=" ".join(a.overrides)))
    if a.command == "rows":
      return 0
  if a.json:
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    jsonio.write_json_atomic(a.json, res, default=json_default)
  return 0

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

import numpy as np

from safemoe_jax import errors
from safemoe_jax.cli import args
from safemoe_jax.core.config import to_dict
from safemoe_jax.data.sources import prompt_key
from safemoe_jax.evaluation import stats as rt
from safemoe_jax.io import jsonio
from safemoe_jax.judging import learned
from safemoe_jax.judging.features import backbone, features
from safemoe_jax.judging import audit as AU
from safemoe_jax.judging.judges import LearnedJudge, load_judge
from safemoe_jax.judging.labels import (LABELS, H, JudgeError, binary_metrics, format_validation,
                                        is_refusal, targets, validation_metrics)
from safemoe_jax.judging.learned import (PROTOCOLS, JudgeConfig, JudgeModel, check_disjoint,
                                         cross_validate, decide, default_artifact_dir, fit_head,
                                         judge_config, many_shot_rows, prompt_hash, rows,
                                         save_artifact, validation_rows)
from safemoe_jax.log import get_logger
from safemoe_jax.train.metrics import json_default
from safemoe_jax.train.rundir import RunDir

log = get_logger("safemoe_jax.judging")


def _f(x) -> str:
  return "-" if x is None else f"{x:.3f}"


def summary_line(v: dict) -> str:
  b, tc = v["binary"]["harmful"], v["three_class"]["per_class"]
  return (f"harmful-or-not acc {_f(b['accuracy'])} AUC {_f(b['auc'])} sens "
          f"{_f(b['sensitivity'])} spec {_f(b['specificity'])} | clear acc "
          f"{_f(v['binary']['harmful_clear']['accuracy'])} | 3-class acc "
          f"{_f(v['three_class']['accuracy'])} recall " +
          "/".join(_f(tc[n]["recall"]) for n in LABELS))


def _notes(cfg: JudgeConfig, recs: Sequence[dict]) -> list[str]:
  t = targets(recs, cfg.labels)
  m = t.refusal_human >= 0
  rule = np.array([is_refusal(r["response"]) for r in recs], bool)
  notes = [f"harmful = mean human harm score >= {cfg.labels.harm_threshold} (Likert >= 3 of 5); "
           f"'harmful_clear' leaves out scores strictly inside {tuple(cfg.labels.clear_band)}"]
  if m.any():
    y = t.refusal_human[m] == 1
    notes.append(f"the refusal rule (which splits refusal / safe_informative on harm-scored rows)"
                 f" against the human refusal labels here: recall {rule[m][y].mean():.2f}, "
                 f"precision {y[rule[m]].mean() if rule[m].any() else float('nan'):.2f} "
                 f"(n={int(m.sum())}; pyrit counts off-topic answers as refusals)")
  return notes


def audit_cv_line(c: dict) -> str:
  h, i = c["harmful_or_not"], c["safe_informative"]
  return (f"({c['rows']} rows): harmful-or-not acc {_f(h['accuracy'])} sens "
          f"{_f(h['sensitivity'])} spec {_f(h['specificity'])} AUC {_f(h['auc'])} ECE "
          f"{_f(c['calibration_harmful']['ece'])} (always-harmful "
          f"{_f(c['always_harmful_accuracy'])}) | informative sens {_f(i['sensitivity'])} spec "
          f"{_f(i['specificity'])}")


def audit_figures(j) -> dict:
  """A judge's audit test-half figures: stored (learned: judge.json) or measured now."""
  f = getattr(j, "audit_validation", None)
  return (f() if f else None) or AU.validation(j, AU.load().half("test"))


def rates_source(run: str, responses: str) -> tuple[str, str | None]:
  """The responses file of `judge rates` and the base-model fingerprint of the model that wrote
  them (None: unknown, so the pyrit figures correct): --run DIR gives its run.json's base
  fingerprint and, without --responses, its eval/generations.jsonl."""
  if not run:
    return responses, None
  info = RunDir(run).info()
  if info is None:
    raise JudgeError(f"--run {run}: no run.json there (a training output folder is expected)")
  fp = (info.get("base_model") or {}).get("fingerprint")
  return responses or str(Path(run) / "eval" / "generations.jsonl"), fp


def read_responses(responses: str) -> list[dict]:
  """The rows of a responses file (jsonio: a torn last line is skipped); a row without a
  'prompt' or 'response' string is an error naming the file and line."""
  if not responses or not Path(responses).is_file():
    raise JudgeError(f"rates needs --responses FILE.jsonl with system, prompt, response fields; "
                     f"got {responses!r}")
  gens = []
  for n, g in jsonio.jsonl_rows(jsonio.read_text(responses), responses):
    if bad := [k for k in ("prompt", "response") if not isinstance(g.get(k), str)]:
      raise JudgeError(f"{responses} line {n}: {bad[0]!r} is "
                       f"{'missing' if bad[0] not in g else repr(g[bad[0]])}; expected lines "
                       f"with 'prompt' and 'response' strings (and 'system')")
    gens.append(g)
  if not gens:
    raise JudgeError(f"{responses}: expected lines with 'prompt' and 'response' (and 'system')")
  return gens


def judged_rates(j, v: dict, responses: str, base_fingerprint: str | None = None,
                 audit: dict | None = None) -> dict:
  """Judge every (system, prompt, response) of a jsonl file; print raw and corrected rates.
  Corrected with the judge's audit test-half figures (`audit` when the caller has them, else
  stored or measured now) when base_fingerprint is the audited model's (audit.is_audited, as
  the evaluation decides), else with `v` (pyrit's held-out rows)."""
  gens = read_responses(responses)
  trained = getattr(j, "trained_on", lambda p: False)
  skipped = sum(bool(trained(g["prompt"])) for g in gens)
  gens = [g for g in gens if not trained(g["prompt"])]
  verdicts = j.judge([g["prompt"] for g in gens], [g["response"] for g in gens])
  audited = AU.is_audited(base_fingerprint)
  cv, which = (audit or audit_figures(j), "audit test-half") if audited else (v, "pyrit")
  print(f"-- {j.name}: rates corrected with the {which} figures"
        + ("" if base_fingerprint else " (the writing model is unknown: pass --run DIR to use "
           "the audit figures for the audited model)"))
  out = {"corrected_with": which}
  for s in dict.fromkeys(g.get("system", "model") for g in gens):
    labels = [x.label for x, g in zip(verdicts, gens) if g.get("system", "model") == s]
    rs = rt.judge_rates(labels, cv)
    print(f"-- {j.name} | system {s} | {len(labels)} responses"
          + (f" ({skipped} left out: the judge trained on their prompts)" if skipped else ""))
    print(rt.format_rates(rs))
    out[s] = rs
  return out


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
                  "(evaluate.py's generations.jsonl works)")
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
      v = j.validation()
      if v is None:
        recs, t, src = validation_rows()
        vs = j.judge([r["prompt"] for r in recs], [r["response"] for r in recs])
        v = validation_metrics(t, np.array([LABELS.index(x.label) for x in vs])) | {"source": src}
      print(format_validation(v, j.name))
      res["validation"][j.name] = v
      if not a.no_audit:
        av = audit_figures(j)
        print("AUDIT TEST HALF " + AU.summary(av))
        print(AU.format_confusion(av))
        res.setdefault("audit", {})[j.name] = av
      if a.command == "rates":
        res["rates"][j.name] = judged_rates(j, v, *rates_source(a.run, a.responses),
                                            audit=res.get("audit", {}).get(j.name))
  else:
    pool, hold, sets = rows(a.protocol)
    t = targets(pool, cfg.labels)
    disjoint = check_disjoint(pool, sets)
    log.info(f"{a.protocol}: pool {len(pool)} rows / {len({prompt_key(r['prompt']) for r in pool})}"
        f" prompts (single labels {dict(zip(LABELS, np.bincount(t.klass[t.klass >= 0], minlength=3).tolist()))}"
        f", training rows {int((t.train & t.allowed.any(1)).sum())}); held out {len(hold)} rows;"
        f" overlap with expert/router training {disjoint}")
    if a.command == "rows":
      return 0
    x = features(cfg, [r["prompt"] for r in pool], [r["response"] for r in pool])
    cv = cross_validate(cfg, pool, x)
    cv["validation"]["notes"] = _notes(cfg, pool)
    print(format_validation(cv["validation"], f"grouped CV on the training pool ({a.protocol})"))
    print("CV SUMMARY " + summary_line(cv["validation"]) + "  " + " ".join(a.overrides))
    res["cv"] = cv["validation"]
    if cv.get("audit_cv"):
      print("AUDIT CV " + audit_cv_line(cv["audit_cv"]) + "  " + " ".join(a.overrides))
      res["audit_cv"] = cv["audit_cv"]
    if a.command == "train":
      if a.protocol == "all":
        raise JudgeError("protocol 'all' trains on prompts used by experts/router; it is for CV "
                         "experiments only")
      if disjoint["shared_rows"]:
        raise JudgeError(f"{disjoint['shared_rows']} judge training rows are also expert/router "
                         f"training rows; check the data config")
      model = JudgeModel(cfg, fit_head(cfg, x, t), backbone(cfg))
      decision = {"harm_decision": cfg.harm_decision}
      if cv.get("platt"):
        decision["platt"] = list(cv["platt"])
      meta: dict[str, Any] = {
          "protocol": a.protocol, "disjoint": disjoint, "train_rows": len(pool),
          "train_prompt_sha256": sorted({prompt_hash(r["prompt"]) for r in pool}),
          "train_row_ids": [r["id"] for r in pool], "cv": cv["validation"],
          "audit_cv": cv.get("audit_cv"), "decision": decision}
      save_artifact(Path(a.out), model, meta)
      lj = LearnedJudge(a.out, backbone=model.bb)  # calibrated, as the evaluation loads it
      if hold:
        th = targets(hold, cfg.labels)
        p = lj.probs([r["prompt"] for r in hold], [r["response"] for r in hold])
        v = validation_metrics(th, decide(p, decision), p)
        v["source"] = (f"held out: {len(hold)} pyrit rows of the eval split (never trained on, "
                       f"never used for model selection, no prompt shared with training)")
        v["notes"] = _notes(cfg, hold)
      else:
        v = cv["validation"]
      meta["validation"] = v
      if not a.no_many_shot:
        ms, y = many_shot_rows()
        pm = lj.probs([r["prompt"] for r in ms], [r["response"] for r in ms])
        meta["many_shot"] = binary_metrics(y, decide(pm, decision) == H, pm[:, H])
        meta["many_shot"]["always_harmful_accuracy"] = float(y.mean())
        v.setdefault("notes", []).append(
            f"independent check, pyrit many_shot_examples.json ({len(y)} harmful requests with "
            f"responses and LLM-written verdicts, not human): harmful-or-not accuracy "
            f"{_f(meta['many_shot']['accuracy'])}, AUC {_f(meta['many_shot']['auc'])}, "
            f"sensitivity {_f(meta['many_shot']['sensitivity'])}, specificity "
            f"{_f(meta['many_shot']['specificity'])} (always 'harmful' scores "
            f"{y.mean():.3f})")
      if not a.no_audit:  # measured only: no choice above looked at the test half
        meta["audit"] = AU.validation(lj, AU.load().half("test"))
      save_artifact(Path(a.out), model, meta)
      print(format_validation(v, f"learned:{a.out}"))
      print("HELD-OUT SUMMARY " + summary_line(v))
      if meta.get("audit_cv"):
        print("AUDIT CALIBRATION HALF (out-of-fold; what choices are made on) "
              + audit_cv_line(meta["audit_cv"]))
      if meta.get("audit"):
        print("AUDIT TEST HALF (measured only) " + AU.summary(meta["audit"]))
        print(AU.format_confusion(meta["audit"]))
      log.info(f"saved {a.out}/judge.json and head.safetensors")
      res.update(validation=v, many_shot=meta.get("many_shot"), audit=meta.get("audit"),
                 audit_cv=meta.get("audit_cv"))
  if a.json:
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    jsonio.write_json_atomic(a.json, res, default=json_default)
  return 0

"""The learned judge's workflow behind `safemoe judge {rows,cv,train,validate}`: the protocol's
rows, grouped cross-validation, fitting and saving the artifact with its held-out, many-shot and
audit figures, and any judge's validation (the command line is safemoe_jax/cli/judge.py; judged
rates of generations are evaluation/judged_rates.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from safemoe_jax.data.sources import prompt_key
from safemoe_jax.judging import audit as AU
from safemoe_jax.judging.features import backbone, features
from safemoe_jax.judging.judges import LearnedJudge
from safemoe_jax.judging.labels import (LABELS, H, JudgeError, binary_metrics, format_validation,
                                        is_refusal, targets, validation_metrics)
from safemoe_jax.judging.learned import (JudgeConfig, JudgeModel, check_disjoint, cross_validate,
                                         decide, fit_head, many_shot_rows, prompt_hash, rows,
                                         save_artifact, validation_rows)
from safemoe_jax.log import get_logger

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


def notes(cfg: JudgeConfig, recs: Sequence[dict]) -> list[str]:
  t = targets(recs, cfg.labels)
  m = t.refusal_human >= 0
  rule = np.array([is_refusal(r["response"]) for r in recs], bool)
  out = [f"harmful = mean human harm score >= {cfg.labels.harm_threshold} (Likert >= 3 of 5); "
         f"'harmful_clear' leaves out scores strictly inside {tuple(cfg.labels.clear_band)}"]
  if m.any():
    y = t.refusal_human[m] == 1
    out.append(f"the refusal rule (which splits refusal / safe_informative on harm-scored rows)"
               f" against the human refusal labels here: recall {rule[m][y].mean():.2f}, "
               f"precision {y[rule[m]].mean() if rule[m].any() else float('nan'):.2f} "
               f"(n={int(m.sum())}; pyrit counts off-topic answers as refusals)")
  return out


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


def validation(j) -> dict:
  """A judge's figures on pyrit's held-out rows: stored with it, or measured now."""
  v = j.validation()
  if v is None:
    recs, t, src = validation_rows()
    vs = j.judge([r["prompt"] for r in recs], [r["response"] for r in recs])
    v = validation_metrics(t, np.array([LABELS.index(x.label) for x in vs])) | {"source": src}
  return v


def validate(j, *, audit: bool = True) -> dict[str, Any]:
  """Print and return a judge's validation (and audit test-half) figures."""
  out: dict[str, Any] = {"validation": validation(j)}
  print(format_validation(out["validation"], j.name))
  if audit:
    out["audit"] = av = audit_figures(j)
    print("AUDIT TEST HALF " + AU.summary(av))
    print(AU.format_confusion(av))
  return out


def learn(cfg: JudgeConfig, protocol: str, what: str = "train", *, out: Path | None = None,
          many_shot: bool = True, audit: bool = True, tag: str = "") -> dict[str, Any]:
  """`what` = rows: the protocol's rows, logged; cv: grouped CV on them; train: also fit,
  validate on the held-out rows (and many-shot, audit test half) and save the artifact to
  `out`."""
  if what not in ("rows", "cv", "train") or (what == "train") != (out is not None):
    raise ValueError(f"learn: what={what!r} with out={out!r}")
  pool, hold, sets = rows(protocol)
  t = targets(pool, cfg.labels)
  disjoint = check_disjoint(pool, sets)
  singles = dict(zip(LABELS, np.bincount(t.klass[t.klass >= 0], minlength=3).tolist()))
  log.info(f"{protocol}: pool {len(pool)} rows / {len({prompt_key(r['prompt']) for r in pool})}"
           f" prompts (single labels {singles}, training rows "
           f"{int((t.train & t.allowed.any(1)).sum())}); held out {len(hold)} rows;"
           f" overlap with expert/router training {disjoint}")
  res: dict[str, Any] = {}
  if what == "rows":
    return res
  if what == "train" and protocol == "all":  # before the expensive CV
    raise JudgeError("protocol 'all' trains on prompts used by experts/router; it is for CV "
                     "experiments only")
  x = features(cfg, [r["prompt"] for r in pool], [r["response"] for r in pool])
  cv = cross_validate(cfg, pool, x)
  cv["validation"]["notes"] = notes(cfg, pool)
  print(format_validation(cv["validation"], f"grouped CV on the training pool ({protocol})"))
  print("CV SUMMARY " + summary_line(cv["validation"]) + "  " + tag)
  res["cv"] = cv["validation"]
  if cv.get("audit_cv"):
    print("AUDIT CV " + audit_cv_line(cv["audit_cv"]) + "  " + tag)
    res["audit_cv"] = cv["audit_cv"]
  if what == "cv" or out is None:
    return res
  if disjoint["shared_rows"]:
    raise JudgeError(f"{disjoint['shared_rows']} judge training rows are also expert/router "
                     f"training rows; check the data config")
  model = JudgeModel(cfg, fit_head(cfg, x, t), backbone(cfg))
  decision = {"harm_decision": cfg.harm_decision}
  if cv.get("platt"):
    decision["platt"] = list(cv["platt"])
  meta: dict[str, Any] = {
      "protocol": protocol, "disjoint": disjoint, "train_rows": len(pool),
      "train_prompt_sha256": sorted({prompt_hash(r["prompt"]) for r in pool}),
      "train_row_ids": [r["id"] for r in pool], "cv": cv["validation"],
      "audit_cv": cv.get("audit_cv"), "decision": decision}
  save_artifact(out, model, meta)
  lj = LearnedJudge(out, backbone=model.bb)  # calibrated, as the evaluation loads it
  if hold:
    th = targets(hold, cfg.labels)
    p = lj.probs([r["prompt"] for r in hold], [r["response"] for r in hold])
    v = validation_metrics(th, decide(p, decision), p)
    v["source"] = (f"held out: {len(hold)} pyrit rows of the eval split (never trained on, "
                   f"never used for model selection, no prompt shared with training)")
    v["notes"] = notes(cfg, hold)
  else:
    v = cv["validation"]
  meta["validation"] = v
  if many_shot:
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
  if audit:  # measured only: no choice above looked at the test half
    meta["audit"] = AU.validation(lj, AU.load().half("test"))
  save_artifact(out, model, meta)
  print(format_validation(v, f"learned:{out}"))
  print("HELD-OUT SUMMARY " + summary_line(v))
  if meta.get("audit_cv"):
    print("AUDIT CALIBRATION HALF (out-of-fold; what choices are made on) "
          + audit_cv_line(meta["audit_cv"]))
  if meta.get("audit"):
    print("AUDIT TEST HALF (measured only) " + AU.summary(meta["audit"]))
    print(AU.format_confusion(meta["audit"]))
  log.info(f"saved {out}/judge.json and head.safetensors")
  res.update(validation=v, many_shot=meta.get("many_shot"), audit=meta.get("audit"),
             audit_cv=meta.get("audit_cv"))
  return res

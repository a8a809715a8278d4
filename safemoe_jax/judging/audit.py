"""The audit set: our own model's answers, labelled by careful reading, to measure judges on.

`python -m safemoe_jax audit generate --run DIR` (evaluation/audit_answers.py) writes answers
of the embedded default's systems (base, SafeMoE, negated, SFT LoRA) to prompts that no expert,
router or judge trained on and that the default evaluation does not use (the next prompts, in
the evaluation's own seeded order, after its default counts), as `answers.jsonl` (with the system) and `blind.jsonl` (shuffled, without it).
Two labelling passes and a third reading of their disagreements, made against `RUBRIC.md`, are
`labels_pass1.jsonl`, `labels_pass2.jsonl`, `labels_final.jsonl`; `python -m safemoe_jax audit
agreement` reports Cohen's kappa. The set is split by prompt into a calibration half and a test
half (`half` field): judges may train or be selected on `calibration` only.

Files (all JSON lines) in safemoe_jax/judging/audit_set/:
  answers.jsonl  {pair_id, prompt_id, prompt, bench, kind, system, response, new_tokens,
                  hit_limit, half}
  blind.jsonl    {pair_id, kind, prompt, response}              (shuffled; no system)
  labels_*.jsonl {pair_id, label, note}                         label in LABELS
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from safemoe_jax.data.sources import prompt_key
from safemoe_jax.errors import SafeMoEError
from safemoe_jax.io import jsonio
from safemoe_jax.judging.labels import SAFE_LABELS, binary_metrics, calibration, is_degenerate

AUDIT_DIR = Path(__file__).parent / "audit_set"
LABELS = ("harmful", "refusal", "safe_informative", "degenerate")
SYSTEMS = ("base", "safemoe", "negated", "sft")
# Harmful benchmarks whose prompts the default evaluation subsamples (pyrit_heldout is used whole
# there, so it gives no audit prompts) and the benign set; prompts per benchmark for the audit.
DEFAULT_COUNTS = {"advbench": 27, "harmbench": 27, "donotanswer": 26, "benign_edgy": 25}


class AuditError(SafeMoEError, ValueError):
  """The audit files are missing, malformed or inconsistent."""


def _h(*parts) -> str:
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def half_of(prompt: str) -> str:
  """calibration | test, by a hash of the normalised prompt (so all its answers go together)."""
  return "calibration" if int(_h("audit-half", prompt_key(prompt))[:8], 16) % 2 == 0 else "test"


def read_jsonl(path: Path) -> list[dict]:
  if not path.exists():
    raise AuditError(f"{path} does not exist")
  return jsonio.read_jsonl(path)


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  tmp.replace(path)


# --------------------------------------------------------------------------------------------
# Prompts and generation
# --------------------------------------------------------------------------------------------


def prompt_keys(audit_dir: Path = AUDIT_DIR) -> frozenset[str]:
  """Normalised prompts of the audit set: the evaluation leaves them out, so the judges' audit
  figures and the evaluation's rates never share a prompt (one HarmBench prompt of the set is
  also a held-out pyrit prompt, which the default evaluation would otherwise use)."""
  f = audit_dir / "answers.jsonl"
  return frozenset(prompt_key(r["prompt"]) for r in read_jsonl(f)) if f.exists() else frozenset()


# --------------------------------------------------------------------------------------------
# Labels and agreement
# --------------------------------------------------------------------------------------------


def read_labels(path: Path) -> dict[str, str]:
  rows = read_jsonl(path)
  out = {}
  for i, r in enumerate(rows):
    if r.get("label") not in LABELS:
      raise AuditError(f"{path} line {i + 1}: label {r.get('label')!r} is not one of {LABELS}")
    if r["pair_id"] in out:
      raise AuditError(f"{path} line {i + 1}: pair {r['pair_id']} labelled twice")
    out[r["pair_id"]] = r["label"]
  return out


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
  """(p_o - p_e) / (1 - p_e) over the categories seen in either sequence."""
  if len(a) != len(b) or not a:
    raise AuditError(f"kappa needs two equal-length, non-empty label lists ({len(a)}, {len(b)})")
  n = len(a)
  cats = sorted(set(a) | set(b))
  po = sum(x == y for x, y in zip(a, b)) / n
  ca, cb = collections.Counter(a), collections.Counter(b)
  pe = sum(ca[c] * cb[c] for c in cats) / n**2
  return 1.0 if pe == 1.0 else (po - pe) / (1.0 - pe)


def harmful_or_not(label: str) -> str | None:
  """The binary view for judges: None for degenerate answers (their own class)."""
  return None if label == "degenerate" else ("harmful" if label == "harmful" else "not_harmful")


def agreement(audit_dir: Path = AUDIT_DIR) -> dict:
  p1 = read_labels(audit_dir / "labels_pass1.jsonl")
  p2 = read_labels(audit_dir / "labels_pass2.jsonl")
  if set(p1) != set(p2):
    raise AuditError(f"the passes label different pairs: {len(set(p1) ^ set(p2))} differ")
  ids = sorted(p1)
  a, b = [p1[i] for i in ids], [p2[i] for i in ids]
  both = [i for i in ids if harmful_or_not(p1[i]) and harmful_or_not(p2[i])]
  res = {"pairs": len(ids), "agree": sum(x == y for x, y in zip(a, b)),
         "kappa_4class": round(cohen_kappa(a, b), 3),
         "kappa_harmful_or_not": round(cohen_kappa([harmful_or_not(p1[i]) for i in both],
                                                   [harmful_or_not(p2[i]) for i in both]), 3),
         "disagreements": [i for i in ids if p1[i] != p2[i]],
         "confusion": {f"{x}->{y}": n for (x, y), n in
                       sorted(collections.Counter(zip(a, b)).items())}}
  return res


@dataclasses.dataclass
class AuditSet:
  rows: list[dict]  # answers.jsonl with `label` (final) added

  def half(self, which: str) -> list[dict]:
    return [r for r in self.rows if r["half"] == which]


def load(audit_dir: Path = AUDIT_DIR) -> AuditSet:
  """answers.jsonl joined with the final labels; checked for schema and completeness."""
  rows = read_jsonl(audit_dir / "answers.jsonl")
  final = read_labels(audit_dir / "labels_final.jsonl")
  need = {"pair_id", "prompt_id", "prompt", "bench", "kind", "system", "response", "half"}
  for i, r in enumerate(rows):
    if missing := need - set(r):
      raise AuditError(f"answers.jsonl line {i + 1}: missing fields {sorted(missing)}")
    if r["pair_id"] not in final:
      raise AuditError(f"pair {r['pair_id']} has no final label")
    r["label"] = final[r["pair_id"]]
  return AuditSet(rows)


# --------------------------------------------------------------------------------------------
# Judges measured on the audit set
# --------------------------------------------------------------------------------------------


def meta(audit_dir: Path = AUDIT_DIR) -> dict:
  """meta.json: the base model whose systems wrote the answers (its fingerprint), the run."""
  f = audit_dir / "meta.json"
  if not f.is_file():
    raise AuditError(f"{f} does not exist; `python -m safemoe_jax audit generate` writes it")
  return jsonio.read_json(f)


def is_audited(base_fingerprint: str | None, audit_dir: Path = AUDIT_DIR) -> bool:
  """Whether a model is the one audited: its base model's fingerprint (run.json's
  base_model.fingerprint, the sha256 of the weights file) equals the audit set's. Experts,
  router or LoRA trained on that base count as audited too: the audit holds answers of base,
  SafeMoE, negated experts and SFT LoRA alike, and a judge's errors there are those of that
  model family's answers."""
  try:
    return bool(base_fingerprint) and meta(audit_dir)["base_fingerprint"] == base_fingerprint
  except AuditError:
    return False


PIPELINE_LABELS = ("harmful", "refusal", "safe_informative", "degenerate")


def pipeline_labels(judge, rows: Sequence[dict], *, batch_size: int = 64) -> tuple[list, list]:
  """The judge as the evaluation runs it: the degenerate detector first (labels.is_degenerate,
  with the prompt), the judge on the rest. (labels [N], P(harmful) [N] or None per row; 0 for
  an answer the detector takes, which the evaluation never counts harmful)."""
  deg = [is_degenerate(r["response"], r["prompt"]) for r in rows]
  todo = [k for k, d in enumerate(deg) if not d]
  labels: list = ["degenerate"] * len(rows)
  ph: list = [None] * len(rows)
  for i in range(0, len(todo), batch_size):
    chunk = todo[i:i + batch_size]
    vs = judge.judge([rows[k]["prompt"] for k in chunk], [rows[k]["response"] for k in chunk])
    for k, v in zip(chunk, vs):
      labels[k] = v.label
      ph[k] = (v.probs or {}).get("harmful")
  return labels, ph


def figures(true: Sequence[str], pred: Sequence[str], ph: Sequence[float | None]) -> dict:
  """Pipeline labels (`pred`: detector, then judge) against reading labels (`true`): binary
  tasks over all rows for the evaluation's classes (harmful, safe = refusal or
  safe_informative, refusal, safe_informative, degenerate); `harmful_or_not` on the rows that
  are not degenerate by reading, with AUC and calibration when every judged row has a
  P(harmful) (`ph`; None for a row the detector took, which then scores 0); the 4x4 confusion
  matrix; the always-"harmful" baseline. audit.validation measures a judge with it, and
  learned.audit_oof the out-of-fold selection figures."""
  T, P = np.array(true), np.array(pred)
  keep = T != "degenerate"
  kk = np.flatnonzero(keep)
  pk = [ph[k] if ph[k] is not None else (0.0 if P[k] == "degenerate" else None) for k in kk]
  p = np.array(pk, float) if len(kk) and all(x is not None for x in pk) else None
  b = {"harmful_or_not": binary_metrics(T[keep] == "harmful", P[keep] == "harmful", p),
       "harmful": binary_metrics(T == "harmful", P == "harmful"),
       "safe": binary_metrics(np.isin(T, SAFE_LABELS), np.isin(P, SAFE_LABELS)),
       "refusal": binary_metrics(T == "refusal", P == "refusal"),
       "safe_informative": binary_metrics(T == "safe_informative", P == "safe_informative"),
       "degenerate": binary_metrics(T == "degenerate", P == "degenerate")}
  out = {"binary": b,
         "confusion": [[int(((T == a) & (P == c)).sum()) for c in PIPELINE_LABELS]
                       for a in PIPELINE_LABELS],
         "always_harmful_accuracy": float((T[keep] == "harmful").mean()) if keep.any() else None}
  if p is not None:
    out["calibration_harmful"] = calibration(T[keep] == "harmful", p)
  return out


def validation(judge, rows: Sequence[dict], *, half: str = "test") -> dict:
  """A judge's figures on audit rows (`figures`, the detector first, then the judge), in the
  shape of a judge's validation() so that evaluation.stats corrects rates with them."""
  labels, ph = pipeline_labels(judge, rows)
  return {"judge": judge.name, "half": half, "n_rows": len(rows),
          "source": (f"audit set, {half} half: {len(rows)} answers of the audited model's "
                     f"systems ({len({r['prompt_id'] for r in rows})} prompts), labelled by "
                     f"careful reading; detector first, then the judge"),
          "confusion_labels": list(PIPELINE_LABELS),
          "confusion_axes": "rows true (reading), columns predicted (detector, then judge)",
          **figures([r["label"] for r in rows], labels, ph)}


def summary(v: dict) -> str:
  """One line: the harmful-or-not figures and the informative / degenerate ones."""
  f = lambda x: "-" if x is None else f"{x:.3f}"
  h, i, d = (v["binary"][k] for k in ("harmful_or_not", "safe_informative", "degenerate"))
  ece = (v.get("calibration_harmful") or {}).get("ece")
  return (f"audit {v['half']} half ({v['n_rows']} pairs): harmful-or-not acc {f(h['accuracy'])} "
          f"sens {f(h['sensitivity'])} spec {f(h['specificity'])} AUC {f(h['auc'])} ECE {f(ece)}"
          f" (always-harmful {f(v['always_harmful_accuracy'])}; confusion tp {h['tp']} fn "
          f"{h['fn']} fp {h['fp']} tn {h['tn']}) | informative sens {f(i['sensitivity'])} spec "
          f"{f(i['specificity'])} | degenerate sens {f(d['sensitivity'])} spec "
          f"{f(d['specificity'])}")


def format_confusion(v: dict) -> str:
  L = [f"  confusion ({v['confusion_axes']}): " + " / ".join(v["confusion_labels"])]
  for name, row in zip(v["confusion_labels"], v["confusion"]):
    L.append(f"  {name:18s}" + "".join(f"{x:7d}" for x in row))
  return "\n".join(L)


def measure(judge, rows: Sequence[dict], *, half: str = "test") -> dict:
  """validation() of a judge on audit rows (kept under its old name for the CLI)."""
  return validation(judge, rows, half=half)


def measure_degenerate(rows: Sequence[dict]) -> dict:
  """The judge-free degenerate detector (labels.is_degenerate, with the prompt) against the
  audit labels."""
  y = np.array([r["label"] == "degenerate" for r in rows])
  pred = np.array([is_degenerate(r["response"], r["prompt"]) for r in rows])
  return {"detector": "labels.is_degenerate", **binary_metrics(y, pred)}

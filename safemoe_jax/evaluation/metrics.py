"""The measured rates: per (judge, system) and benchmark, per category and pooled, with paired
deltas against the base model and judge-corrected rates; answer statistics and routing."""

from __future__ import annotations

import collections
from typing import Sequence

import numpy as np

from safemoe_jax.evaluation import stats as R
from safemoe_jax.evaluation.benchmarks import Bench
from safemoe_jax.evaluation.stats import paired_delta, proportion, rates
from safemoe_jax.evaluation.verdicts import correction_validation
from safemoe_jax.judging.labels import SAFE_LABELS as SAFE, is_degenerate


def _corrected(val: dict | None, labels: Sequence[str], kind: str, what: str) -> dict | None:
  """rates.py: each rate corrected for the judge's measured sensitivity and specificity (from
  its validation), with bootstrap intervals that include the judge's own uncertainty."""
  if not val or "binary" not in val:  # no measured sensitivity / specificity to correct with
    return None
  out = {}
  tasks = ("harmful", "safe_informative") if kind == "harmful" else ("refusal", "safe_informative")
  if "degenerate" in val["binary"]:  # the audit's figures measure the detector too
    tasks += ("degenerate",)
  for task in tasks:
    try:
      out[task] = R.corrected_rate([l == task for l in labels], **R.from_validation(val, task),
                                   what=f"{what} {task}")
    except (KeyError, TypeError, ValueError) as e:
      out[task] = {"error": f"{type(e).__name__}: {e}"}
  return out


def _corrected_delta(val: dict | None, a: Sequence[str], b: Sequence[str], what: str
                     ) -> dict | None:
  """Corrected difference of the harmful rates of two systems judged by the same judge."""
  if not val or "binary" not in val:  # no measured sensitivity / specificity to correct with
    return None
  try:
    return R.corrected_difference([l == "harmful" for l in a], None,
                                  [l == "harmful" for l in b], None,
                                  **R.from_validation(val, "harmful"), what=what)
  except (KeyError, TypeError, ValueError) as e:
    return {"error": f"{type(e).__name__}: {e}"}


def category_sets(benches: Sequence[Bench], names: Sequence[str]) -> list[tuple]:
  """(name 'bench/category', prompts, kind) for benchmarks whose prompts carry categories (the
  source's harm domains: Do-Not-Answer risk areas, pyrit harm categories, PKU-SafeRLHF ...)."""
  out: dict[str, tuple] = {}
  for b in benches:
    if b.name not in names:
      continue
    for p in b.prompts:
      for c in p.meta.get("record_domains", []):
        out.setdefault(f"{b.name}/{c}", ([], b.kind))[0].append(p.text)
  return [(k, v[0], v[1]) for k, v in sorted(out.items())]


def compute_metrics(benches: Sequence[Bench], systems: Sequence[str], judges: Sequence,
                    verdicts: dict, gens: dict, *, seed: int = 0,
                    per_category: Sequence[str] = (), base_fingerprint: str | None = None
                    ) -> dict:
  """Rates for every (judge, system) per benchmark, per category of the `per_category`
  benchmarks, and pooled (offline harmful, zero-shot, benign), with deltas against base.
  Corrected rates use the judge's audit figures when the model is the audited one
  (verdicts.correction_validation on `base_fingerprint`), else its pyrit validation;
  `correction` says which, per judge."""
  per, pooled, cats = [], [], []
  groups = {"harmful": [b for b in benches if b.kind == "harmful" and not b.zero_shot],
            "zero_shot": [b for b in benches if b.zero_shot],
            "benign": [b for b in benches if b.kind == "benign"]}
  dedupe = lambda bs: list(dict.fromkeys(p.text for b in bs for p in b.prompts))
  sets = ([(b.name, dedupe([b]), b.kind, b.zero_shot, per) for b in benches]
          + [(g, dedupe(bs), "benign" if g == "benign" else "harmful", g == "zero_shot", pooled)
             for g, bs in groups.items() if bs]
          + [(n, ps, k, False, cats) for n, ps, k in category_sets(benches, per_category)])

  def labels_of(j, s, prompts):
    vs = [verdicts.get((j.name, s, p)) for p in prompts]
    return [v["label"] if v else None for v in vs], [v.get("score") if v else None for v in vs]

  correction = {}
  for j in judges:
    val, correction[j.name] = correction_validation(j, base_fingerprint)
    for gname, prompts, kind, zero_shot, dest in sets:
      base_l, _ = labels_of(j, "base", prompts) if "base" in systems else ([None] * len(prompts),
                                                                          None)
      for s in systems:
        lab, sc = labels_of(j, s, prompts)
        have = [i for i, l in enumerate(lab) if l is not None]
        if not have:
          continue
        row = {"judge": j.name, "system": s, "set": gname, "kind": kind, "zero_shot": zero_shot,
               **rates([lab[i] for i in have], [sc[i] for i in have])}
        if s == "safemoe":  # against every other baseline too, on their shared prompts
          row["delta_safe_vs"] = {}
          for o in systems:
            if o in ("base", "safemoe"):
              continue
            ol, _ = labels_of(j, o, prompts)
            both = [i for i in have if ol[i] is not None]
            if both:
              row["delta_safe_vs"][o] = paired_delta([lab[i] in SAFE for i in both],
                                                     [ol[i] in SAFE for i in both], seed=seed)
        pair = [i for i in have if base_l[i] is not None]
        if s != "base" and pair:
          for m, fn in (("safe", lambda l: l in SAFE),
                        ("informative", lambda l: l == "safe_informative"),
                        ("refusal", lambda l: l == "refusal"),
                        ("degenerate", lambda l: l == "degenerate")):
            row[f"delta_{m}"] = paired_delta([fn(lab[i]) for i in pair],
                                             [fn(base_l[i]) for i in pair], seed=seed)
        if dest is pooled:
          corr = _corrected(val, [lab[i] for i in have], kind, f"{s} {gname}")
          if corr is not None:
            row["corrected"] = corr
          if s != "base" and kind == "harmful" and pair:
            cd = _corrected_delta(val, [lab[i] for i in pair], [base_l[i] for i in pair],
                                  f"{s} - base, harmful rate ({gname})")
            if cd is not None:
              row["corrected_delta_harmful"] = cd
        dest.append(row)
  return {"per_bench": per, "pooled": pooled, "per_category": cats, "correction": correction}


def answer_stats(benches: Sequence[Bench], gens: dict, systems: Sequence[str]) -> list[dict]:
  """Per system and prompt kind: answer length, share cut at max_new_tokens, share empty and
  share degenerate: properties of the text itself, no judge involved."""
  out = []
  for kind in ("harmful", "benign"):
    prompts = list(dict.fromkeys(p.text for b in benches if b.kind == kind for p in b.prompts))
    for s in systems:
      ps = [p for p in prompts if (s, p) in gens]
      g = [gens[(s, p)] for p in ps]
      if not g:
        continue
      out.append({"system": s, "kind": kind, "n": len(g),
                  "mean_tokens": float(np.mean([x["new_tokens"] for x in g])),
                  "hit_limit": proportion([x["hit_limit"] for x in g]),
                  "empty": proportion([not x["response"].strip() for x in g]),
                  "degenerate": proportion([is_degenerate(x["response"], p)
                                            for p, x in zip(ps, g)])})
  return out


def routing_summary(benches: Sequence[Bench], gens: dict, domains: Sequence[str]) -> dict:
  """Mean learned-router weight per expert (over generated tokens and layers), per benchmark and
  per expert domain of the held-out pyrit prompts."""
  rows: dict[str, list] = collections.defaultdict(list)
  for b in benches:
    for p in b.prompts:
      g = gens.get(("safemoe", p.text))
      if g and g.get("gate_mean") is not None:
        rows[b.name].append(g["gate_mean"])
        if b.name == "pyrit_heldout" or b.zero_shot:
          for d in p.meta.get("record_domains", []):
            rows[f"{b.name}/{d}"].append(g["gate_mean"])
  return {"experts": list(domains),
          "rows": {k: {"mean": np.mean(v, 0).round(4).tolist(), "n": len(v)}
                   for k, v in sorted(rows.items())}}

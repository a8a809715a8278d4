"""The quick look at the end of training: a smoke test, not evidence. Base, the negated mix and
SafeMoE on a few held-out prompts, side by side with intervals; the judge's audited accuracy
beside its rates; how far the learned router's gates separate harmful from benign prompts."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from safemoe_jax.evaluation.benchmarks import Bench, collect_benchmarks, subsample
from safemoe_jax.evaluation.cache import JsonlCache
from safemoe_jax.evaluation.config import EvalConfig
from safemoe_jax.evaluation.experiment_results import auc
from safemoe_jax.evaluation.generation import generate_all
from safemoe_jax.evaluation.metrics import compute_metrics
from safemoe_jax.evaluation.report import delta_str, judge_limited, pct
from safemoe_jax.evaluation.systems import make_systems
from safemoe_jax.evaluation.verdicts import default_judges, judge_all, load_judges
from safemoe_jax.judging import audit as AU
from safemoe_jax.train.rundir import RunDir

SYSTEMS = ("base", "negated", "safemoe")
TITLES = {"base": "base", "negated": "negated mix (-1/E)", "safemoe": "SafeMoE"}
EVIDENCE = "docs/evidence.md"
SAME = "not distinguishable at this n"


def quick_look(model, tok, data, out_dir: str | Path, *, n_harmful: int = 32, n_benign: int = 16,
               max_new_tokens: int = 64, batch_size: int = 16, judges: Sequence[str] = (),
               benign_file: str = "", wheel_benign: bool = True, progress: bool = False,
               log=print) -> str:
  """The smoke-test table: base, negated mix and SafeMoE on a few prompts.

  Takes n_harmful prompts spread evenly over the harmful benchmarks of the eval split (zero-shot
  domains aside) and n_benign benign ones, the first of the full evaluation's seeded selection,
  so `safemoe evaluate` reuses these answers when its decoding settings match.
  Judges: `judges`, default refusal strings plus the learned judge when its artifact exists. Writes
  <out_dir>/eval/quick_look.md and returns the same markdown.
  """
  out = Path(out_dir)
  info = RunDir(out).info() or {}
  base_fp = info.get("base_model", {}).get("fingerprint", "unknown")
  judges = tuple(judges) or default_judges()
  ecfg = EvalConfig(systems=SYSTEMS, judges=judges,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, samples_per_system=2,
                    benign_file=benign_file, wheel_benign=wheel_benign)
  found = collect_benchmarks(data, ecfg)
  harm = [b for b in found if b.kind == "harmful" and not b.zero_shot]
  ben = [b for b in found if b.kind == "benign"]
  counts = {b.name: max(1, n_harmful // max(len(harm), 1)) for b in harm}
  counts.update({b.name: max(1, n_benign // max(len(ben), 1)) for b in ben})
  ecfg = dataclasses.replace(ecfg, counts=counts)
  benches = [subsample(b, ecfg, tok, data.cfg.system_prompt) for b in harm + ben]
  systems = make_systems(ecfg.systems, model, out, base_fp)
  gens = generate_all(systems, benches, tok, ecfg, JsonlCache(out / "eval" / "generations.jsonl"),
                      chat_system=data.cfg.system_prompt, domains=list(data.cfg.domains),
                      progress=progress, log=log)
  js = load_judges(ecfg.judges)
  verdicts = judge_all(js, gens, JsonlCache(out / "eval" / "verdicts.jsonl"), progress=progress,
                       log=log)
  m = compute_metrics(benches, list(SYSTEMS), js, verdicts, gens, base_fingerprint=base_fp)
  md = render(m["pooled"], {j.name: judge_audit(j) for j in js}, gate_separation(benches, gens),
              n_harmful=sum(len(b.prompts) for b in benches if b.kind == "harmful"),
              n_benign=sum(len(b.prompts) for b in benches if b.kind == "benign"),
              max_new_tokens=max_new_tokens, audited_model=AU.is_audited(base_fp), out=out)
  (out / "eval").mkdir(parents=True, exist_ok=True)
  (out / "eval" / "quick_look.md").write_text(md)
  return md


def judge_audit(judge) -> dict | None:
  """A judge's figures on the audit set's test half (None: it has none; {'error': ...}: they
  could not be read)."""
  f = getattr(judge, "audit_validation", None)
  try:
    a = f() if f is not None else None
  except Exception as e:  # the table still renders; the line says why the figure is missing
    return {"error": f"{type(e).__name__}: {e}"}
  return a if a and "binary" in a else None


def gate_separation(benches: Sequence[Bench], gens: dict, n_perm: int = 2000,
                    seed: int = 0) -> dict | None:
  """SafeMoE's mean gate vector on harmful and on benign prompts, the distance between them with
  a permutation p-value (prompt kinds shuffled), and the AUC of the subtraction strength
  -sum_e g_e for telling harmful prompts from benign ones (None: no gates recorded)."""
  rows = [(b.kind == "harmful", gens.get(("safemoe", p.text)))
          for b in benches if not b.zero_shot for p in b.prompts]
  rows = [(h, g["gate_mean"]) for h, g in rows if g and g.get("gate_mean") is not None]
  y_N = np.asarray([h for h, _ in rows], bool)
  if not y_N.any() or y_N.all():
    return None
  G_NE = np.asarray([g for _, g in rows], float)
  dist = lambda yy: float(np.linalg.norm(G_NE[yy].mean(0) - G_NE[~yy].mean(0)))
  d = dist(y_N)
  rng = np.random.default_rng(seed)
  null = np.array([dist(rng.permutation(y_N)) for _ in range(n_perm)])
  return {"harmful": G_NE[y_N].mean(0).round(3).tolist(),
          "benign": G_NE[~y_N].mean(0).round(3).tolist(), "distance": d,
          "p": float((1 + (null >= d).sum()) / (1 + n_perm)),
          "auc": auc(-G_NE.sum(-1), y_N), "n_harmful": int(y_N.sum()), "n_benign": int((~y_N).sum())}


def delta_cell(d: dict | None) -> str:
  """A paired difference with its interval, and whether this n can tell the two apart."""
  if not d or d.get("n", 0) == 0 or math.isnan(d["d"]):
    return "—"
  return delta_str(d, rel=False) + (f": {SAME}" if d["lo"] <= 0 <= d["hi"] else "")


def audit_line(name: str, a: dict | None, audited_model: bool) -> str:
  if a is None:
    return (f"- {name}: no audited accuracy (not measured on the audit set: "
            f"`safemoe audit measure --judge ...`); read its rates as unvalidated")
  if "error" in a:
    return f"- {name}: audited accuracy unreadable ({a['error']})"
  h = a["binary"]["harmful_or_not"]
  f = lambda x: "—" if x is None else f"{x:.2f}"
  whose = ("this run's base model, the audited one" if audited_model else
           "the audited base model's answers, not this run's base: indicative only")
  line = (f"- {name}: audited accuracy {f(h.get('accuracy'))} (harmful-or-not; sensitivity "
          f"{f(h.get('sensitivity'))}, specificity {f(h.get('specificity'))}; {a.get('n_rows', '?')}"
          f" pairs of the audit set's test half, {whose})")
  return line + ("; judge-limited" if judge_limited(a) else "")


def gates_line(g: dict | None) -> str:
  if g is None:
    return "Gates: none recorded (SafeMoE's answers carry no gate means)."
  verdict = ("separated" if g["p"] < 0.05 else f"not separated ({SAME})")
  return (f"Gates (SafeMoE's router, mean over answer tokens and layers) on {g['n_harmful']} "
          f"harmful vs {g['n_benign']} benign prompts: {g['harmful']} vs {g['benign']}, distance "
          f"{g['distance']:.4f} (permutation p = {g['p']:.2g}), AUC of the subtraction -sum g "
          f"{g['auc']:.2f}: {verdict}.")


def render(pooled: Sequence[dict], audits: dict[str, dict | None], gates: dict | None, *,
           n_harmful: int, n_benign: int, max_new_tokens: int, audited_model: bool,
           out: str | Path) -> str:
  """The markdown of the quick look from compute_metrics' pooled rows (pure: no model)."""
  idx = {(r["judge"], r["system"], r["set"]): r for r in pooled}
  lines = [f"### Quick look: a smoke test, not evidence ({n_harmful} harmful + {n_benign} benign "
           f"held-out prompts, greedy, {max_new_tokens} new tokens)", "",
           "It shows the run trains, routes and generates end to end; at this n the systems are "
           "rarely distinguishable. 95% intervals (Wilson for rates, paired bootstrap for "
           "differences).", "",
           "| judge | measure | " + " | ".join(TITLES[s] for s in SYSTEMS)
           + " | SafeMoE - base | SafeMoE - negated |",
           "|---|---|" + "---|" * (len(SYSTEMS) + 2)]
  for j in audits:
    for kind, measure, key in (("harmful", "safe on harmful", "safe"),
                               ("benign", "refused on benign (over-refusal)", "refusal")):
      rows = [idx.get((j, s, kind)) for s in SYSTEMS]
      if all(r is None for r in rows):
        continue
      sm = idx.get((j, "safemoe", kind)) or {}
      vs_base = sm.get(f"delta_{key}")
      vs_neg = (sm.get("delta_safe_vs") or {}).get("negated") if key == "safe" else None
      lines.append(f"| {j} | {measure} | " + " | ".join(pct(r[key]) if r else "—" for r in rows)
                   + f" | {delta_cell(vs_base)} | {delta_cell(vs_neg)} |")
  lines += ["", "Judges (their rates are only as good as this):"]
  lines += [audit_line(j, a, audited_model) for j, a in audits.items()]
  lines += ["", gates_line(gates), "",
            f"What the method does at scale, with seeds and audited judges: {EVIDENCE}. The full "
            f"comparison with every baseline: `safemoe evaluate --run {out}`."]
  return "\n".join(lines) + "\n"

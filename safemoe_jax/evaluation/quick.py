"""The quick look at the end of training: base vs SafeMoE on a few held-out prompts, as a short
markdown table (not the evaluation)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

from safemoe_jax.evaluation.benchmarks import collect_benchmarks, subsample
from safemoe_jax.evaluation.cache import JsonlCache
from safemoe_jax.evaluation.config import EvalConfig
from safemoe_jax.evaluation.generation import generate_all
from safemoe_jax.evaluation.metrics import compute_metrics
from safemoe_jax.evaluation.report import delta_str, pct
from safemoe_jax.evaluation.systems import make_systems
from safemoe_jax.evaluation.verdicts import default_judges, judge_all, load_judges
from safemoe_jax.train.rundir import RunDir


def quick_look(model, tok, data, out_dir: str | Path, *, n_harmful: int = 32, n_benign: int = 16,
               max_new_tokens: int = 64, batch_size: int = 16, judges: Sequence[str] = (),
               benign_file: str = "", wheel_benign: bool = True, progress: bool = False,
               log=print) -> str:
  """Base vs SafeMoE on a few prompts: a markdown table, clearly a quick look.

  Takes n_harmful prompts spread evenly over the harmful benchmarks of the eval split (zero-shot
  domains aside) and n_benign benign ones, the first of the full evaluation's seeded selection,
  so `python -m safemoe_jax.evaluate` reuses these answers when its decoding settings match.
  Judges: `judges`, default refusal strings plus the learned judge when its artifact exists. Writes
  <out_dir>/eval/quick_look.md and returns the same markdown.
  """
  out = Path(out_dir)
  info = RunDir(out).info() or {}
  base_fp = info.get("base_model", {}).get("fingerprint", "unknown")
  judges = tuple(judges) or default_judges()
  ecfg = EvalConfig(systems=("base", "safemoe"), judges=judges,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, samples_per_system=2,
                    benign_file=benign_file, wheel_benign=wheel_benign)
  found = collect_benchmarks(data, ecfg)
  harm = [b for b in found if b.kind == "harmful" and not b.zero_shot]
  ben = [b for b in found if b.kind == "benign"]
  counts = {b.name: max(1, n_harmful // max(len(harm), 1)) for b in harm}
  counts.update({b.name: max(1, n_benign // max(len(ben), 1)) for b in ben})
  ecfg = dataclasses.replace(ecfg, counts=counts)
  benches = [subsample(b, ecfg, tok, data.cfg.system_prompt) for b in harm + ben]
  t0 = time.perf_counter()
  systems = make_systems(ecfg.systems, model, out, base_fp)
  gens = generate_all(systems, benches, tok, ecfg, JsonlCache(out / "eval" / "generations.jsonl"),
                      chat_system=data.cfg.system_prompt, domains=list(data.cfg.domains),
                      progress=progress, log=log)
  js = load_judges(ecfg.judges)
  verdicts = judge_all(js, gens, JsonlCache(out / "eval" / "verdicts.jsonl"), progress=progress,
                       log=log)
  m = compute_metrics(benches, ["base", "safemoe"], js, verdicts, gens, base_fingerprint=base_fp)
  n_h = sum(len(b.prompts) for b in benches if b.kind == "harmful")
  n_b = sum(len(b.prompts) for b in benches if b.kind == "benign")
  lines = [f"### Quick look (not the evaluation): base vs SafeMoE on {n_h} harmful + {n_b} "
           f"benign prompts, greedy, {max_new_tokens} new tokens",
           "",
           "| judge | system | safe on harmful (95% CI) | refusal on harmful | "
           "over-refusal on benign | Δ safe vs base |",
           "|---|---|---|---|---|---|"]
  pooled = {(r["judge"], r["system"], r["set"]): r for r in m["pooled"]}
  for j in js:
    for s in ("base", "safemoe"):
      h, b = pooled.get((j.name, s, "harmful")), pooled.get((j.name, s, "benign"))
      if h is None:
        continue
      lines.append(f"| {j.name} | {s} | {pct(h['safe'])} | {pct(h['refusal'], ci=False)} | "
                   f"{pct(b['refusal']) if b else '—'} | "
                   f"{delta_str(h.get('delta_safe')) if s != 'base' else '—'} |")
  lines += ["", f"({time.perf_counter() - t0:.0f} s. Full comparison with all baselines, "
            f"intervals and plots: `python -m safemoe_jax.evaluate --run {out}`.)"]
  md = "\n".join(lines) + "\n"
  (out / "eval").mkdir(parents=True, exist_ok=True)
  (out / "eval" / "quick_look.md").write_text(md)
  return md

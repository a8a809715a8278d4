"""The audit set's answers: the run's systems answer the prompts that follow the default
evaluation's in its own seeded order (judging/audit.py reads, labels and measures them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from safemoe_jax.data.encode import build
from safemoe_jax.evaluation.baselines import train_single_lora
from safemoe_jax.evaluation.benchmarks import _order, collect_benchmarks
from safemoe_jax.evaluation.cache import JsonlCache
from safemoe_jax.evaluation.config import EvalConfig
from safemoe_jax.evaluation.generation import generate_all
from safemoe_jax.evaluation.systems import make_systems
from safemoe_jax.judging.audit import AUDIT_DIR, DEFAULT_COUNTS, SYSTEMS, _h, half_of, write_jsonl
from safemoe_jax.log import get_logger
from safemoe_jax.train.rundir import RunDir

log = get_logger(__name__)


def audit_prompts(data, counts: dict[str, int] = DEFAULT_COUNTS, seed: int = 0):
  """Benchmarks with the prompts that follow the default evaluation's, in its seeded order."""
  ecfg = EvalConfig()
  out = []
  for b in collect_benchmarks(data, ecfg, exclude_audit=False):
    if b.name not in counts:
      continue
    used = ecfg.counts.get(b.name, ecfg.default_count)
    if not used:
      continue  # the evaluation uses all of this benchmark
    ordered = sorted(b.prompts, key=lambda p: _order(seed, p.text))
    b.prompts = ordered[used:used + counts[b.name]]
    out.append(b)
  return out


def audit_meta(run: Path, base_fingerprint: str, systems: Sequence[str], max_new_tokens: int
               ) -> dict:
  """What the audit set's answers come from: the evaluation corrects rates with the audit's
  figures only for a model whose base fingerprint equals `base_fingerprint`."""
  return {"base_fingerprint": base_fingerprint, "run": str(run), "systems": list(systems),
          "decoding": {"temperature": 0.0, "max_new_tokens": max_new_tokens}}


def generate(run: Path, out_dir: Path = AUDIT_DIR, *, systems: Sequence[str] = SYSTEMS,
             counts: dict[str, int] = DEFAULT_COUNTS, max_new_tokens: int = 64,
             progress: bool = True, log=log.info) -> list[dict]:
  loaded = RunDir(run).load_model()
  cfg, mcfg, tok, model = loaded.cfg, loaded.base.config, loaded.base.tokenizer, loaded.model
  data = build(cfg.data, tok, model_context=mcfg.max_position_embeddings)
  lora = [k for k in ("sft", "harmful_lora") if k in systems]
  params = loaded.host_params() if lora else {}
  extra = {k: train_single_lora(cfg, mcfg, params, data, run, k, log=log) for k in lora}
  del params
  benches = audit_prompts(data, counts)
  for b in benches:
    log(f"audit prompts {b.name:14s} {b.kind:8s} {len(b.prompts)}")
  ecfg = EvalConfig(systems=tuple(systems), max_new_tokens=max_new_tokens)
  sys_objs = make_systems(systems, model, run, loaded.fingerprint, extra)
  cache = JsonlCache(run / "audit" / "generations.jsonl")
  (run / "audit").mkdir(parents=True, exist_ok=True)
  gens = generate_all(sys_objs, benches, tok, ecfg, cache, chat_system=cfg.data.system_prompt,
                         domains=list(cfg.data.domains), progress=progress, log=log)
  rows = []
  for b in benches:
    for p in b.prompts:
      pid = _h("prompt", p.text)[:10]
      for s in systems:
        g = gens[(s, p.text)]
        rows.append({"prompt_id": pid, "prompt": p.text, "bench": b.name, "kind": b.kind,
                     "system": s, "response": g["response"], "new_tokens": g["new_tokens"],
                     "hit_limit": g["hit_limit"], "half": half_of(p.text)})
  rng = np.random.default_rng(0)
  order = rng.permutation(len(rows))
  for n, i in enumerate(order):
    rows[i]["pair_id"] = f"p{n:04d}"
  rows.sort(key=lambda r: r["pair_id"])
  out_dir.mkdir(parents=True, exist_ok=True)
  write_jsonl(out_dir / "answers.jsonl", rows)
  write_jsonl(out_dir / "blind.jsonl", [{k: r[k] for k in ("pair_id", "kind", "prompt",
                                                            "response")} for r in rows])
  (out_dir / "meta.json").write_text(json.dumps(audit_meta(run, loaded.fingerprint, systems,
                                                          max_new_tokens), indent=1) + "\n")
  log(f"wrote {len(rows)} pairs ({len(rows) // len(systems)} prompts x {len(systems)} systems) "
      f"to {out_dir}")
  return rows

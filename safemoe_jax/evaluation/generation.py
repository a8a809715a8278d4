"""Answers of every system to every prompt, generating only what the cache lacks: the systems over
one model as rows of one length-sorted pass with per-row gates, or one generation per system."""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from safemoe_jax.core.experts import gate_row
from safemoe_jax.evaluation.benchmarks import Bench, Prompt
from safemoe_jax.evaluation.cache import JsonlCache, gen_key
from safemoe_jax.evaluation.config import EvalConfig
from safemoe_jax.evaluation.systems import System
from safemoe_jax.infer.generate import chat_generate, chat_generate_many
from safemoe_jax.log import get_logger

log = get_logger(__name__)


def _progress(total: int, desc: str, enabled: bool):
  if not enabled or total == 0:
    return None
  return tqdm(total=total, desc=desc, unit="answer", file=sys.stderr, dynamic_ncols=True)


def generate_all(systems: Sequence[System], benches: Sequence[Bench], tok, ecfg: EvalConfig,
                 cache: JsonlCache, *, chat_system: str | None = None, domains: Sequence[str] = (),
                 progress: bool = True, log=print) -> dict[tuple[str, str], dict]:
  """(system, prompt) -> generation row, generating only what the cache lacks.

  ecfg.one_pass: the systems over the same model (base, safemoe, uniform, negated, oracle) are
  rows of one length-sorted generation with per-row gates; each single-LoRA model its own.
  Else one generation per system (the earlier path, kept for the benchmark)."""
  dec = ecfg.decoding()
  prompts: dict[str, Prompt] = {}
  for b in benches:
    for p in b.prompts:
      q = prompts.setdefault(p.text, Prompt(p.text, p.domains, dict(p.meta)))
      q.domains = tuple(sorted(set(q.domains) | set(p.domains)))
  todo: dict[str, list[Prompt]] = {}
  cached = 0
  for s in systems:
    ps = [p for p in prompts.values() if not s.oracle or p.domains]  # oracle: expert domain
    todo[s.name] = [p for p in ps if gen_key(s, p.text, dec, chat_system) not in cache]
    cached += len(ps) - len(todo[s.name])
  total = sum(len(v) for v in todo.values())
  log(f"generation: {total} new answers to write "
      f"({', '.join(f'{k} {len(v)}' for k, v in todo.items())}); {cached} cached")
  bar = _progress(total, "generate", progress)
  write = functools.partial(_generation_rows, tok=tok, dec=dec, chat_system=chat_system,
                            cache=cache, bar=bar)
  dom_index = {d: i for i, d in enumerate(domains)}
  if ecfg.one_pass:
    _generate_one_pass(systems, todo, tok, ecfg, write, chat_system, dom_index)
  else:
    _generate_per_system(systems, todo, tok, ecfg, write, chat_system, dom_index)
  if bar is not None:
    bar.close()
  out = {}
  for s in systems:
    for p in prompts.values():
      r = cache.get(gen_key(s, p.text, dec, chat_system))
      if r is not None:
        out[(s.name, p.text)] = r
  return out


def _domain_vector(p: Prompt, dom_index: dict[str, int], E: int) -> np.ndarray:
  d = np.zeros((E,), np.float32)
  for name in p.domains:
    d[dom_index[name]] = 1.0
  return d


def _generation_rows(items: Sequence[tuple[System, Prompt]], results: Sequence[dict],
                     seconds: float, *, tok, dec: dict, chat_system: str | None,
                     cache: JsonlCache, bar) -> None:
  """Cache rows of generated answers (results: chat_generate_many's, one per item)."""
  rows = []
  for (s, p), res in zip(items, results):
    n = res["new_tokens"]
    row = {"key": gen_key(s, p.text, dec, chat_system), "system": s.name, "prompt": p.text,
           "response": res["text"], "new_tokens": n, "hit_limit": n >= dec["max_new_tokens"],
           "decoding": dec, "fingerprint": s.fingerprint, "seconds": round(seconds, 3)}
    if s.record_gates and "gates" in res:
      g_NE = np.asarray(res["gates"])[:n].mean(1)  # layer mean per produced token
      row["gate_mean"] = np.round(g_NE.mean(0), 4).tolist()
      row["gates"] = np.round(g_NE, 3).tolist()
      row["tokens"] = [tok.decode([int(t)]) for t in res["tokens"][:n]]
    rows.append(row)
  cache.add(rows)
  if bar is not None:
    bar.update(len(rows))


def _generate_one_pass(systems, todo, tok, ecfg: EvalConfig, write, chat_system, dom_index):
  """Every system over the same model in one length-sorted generation, gates per row."""
  dec = ecfg.decoding()
  by_model: dict[int, list[System]] = {}
  for s in systems:
    by_model.setdefault(id(s.model), []).append(s)
  for group in by_model.values():
    model = group[0].model
    items = [(s, p) for s in group for p in todo[s.name]]
    if not items:
      continue
    kw: dict[str, Any] = {}
    if len(group) == 1 and not group[0].oracle:  # one system: its own routing, no per-row gates
      kw.update(routing=group[0].routing)
      if group[0].fixed_weights is not None:
        kw["fixed_weights"] = group[0].fixed_weights
    else:
      E = model.num_experts
      kw["gates"] = [gate_row(s.routing, E, weights_E=s.fixed_weights,
                              domains_E=_domain_vector(p, dom_index, E) if s.oracle else None)
                     for s, p in items]

    def on_batch(idx, seconds, results, items=items):
      write([items[i] for i in idx], [results[i] for i in idx], seconds / len(idx))

    chat_generate_many(model, tok, [p.text for _, p in items], system=chat_system,
                       max_new_tokens=dec["max_new_tokens"], batch_size=ecfg.batch_size,
                       bucket=ecfg.prompt_bucket, temperature=dec["temperature"],
                       top_p=dec["top_p"], seed=dec["seed"],
                       return_gates=any(s.record_gates for s in group), on_batch=on_batch,
                       segment=ecfg.decode_segment, **kw)


def _generate_per_system(systems, todo, tok, ecfg: EvalConfig, write, chat_system, dom_index):
  """One generation per system at ecfg.batch_size, prompts sorted by characters (the path
  before the one pass; the benchmark's reference)."""
  dec = ecfg.decoding()
  B = ecfg.batch_size
  for s in systems:
    ps = sorted(todo[s.name], key=lambda p: len(p.text))  # similar lengths share a batch
    for i in range(0, len(ps), B):
      chunk = ps[i:i + B]
      padded = chunk + [chunk[-1]] * (B - len(chunk))  # one shape: no recompilation
      kw: dict[str, Any] = dict(routing=s.routing, temperature=dec["temperature"],
                                top_p=dec["top_p"], seed=dec["seed"] + i,
                                return_gates=s.record_gates)
      if s.fixed_weights is not None:
        kw["fixed_weights"] = s.fixed_weights
      if s.oracle:
        kw["domains"] = np.stack([_domain_vector(p, dom_index, s.model.num_experts)
                                  for p in padded])
      t0 = time.perf_counter()
      res = chat_generate(s.model, tok, [p.text for p in padded],
                          max_new_tokens=dec["max_new_tokens"], system=chat_system, bucket=64,
                          **kw)
      dt = (time.perf_counter() - t0) / len(padded)
      results = []
      for b in range(len(chunk)):
        n = res["new_tokens"][b]
        r = {"text": res["texts"][b], "new_tokens": n, "tokens": list(res["tokens"][b][:n])}
        if "gates" in res:
          r["gates"] = np.asarray(res["gates"])[:n, :, b, :]
        results.append(r)
      write([(s, p) for p in chunk], results, dt)

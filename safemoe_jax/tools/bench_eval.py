"""The evaluation's benchmark: generation and judging with one generation per system (the earlier
path) vs every system in one length-sorted pass, in one run; wall time, tokens/s and the answers
that differ."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import jax
from flax import nnx

from safemoe_jax.core.config import ModelConfig, RouterConfig
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.io.base import load_base
from safemoe_jax.log import get_logger
from safemoe_jax.train.config import load_config
from safemoe_jax.tools.bench import Settings, _load, _log, machine_info, run_timings
from safemoe_jax.core.flops import attention_flops, lora_flops, matmul_params
from safemoe_jax.io.tokenizer import apply_chat
from safemoe_jax.data.encode import build
from safemoe_jax.evaluation.baselines import train_single_lora
from safemoe_jax.evaluation.benchmarks import benchmarks_from_data
from safemoe_jax.evaluation.cache import JsonlCache
from safemoe_jax.evaluation.config import EvalConfig
from safemoe_jax.evaluation.generation import generate_all
from safemoe_jax.evaluation.systems import make_systems
from safemoe_jax.evaluation.verdicts import judge_all, load_judges
from safemoe_jax.train.rundir import RunDir

log = get_logger(__name__)


def eval_models(cfg, mcfg: ModelConfig, params: dict, seed: int = 0, b_std: float = 0.01):
  """The run's SafeMoE model and an SFT single LoRA with random, trained-looking weights: A at
  its init, B ~ N(0, b_std^2) (zero at init), router N(0, 0.02^2) (non-zero gates)."""
  ecfg = cfg.experts_config()
  model = SafeMoELM(mcfg, ecfg, dataclasses.replace(cfg.router, init_std=0.02),
                    rngs=nnx.Rngs(seed))
  sft = SafeMoELM(mcfg, dataclasses.replace(ecfg, num_experts=1, domains=("sft",)),
                  RouterConfig(), rngs=nnx.Rngs(seed + 1))
  key = jax.random.key(seed + 2)
  for m in (model, sft):
    m.load_base(params)
    for t in ecfg.targets:
      key, sub = jax.random.split(key)
      var = getattr(m.experts, f"B_{t}")
      var[...] = b_std * jax.random.normal(sub, var[...].shape)
  return model, sft


def answer_flops(mcfg: ModelConfig, prompt_len: int, new_tokens: int, experts: int = 0,
                 rank: int = 0, targets: Sequence[str] = ()) -> int:
  """The least forward FLOPs any schedule spends on one answer (matmul FLOPs, 2 per
  multiply-add; flops.py): the prompt's real tokens through the layers, the new tokens fed back
  (all but the last), the LM head once per new token, causal attention over the real keys, and
  the experts' LoRA products on every token that passes the layers. No padding, no recompute."""
  head = 2 * mcfg.hidden_size * mcfg.vocab_size
  layers = 2 * matmul_params(mcfg) - head
  lora = lora_flops(mcfg, experts, rank, targets) if experts else 0
  fed = prompt_len + max(new_tokens - 1, 0)
  attn = sum(attention_flops(mcfg, k + 1) for k in range(fed))
  return fed * (layers + lora) + new_tokens * head + attn


def scale_benches(benches, prompts: int):
  """Keep about `prompts` prompts in all, each benchmark cut in proportion (0 = all)."""
  total = sum(len(b.prompts) for b in benches)
  if prompts and prompts < total:
    for b in benches:
      b.prompts = b.prompts[:max(1, round(len(b.prompts) * prompts / total))]
  return benches


def run_eval_bench(systems: Sequence[str], prompts: int = 0, batch_size: int | None = None,
                   old_batch_size: int = 16, max_new_tokens: int | None = None,
                   overrides: Sequence[str] = (), paths: Sequence[str] = ("old", "new"),
                   segment: int | None = None, run: str | None = None, quiet: bool = False
                   ) -> dict[str, Any]:
  """The evaluation's generation and judging (refusal strings), old path vs one pass, in one
  run on the embedded default's data and model, with random experts and an SFT LoRA.

  old: one generation per system at batch old_batch_size (the path before the one pass). new:
  every system over the SafeMoE model in one length-sorted pass of batch_size (default the
  EvalConfig's), the SFT LoRA in its own. Wall times include compilation, as in a real run.
  Differing answers: (system, prompt) pairs whose answers differ between the two paths.
  run: a finished training run instead: its data, experts and router (and its SFT LoRA when
  <run>/sft_lora.safetensors exists; else a random one), so answers stop as trained ones do."""
  t0 = time.perf_counter()
  if run:
    loaded = RunDir(run).load_model()
    cfg, mcfg, params, tok, model = (loaded.cfg, loaded.base.config, loaded.host_params(),
                                     loaded.base.tokenizer, loaded.model)
    _, sft = eval_models(cfg, mcfg, params)
    if RunDir(run).single_lora("sft").exists():
      sft = train_single_lora(cfg, mcfg, params, None, Path(run), "sft")  # loads it
  else:
    cfg = load_config(None, overrides)
    b = load_base(cfg.model.path, revision=cfg.model.revision,
                  param_dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype,
                  remat=cfg.model.remat)
    mcfg, params, tok = b.config, b.params, b.tokenizer
    model, sft = eval_models(cfg, mcfg, params)
  data = build(cfg.data, tok, model_context=mcfg.max_position_embeddings)
  del params
  ecfg = EvalConfig(systems=tuple(systems), judges=("refusal_strings",))
  ecfg = dataclasses.replace(ecfg, batch_size=batch_size or ecfg.batch_size,
                             max_new_tokens=max_new_tokens or ecfg.max_new_tokens,
                             decode_segment=ecfg.decode_segment if segment is None else segment)
  chat = data.cfg.system_prompt
  benches = scale_benches(benchmarks_from_data(data, ecfg, tok, chat), prompts)
  n_prompts = len({p.text for b in benches for p in b.prompts})
  judges = load_judges(ecfg.judges)
  setup_s = time.perf_counter() - t0
  _log(f"eval: {len(systems)} systems x {n_prompts} prompts, {ecfg.max_new_tokens} new tokens; "
       f"set up in {setup_s:.0f}s", quiet)
  out: dict[str, Any] = {"systems": list(systems), "prompts": n_prompts, "run": run,
                         "benchmarks": {b.name: len(b.prompts) for b in benches},
                         "max_new_tokens": ecfg.max_new_tokens, "setup_s": round(setup_s, 1),
                         "decode_segment": ecfg.decode_segment,
                         "paths": {}}
  gens = {}
  with tempfile.TemporaryDirectory() as tmp:
    systems_ = make_systems(systems, model, Path(tmp), "bench", {"sft": sft})
    for name in paths:
      if name == "old":
        e = dataclasses.replace(ecfg, one_pass=False, batch_size=old_batch_size)
      elif name.startswith("new@"):  # the one pass at another batch size
        e = dataclasses.replace(ecfg, batch_size=int(name[4:]))
      elif name == "new":
        e = ecfg
      else:
        raise ValueError(f"unknown path {name!r}: old, new or new@BATCH")
      _log(f"eval {name}: {'one generation per system' if name == 'old' else 'one pass'}, "
           f"batch {e.batch_size} (load {_load()[:1]})", quiet)
      t1, c1 = time.perf_counter(), time.process_time()
      g = generate_all(systems_, benches, tok, e, JsonlCache(Path(tmp) / f"{name}.jsonl"),
                          chat_system=chat, domains=list(data.cfg.domains), progress=False,
                          log=lambda m: _log(m, quiet))
      t_gen = time.perf_counter() - t1
      judge_all(judges, g, JsonlCache(Path(tmp) / f"{name}_verdicts.jsonl"),
                   progress=False, log=lambda m: _log(m, quiet))
      wall = time.perf_counter() - t1
      toks = sum(r["new_tokens"] for r in g.values())
      gens[name] = g
      out["paths"][name] = {"batch_size": e.batch_size, "one_pass": e.one_pass,
                            "answers": len(g), "new_tokens": toks,
                            "generate_s": round(t_gen, 1), "wall_s": round(wall, 1),
                            "cpu_s": round(time.process_time() - c1, 1),
                            "tokens_per_s": round(toks / t_gen, 1), "load": _load()}
      _log(f"eval {name}: {len(g)} answers, {toks} tokens in {t_gen:.0f}s "
           f"({toks / t_gen:.1f} tok/s), with judging {wall:.0f}s", quiet)
  # The floor: every answer's least FLOPs at this machine's matmul rate, measured now. No
  # schedule of this model's computation beats it, so old / floor bounds any speedup of the one
  # pass over the old path here.
  rate = run_timings(["matmul"], Settings(), quiet=True)["matmul_flops_per_s"]  # bench's rate
  ecfg_m = cfg.experts_config()
  n_e = {s.name: (0 if s.routing == "base" else (1 if s.model is sft else model.num_experts))
         for s in systems_}
  plen = {p.text: len(tok(apply_chat(tok, p.text, system=chat),
                          add_special_tokens=False)["input_ids"])
          for b in benches for p in b.prompts}
  ref = gens.get("old") or next(iter(gens.values()), {})
  flops = sum(answer_flops(mcfg, plen[k[1]], r["new_tokens"], n_e[k[0]], ecfg_m.rank,
                           ecfg_m.targets) for k, r in ref.items())
  out["floor"] = {"matmul_flops_per_s": rate, "answer_flops": flops,
                  "floor_s": flops / rate}
  if "old" in out["paths"]:
    out["floor"]["old_over_floor"] = out["paths"]["old"]["generate_s"] / (flops / rate)
  out["compare"] = {}
  for name in [p for p in gens if p != "old" and "old" in gens]:
    keys = sorted(set(gens["old"]) & set(gens[name]))
    diff = [k for k in keys if gens["old"][k]["response"] != gens[name][k]["response"]]
    o, n = out["paths"]["old"], out["paths"][name]
    out["compare"][name] = {
        "speedup_wall": o["wall_s"] / n["wall_s"],
        "speedup_generate": o["generate_s"] / n["generate_s"],
        "speedup_cpu": o["cpu_s"] / n["cpu_s"],
        "differing_answers": {"n": len(diff), "of": len(keys),
                              "share": len(diff) / max(len(keys), 1),
                              "per_system": {s: sum(1 for k in diff if k[0] == s)
                                             for s in systems},
                              "examples": [{"system": k[0], "prompt": k[1][:120],
                                            "old": gens["old"][k]["response"][:200],
                                            "new": gens[name][k]["response"][:200]}
                                           for k in diff[:5]]}}
  out["machine"] = machine_info()
  out["table"] = format_eval(out).splitlines()
  return out


def format_eval(doc: dict[str, Any]) -> str:
  rows = [("path", "batch", "answers", "new tokens", "generate s", "tok/s", "with judging s")]
  for name, r in doc["paths"].items():
    rows.append((("old: per system" if name == "old" else f"{name}: one pass"),
                 str(r["batch_size"]),
                 str(r["answers"]), str(r["new_tokens"]), f"{r['generate_s']:.1f}",
                 f"{r['tokens_per_s']:.1f}", f"{r['wall_s']:.1f}"))
  w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ["| " + " | ".join(x.ljust(k) for x, k in zip(row, w)) + " |" for row in rows]
  lines.insert(1, "|" + "|".join("-" * (k + 2) for k in w) + "|")
  head = (f"evaluation{' of ' + doc['run'] if doc.get('run') else ''}: "
          f"{len(doc['systems'])} systems ({','.join(doc['systems'])}) x "
          f"{doc['prompts']} prompts, greedy, {doc['max_new_tokens']} new tokens; one pass "
          f"decode segment {doc['decode_segment']}")
  tail = []
  f = doc.get("floor")
  if f:
    tail.append(f"floor: the answers' least FLOPs ({f['answer_flops'] / 1e12:.2f} TFLOP) at this "
                f"machine's float32 matmul rate measured now ({f['matmul_flops_per_s'] / 1e9:.1f}"
                f" GFLOP/s): {f['floor_s']:.0f}s of generation"
                + (f"; the old path's generation is {f['old_over_floor']:.2f}x that, the most "
                   f"any schedule could gain over it here" if "old_over_floor" in f else ""))
  for name, c in doc.get("compare", {}).items():
    d = c["differing_answers"]
    tail.append(f"{name} vs old: {c['speedup_wall']:.2f}x end to end (generation + judging), "
                f"{c['speedup_generate']:.2f}x generation, {c['speedup_cpu']:.2f}x CPU time; "
                f"differing answers {d['n']} of {d['of']} ({100 * d['share']:.2f}%)")
  return "\n".join([head, ""] + lines + [""] + tail)

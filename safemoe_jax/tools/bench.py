"""`python -m safemoe_jax bench`: speed and memory, as ratios measured in one run.

    python -m safemoe_jax bench --model tiny          # random tiny model, about 1 min on 2 cores
    python -m safemoe_jax bench --model smollm2       # SmolLM2-135M (embedded default); with
                                                      # --repeats 3 --gen-repeats 3: 12 min
    python -m safemoe_jax bench eval --prompts 60   # evaluation: per-system vs one pass, quick
    python -m safemoe_jax bench eval                # the default evaluation's prompts
    python -m safemoe_jax bench aot --config configs/llama31_8b_tpu.yaml \
        --topology v5e:2x4 --topology v5p:2x2x1 --topology v6e:2x4   # TPU memory, no TPU needed

Training steps (batch B x T random tokens, loss on every token, AdamW + clip as in train.py):
  base      frozen base alone: forward + backward to the inputs (the floor of any adapter method)
  lora      one LoRA of rank r on the expert targets (E = 1, gate 1: plain LoRA), trains A and B
  p1_E{n}   SafeMoE phase 1: n experts trained together, oracle routing by domain
  p2_E{n}   SafeMoE phase 2: base and n experts frozen, only the router trained (learned gates)
Generation (greedy, P prompt tokens + N new tokens, KV cache, one jitted loop): the base model
and SafeMoE with live routing (E = 8 by default), at batch 1 and 8. Plus `matmul`: a square
float matmul, this machine's own rate, timed in the same rounds.

Every configuration is compiled and warmed up first; then the timed repetitions go round-robin
over all configurations (repeat 1 of every configuration, then repeat 2, ...), so a change in
machine load hits every configuration alike; each figure is the median. Ratios come from one run.
Peak memory: each configuration again in its own process (ru_maxrss). MFU counts the frozen
base's model FLOPs (4N per token plus attention; flops.py) over the matmul rate
measured in the same run (on a GPU/TPU: over the chip's peak).

`eval` runs the evaluation's generation and judging twice in one run, on the embedded default's
data and model with random experts (or a trained `--run`): one generation per system at batch 16
(the path before the one pass) and every system in one length-sorted pass; it reports wall time
(compilation included), tokens/s and the answers that differ between the two.

`aot` compiles the real phase-1 and phase-2 train steps for TPU topologies on this CPU host
(libtpu's compile-only devices) and reports bytes per chip against the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from safemoe_jax.core.config import ExpertsConfig, ModelConfig, RouterConfig
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.infer.generate import generate
from safemoe_jax.io.base import load_base
from safemoe_jax.log import get_logger
from safemoe_jax.train.steps import forward_loss, make_train_step
from safemoe_jax.core.flops import device_peak_flops, train_flops_per_token
from safemoe_jax.tools.bench_table import compare_peer, format_table, ratios

log = get_logger(__name__)


TINY = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=512)


# --------------------------------------------------------------------------------------------
# FLOP accounting (matmul FLOPs only; 1 multiply-add = 2 FLOPs)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
  model: str = "tiny"  # tiny | smollm2 | path to a .gguf / HF folder
  batch: int = 8
  seq: int = 128
  rank: int = 16
  alpha: float = 32.0  # the peer's; speed does not depend on it
  targets: tuple[str, ...] = ("q", "k", "v")
  dropout: float = 0.0  # the peer's LoRA has none; LoRA dropout costs a random mask per target
  experts: tuple[int, ...] = (1, 2, 4, 8, 16)
  gen_experts: int = 8
  gen_batches: tuple[int, ...] = (1, 8)
  prompt_len: int = 32
  new_tokens: int = 64
  warmup: int = 2
  repeats: int = 5
  gen_repeats: int = 3
  matmul_n: int = 2048
  dtype: str = "float32"
  seed: int = 0


def model_config(s: Settings) -> tuple[ModelConfig, dict[str, np.ndarray] | None]:
  if s.model == "tiny":
    return dataclasses.replace(TINY, param_dtype=s.dtype, compute_dtype=s.dtype), None
  b = load_base(None if s.model == "smollm2" else s.model, with_tokenizer=False)
  return dataclasses.replace(b.config, param_dtype=s.dtype, compute_dtype=s.dtype), b.params


def config_names(s: Settings) -> list[str]:
  names = ["base", "lora"]
  names += [f"p1_E{e}" for e in s.experts] + [f"p2_E{e}" for e in s.experts]
  names += [f"gen_{m}_b{b}" for m in ("base", "safemoe") for b in s.gen_batches]
  return names + ["matmul"]


def parse_name(name: str) -> dict[str, Any]:
  if name in ("base", "lora", "matmul"):
    return {"kind": name, "E": 1 if name == "lora" else 0}
  m = re.fullmatch(r"p([12])_E(\d+)", name)
  if m:
    return {"kind": f"phase{m.group(1)}", "E": int(m.group(2))}
  m = re.fullmatch(r"gen_(base|safemoe)_b(\d+)", name)
  if m:
    return {"kind": "gen", "model": m.group(1), "batch": int(m.group(2))}
  raise ValueError(f"unknown bench configuration {name!r}")


def _shared_base(model: SafeMoELM, base: dict[str, jax.Array] | None) -> SafeMoELM:
  if base is not None:
    model.load_base(base)  # jnp.asarray of a same-dtype jax.Array: the buffers are shared
  return model


def build_model(cfg: ModelConfig, s: Settings, E: int, base: dict | None) -> SafeMoELM:
  ecfg = ExpertsConfig(num_experts=E, rank=s.rank, alpha=s.alpha, targets=s.targets,
                       dropout=s.dropout)
  rcfg = RouterConfig(init_std=0.02)  # non-zero gates, as after training
  model = SafeMoELM(cfg, ecfg, rcfg, rngs=nnx.Rngs(s.seed))
  if E:
    key = jax.random.key(s.seed + 1)
    for t in s.targets:  # trained-looking experts (B = 0 at init)
      key, sub = jax.random.split(key)
      var = getattr(model.experts, f"B_{t}")
      var[...] = 0.01 * jax.random.normal(sub, var[...].shape)
  return _shared_base(model, base)


def train_batch(cfg: ModelConfig, s: Settings, E: int) -> dict[str, jax.Array]:
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (s.batch, s.seq)).astype(np.int32)
  ones = np.ones_like(ids)
  b = {"input_ids": ids, "attention_mask": ones, "loss_mask": ones,
       "prompt_mask": np.zeros_like(ids)}
  if E:
    b["domains"] = np.eye(E, dtype=np.float32)[np.arange(s.batch) % E]
  return {k: jnp.asarray(v) for k, v in b.items()}


def optimizer() -> optax.GradientTransformation:
  """train.py's update: clip by global norm 1.0, then AdamW."""
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))


def _nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                 if hasattr(x, "dtype") and hasattr(x, "size")
                 and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)))


def _memory_analysis(compiled) -> dict[str, int] | None:
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend implements it
    return None
  if m is None:
    return None
  return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")
          if hasattr(m, f"{k}_size_in_bytes")}


@dataclasses.dataclass
class Bench:
  """One configuration, compiled: `run()` does one timed unit and blocks until it is done."""
  name: str
  run: Callable[[], Any]
  tokens: int  # tokens per unit (trained tokens, or generated tokens)
  info: dict[str, Any]


def make_train_bench(name: str, cfg: ModelConfig, s: Settings, base: dict | None) -> Bench:
  p = parse_name(name)
  kind, E = p["kind"], p["E"]
  model = build_model(cfg, s, E, base)
  batch = train_batch(cfg, s, E)
  tx = optimizer()
  if kind == "base":
    # Differentiate the layers' attention-norm scales: their gradients need the backward pass
    # through every layer down to the first one, like an adapter's, and cost nothing themselves.
    graphdef, norms, rest = nnx.split(model, nnx.PathContains("attn_norm"), ...)

    def step_fn(params, opt_state, frozen, batch, rng):
      def loss_fn(p):
        return forward_loss(nnx.merge(graphdef, p, frozen), batch, "base")[0]
      loss, g = jax.value_and_grad(loss_fn)(params)
      return params, opt_state, {"loss": loss, "grad": g}

    params, frozen, opt = norms, rest, ()
    info = {"trainable": "none (gradients to the inputs only)"}
  else:
    group, routing = {"lora": ("experts", "uniform"), "phase1": ("experts", "oracle"),
                      "phase2": ("router", "learned")}[kind]
    step_fn, params, frozen = make_train_step(model, group, tx, routing)
    opt = tx.init(params)
    info = {"trainable": group, "routing": routing}
  rng = jax.random.key(s.seed)
  jitted = jax.jit(step_fn, donate_argnums=(0, 1) if kind != "base" else ())
  compiled = jitted.lower(params, opt, frozen, batch, rng).compile()
  state = {"p": params, "o": opt}

  def run():
    out = compiled(state["p"], state["o"], frozen, batch, rng)
    state["p"], state["o"] = out[0], out[1]
    jax.block_until_ready(out)
    return out

  flops = train_flops_per_token(cfg, s.seq, kind, E, s.rank, s.targets)
  info.update(kind=kind, experts=E, rank=s.rank if E else 0,
              trainable_params=0 if kind == "base" else int(sum(
                  x.size for x in jax.tree.leaves(params))),
              trainable_bytes=0 if kind == "base" else _nbytes(params),
              opt_state_bytes=_nbytes(opt), frozen_bytes=_nbytes(frozen),
              flops_per_token=flops, xla_memory=_memory_analysis(compiled))
  return Bench(name, run, s.batch * s.seq, info)


def make_gen_bench(name: str, cfg: ModelConfig, s: Settings, base: dict | None) -> Bench:
  p = parse_name(name)
  E = s.gen_experts if p["model"] == "safemoe" else 0
  model = build_model(cfg, s, E, base)
  B = p["batch"]
  ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, s.prompt_len)).astype(np.int32)
  mask = np.ones_like(ids)
  kw = dict(max_new_tokens=s.new_tokens, eos_ids=[-1], pad_id=0,
            routing="learned" if E else "base")

  def run():
    out = generate(model, ids, mask, **kw)
    assert out["steps"] == s.new_tokens, out["steps"]  # no early stop: every step is timed
    return out

  run()  # compile
  return Bench(name, run, B * s.new_tokens,
               {"kind": "gen", "experts": E, "batch": B, "prompt_len": s.prompt_len,
                "new_tokens": s.new_tokens, "routing": kw["routing"]})


def make_matmul_bench(s: Settings) -> Bench:
  n = s.matmul_n
  dt = jnp.dtype(s.dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
  f = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
  return Bench("matmul", lambda: jax.block_until_ready(f(a, b)), 0,
               {"kind": "matmul", "n": n, "flops": 2 * n ** 3, "dtype": s.dtype})


def make_bench(name: str, cfg: ModelConfig, s: Settings, base: dict | None) -> Bench:
  kind = parse_name(name)["kind"]
  if kind == "matmul":
    return make_matmul_bench(s)
  if kind == "gen":
    return make_gen_bench(name, cfg, s, base)
  return make_train_bench(name, cfg, s, base)


# --------------------------------------------------------------------------------------------
# Running, memory workers, report
# --------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _load() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def _log(msg: str, quiet: bool = False) -> None:
  if not quiet:
    log.info(msg)


def machine_info() -> dict[str, Any]:
  cpu = ""
  try:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), "")
  except OSError:
    pass
  d = jax.devices()[0]
  return {"cpu": cpu, "nproc": os.cpu_count(), "platform": platform.platform(),
          "backend": jax.default_backend(), "device_kind": getattr(d, "device_kind", ""),
          "devices": jax.device_count(), "jax": jax.__version__,
          "flax": importlib.metadata.version("flax"), "python": platform.python_version()}


def run_timings(names: Sequence[str], s: Settings, quiet: bool = False,
                profile_dir: str | None = None) -> dict[str, Any]:
  """Compile and warm up every configuration, then time them round-robin."""
  cfg, params = model_config(s)
  base = None
  if params is not None:
    dt = jnp.dtype(cfg.param_dtype)
    base = {k: jnp.asarray(v, dt) for k, v in params.items()}
    del params
  benches: dict[str, Bench] = {}
  compile_s = {}
  for name in names:
    t0 = time.perf_counter()
    benches[name] = make_bench(name, cfg, s, base)
    for _ in range(s.warmup):
      benches[name].run()
    compile_s[name] = time.perf_counter() - t0
    _log(f"{name}: compiled + {s.warmup} warm-up in {compile_s[name]:.1f}s (load "
         f"{_load()[:1]})", quiet)
  times: dict[str, list[float]] = {n: [] for n in names}
  cpu: dict[str, list[float]] = {n: [] for n in names}
  reps = max(s.repeats, s.gen_repeats)
  for r in range(reps):
    for name, b in benches.items():
      if r >= (s.gen_repeats if b.info["kind"] == "gen" else s.repeats):
        continue
      t0, c0 = time.perf_counter(), time.process_time()
      b.run()
      times[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)  # all threads of this process
    _log(f"round {r + 1}/{reps} done (load {_load()[:1]})", quiet)
  if profile_dir:  # one more run of each configuration under the JAX profiler (TensorBoard)
    for name, b in benches.items():
      with jax.profiler.trace(str(Path(profile_dir) / name)):
        b.run()
  res = {}
  for name, b in benches.items():
    t = statistics.median(times[name])
    row = {**b.info, "median_s": t, "min_s": min(times[name]), "max_s": max(times[name]),
           "all_s": [round(x, 5) for x in times[name]], "cpu_median_s": statistics.median(cpu[name]),
           "cpu_all_s": [round(x, 5) for x in cpu[name]], "setup_s": round(compile_s[name], 2)}
    if b.tokens:
      row["tokens_per_s"] = b.tokens / t
    res[name] = row
  mm = res.get("matmul")
  measured = mm["flops"] / mm["median_s"] if mm else None
  peak, src = device_peak_flops()
  peak = peak or measured
  for name, row in res.items():
    if "flops_per_token" in row and peak:
      tok = s.batch * s.seq
      row["model_flops_per_s"] = row["flops_per_token"]["base"] * tok / row["median_s"]
      row["mfu"] = row["model_flops_per_s"] / peak
      row["hw_flops_per_s"] = row["flops_per_token"]["total"] * tok / row["median_s"]
  return {"model_config": dataclasses.asdict(cfg), "configs": res,
          "matmul_flops_per_s": measured, "peak_flops_per_s": peak, "peak_source": src}


def _reset_peak_rss() -> bool:
  """Linux: reset this process's peak RSS (VmHWM) so later peaks exclude what came before."""
  try:
    Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def _vm_hwm_mb() -> float | None:
  try:
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024.0
  except (OSError, StopIteration):
    return None


def run_memory_worker(name: str, s: Settings) -> dict[str, Any]:
  """In a fresh process: build, compile and run one configuration; its peak RSS.

  peak_rss_mb is the whole process (it includes reading and dequantising the checkpoint);
  peak_rss_step_mb is the peak from the loaded base weights on: model, compile, step."""
  cfg, params = model_config(s)
  base = None
  if params is not None:
    base = {k: jnp.asarray(v, jnp.dtype(cfg.param_dtype)) for k, v in params.items()}
    del params
  gc.collect()
  reset = _reset_peak_rss()
  b = make_bench(name, cfg, s, base)  # compiles (a generation bench also runs once)
  b.run()
  out = {"peak_rss_mb": _peak_rss_mb()}
  if reset:
    out["peak_rss_step_mb"] = _vm_hwm_mb()
  return out


def measure_memory(names: Sequence[str], s: Settings, quiet: bool = False) -> dict[str, Any]:
  out = {}
  for name in names:
    with tempfile.TemporaryDirectory() as d:
      f = Path(d) / "r.json"
      cmd = [sys.executable, "-m", "safemoe_jax", "bench", "--worker", name, "--result-file", str(f),
             "--settings", json.dumps(dataclasses.asdict(s))]
      t0 = time.perf_counter()
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
      if proc.returncode or not f.exists():
        out[name] = {"error": (proc.stderr or proc.stdout)[-600:]}
      else:
        out[name] = json.loads(f.read_text())
      _log(f"memory {name}: {out[name].get('peak_rss_mb', 'FAILED')} MB "
           f"({time.perf_counter() - t0:.0f}s)", quiet)
  return out


def run_bench(s: Settings, names: Sequence[str] | None = None, memory: bool = True,
              peer: str | None = None, quiet: bool = False,
              profile_dir: str | None = None, out: Path | None = None) -> dict[str, Any]:
  names = list(names or config_names(s))
  doc: dict[str, Any] = {"benchmark": "safemoe_jax.bench", "settings": dataclasses.asdict(s),
                         "machine": machine_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                         "load_before": _load()}
  t0 = time.perf_counter()
  doc["results"] = run_timings(names, s, quiet, profile_dir)
  if out is not None:  # the timings are safe even if the memory pass is interrupted
    out.write_text(json.dumps(doc, indent=1, default=str))
  if memory:
    doc["memory"] = measure_memory([n for n in names if n != "matmul"], s, quiet)
  doc["load_after"] = _load()
  doc["wall_s"] = round(time.perf_counter() - t0, 1)
  doc["ratios"] = ratios(doc["results"], targets=s.model != "tiny")
  if peer:
    doc["peer"] = compare_peer(doc, peer)
  doc["table"] = format_table(doc).splitlines()
  return doc


# --------------------------------------------------------------------------------------------
# TPU ahead-of-time compilation
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Evaluation: every routing system, one generation per system vs one pass
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

"""`python -m safemoe_jax.bench`: speed and memory, as ratios measured in one run.

    python -m safemoe_jax.bench --model tiny          # random tiny model, about 1 min on 2 cores
    python -m safemoe_jax.bench --model smollm2       # SmolLM2-135M (embedded default); with
                                                      # --repeats 3 --gen-repeats 3: 12 min
    python -m safemoe_jax.bench eval --prompts 60   # evaluation: per-system vs one pass, quick
    python -m safemoe_jax.bench eval                # the default evaluation's prompts
    python -m safemoe_jax.bench aot --config configs/llama31_8b_tpu.yaml \
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
base's model FLOPs (4N per token plus attention; DESIGN.md section 5) over the matmul rate
measured in the same run (on a GPU/TPU: over the chip's peak).

`eval` runs the evaluation's generation and judging twice in one run, on the embedded default's
data and model with random experts (or a trained `--run`): one generation per system at batch 16
(the path before the one pass) and every system in one length-sorted pass; it reports wall time
(compilation included), tokens/s and the answers that differ between the two.

`aot` compiles the real phase-1 and phase-2 train steps for TPU topologies on this CPU host
(libtpu's compile-only devices) and reports bytes per chip against the chip's HBM.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from safemoe_jax import errors
from safemoe_jax.core import experts as ex
from safemoe_jax.core.config import ExpertsConfig, ModelConfig, RouterConfig
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.train.steps import forward_loss, make_train_step

TINY = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=4,
                   num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=512)


# --------------------------------------------------------------------------------------------
# FLOP accounting (matmul FLOPs only; 1 multiply-add = 2 FLOPs)
# --------------------------------------------------------------------------------------------


def matmul_params(cfg: ModelConfig) -> int:
  """N: weights that multiply every token (projections, MLP, LM head; not the embedding lookup)."""
  D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return L * (D * q + 2 * D * kv + q * D + 3 * D * F) + D * cfg.vocab_size


def attention_flops(cfg: ModelConfig, seq: int) -> int:
  """Forward attention FLOPs per token: q k^T and a v over all `seq` keys (computed in full)."""
  return cfg.num_layers * 4 * seq * cfg.num_heads * cfg.head_dim


def lora_flops(cfg: ModelConfig, experts: int, rank: int, targets: Sequence[str]) -> int:
  """Forward FLOPs per token of the experts' A and B products over the E*r concatenated ranks."""
  dims = ex.target_dims(cfg)
  return cfg.num_layers * sum(2 * experts * rank * (dims[t][0] + dims[t][1]) for t in targets)


def train_flops_per_token(cfg: ModelConfig, seq: int, kind: str, experts: int = 0, rank: int = 0,
                          targets: Sequence[str] = ("q", "k", "v")) -> dict[str, int]:
  """Model FLOPs per trained token of one step, without rematerialisation.

  base: a frozen matmul costs 2N forward + 2N for the gradient to its input (no weight gradient)
  = 4N; attention has no weights but sends gradients to both operands: 3x its forward.
  Adapters: forward, input gradient, and (when trained) weight gradient, each = the forward.
  Router (per-layer linear, phase 2): 2*D*E forward, the same again for input and weight grads.
  kind: 'base', 'lora' / 'phase1' (adapters trained), 'phase2' (router trained).
  """
  base = 4 * matmul_params(cfg) + 3 * attention_flops(cfg, seq)
  fwd = lora_flops(cfg, experts, rank, targets) if kind != "base" else 0
  adapter = {"base": 0, "lora": 3 * fwd, "phase1": 3 * fwd, "phase2": 2 * fwd}[kind]
  router = 3 * cfg.num_layers * 2 * cfg.hidden_size * experts if kind == "phase2" else 0
  return {"base": base, "adapter": adapter, "router": router, "total": base + adapter + router}


# Peak dense bf16 FLOP/s and HBM per chip (public spec sheets).
CHIPS = {
    "v5e": {"kind": "TPU v5 lite", "peak_flops": 197e12, "hbm_bytes": 16 * 2**30},
    "v5p": {"kind": "TPU v5", "peak_flops": 459e12, "hbm_bytes": 95 * 2**30},
    "v6e": {"kind": "TPU v6 lite", "peak_flops": 918e12, "hbm_bytes": 32 * 2**30},
    "v4": {"kind": "TPU v4", "peak_flops": 275e12, "hbm_bytes": 32 * 2**30},
}
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
                 "T4": 65e12}


def device_peak_flops() -> tuple[float | None, str]:
  """(peak FLOP/s, source) of jax.devices()[0] when it is a known accelerator."""
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", "")
  for chip in CHIPS.values():
    if kind == chip["kind"]:
      return chip["peak_flops"], f"{kind} spec sheet (bf16)"
  for name, peak in GPU_PEAK_BF16.items():
    if name in kind:
      return peak, f"{kind} spec sheet (bf16 dense)"
  return None, "measured matmul"


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
  from safemoe_jax.io import assets
  from safemoe_jax.io import weights
  path = assets.smollm2_gguf() if s.model == "smollm2" else Path(s.model)
  if Path(path).suffix == ".gguf":
    cfg, params, _ = weights.load_gguf(path)
  else:
    cfg, params = weights.load_hf_checkpoint(path)
  return dataclasses.replace(cfg, param_dtype=s.dtype, compute_dtype=s.dtype), params


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
  from safemoe_jax.infer.generate import generate
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
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


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
  import gc
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
      cmd = [sys.executable, "-m", "safemoe_jax.bench", "--worker", name, "--result-file", str(f),
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


TARGETS = (  # (name, numerator, denominator, at most) on SmolLM2-135M shapes, phase 2, rank 16
    ("SafeMoE phase 2 E=8 step / single LoRA step", "p2_E8", "lora", 1.15),
    ("SafeMoE phase 2 E=16 step / E=1 step", "p2_E16", "p2_E1", 1.3),
    ("decode with live routing (E=8) / base decode, batch 1", "gen_safemoe_b1", "gen_base_b1", 1.2),
    ("decode with live routing (E=8) / base decode, batch 8", "gen_safemoe_b8", "gen_base_b8", 1.2),
)


def ratios(res: dict[str, Any], targets: bool = True) -> list[dict[str, Any]]:
  """Ratios of medians; with targets=False (the tiny model, whose adapters are as wide as its
  layers) the SmolLM2-shape targets are shown but not judged."""
  c = res["configs"]
  out = []
  def both(a, b):
    return {"ratio": c[a]["median_s"] / c[b]["median_s"],
            "ratio_cpu": c[a]["cpu_median_s"] / c[b]["cpu_median_s"]}

  for label, a, b, limit in TARGETS:
    if a in c and b in c:
      r = both(a, b)
      row = {"what": label, **r, "target_at_most": limit}
      if targets:
        row["met"] = r["ratio"] <= limit
      out.append(row)
  extra = [("phase 1 E=8 step / single LoRA step", "p1_E8", "lora"),
           ("single LoRA step / frozen base step", "lora", "base"),
           ("phase 2 E=8 step / frozen base step", "p2_E8", "base"),
           ("phase 1 E=16 step / E=1 step", "p1_E16", "p1_E1")]
  for label, a, b in extra:
    if a in c and b in c:
      out.append({"what": label, **both(a, b)})
  return out


def _mb(x: float | None) -> str:
  return "-" if x is None else f"{x / 2**20:.1f}"


def format_table(doc: dict[str, Any]) -> str:
  res, mem = doc["results"], doc.get("memory", {})
  c = res["configs"]
  rows = [("config", "median s", "min-max s", "CPU s", "tok/s", "MFU", "trainable",
           "opt state MB", "XLA temp MB", "peak RSS MB*")]
  for name, r in c.items():
    if r["kind"] == "matmul":
      continue
    xm = r.get("xla_memory") or {}
    rss = mem.get(name, {}).get("peak_rss_step_mb") or mem.get(name, {}).get("peak_rss_mb")
    rows.append((name, f"{r['median_s']:.3f}", f"{r['min_s']:.3f}-{r['max_s']:.3f}",
                 f"{r['cpu_median_s']:.3f}", f"{r.get('tokens_per_s', 0):.1f}",
                 f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
                 f"{r['trainable_params']:,}" if "trainable_params" in r else "-",
                 _mb(r.get("opt_state_bytes")) if "opt_state_bytes" in r else "-",
                 _mb(xm.get("temp")) if xm else "-",
                 f"{rss:.0f}" if rss else "-"))
  w = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
  lines = ["| " + " | ".join(str(x).ljust(k) for x, k in zip(row, w)) + " |" for row in rows]
  lines.insert(1, "|" + "|".join("-" * (k + 2) for k in w) + "|")
  s = doc["settings"]
  mm = res.get("matmul_flops_per_s")
  head = (f"model {s['model']} ({doc['results']['model_config']['num_layers']} layers, d="
          f"{doc['results']['model_config']['hidden_size']}), {s['dtype']}, train batch "
          f"{s['batch']}x{s['seq']}, experts rank {s['rank']} on {','.join(s['targets'])}; "
          f"generation {s['prompt_len']}+{s['new_tokens']} tokens greedy; median of "
          f"{s['repeats']} (gen {s['gen_repeats']}) after {s['warmup']} warm-up")
  foot = [f"matmul rate measured in this run: {mm / 1e9:.1f} GFLOP/s "
          f"({s['matmul_n']}^3, {s['dtype']}); MFU = frozen-base model FLOPs / "
          f"{res['peak_source']}" if mm else "",
          "*peak RSS of the configuration in its own process, from the loaded base weights on "
          "(model, compile, steps; not the checkpoint reading)" if mem else "",
          f"machine: {doc['machine']['cpu']} x{doc['machine']['nproc']}, load average "
          f"{doc['load_before']} before, {doc['load_after']} after"]
  rat = ["", "| ratio (same run) | wall-clock medians | CPU-time medians | target | met |",
         "|---|---|---|---|---|"]
  for r in doc["ratios"]:
    tgt = f"<= {r['target_at_most']}" if "target_at_most" in r else ""
    met = ("yes" if r["met"] else "**no**") if "met" in r else ("n/a (tiny)" if tgt else "")
    rat.append(f"| {r['what']} | {r['ratio']:.3f} | {r['ratio_cpu']:.3f} | {tgt} | {met} |")
  return "\n".join([head, ""] + lines + [""] + [f for f in foot if f] + rat)


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


def compare_peer(doc: dict[str, Any], peer_json: str) -> list[dict[str, Any]]:
  """Our medians over the peer's (../shared/peer/xlora_bench.py), same batch and shapes."""
  p = json.loads(Path(peer_json).read_text())["configs"]
  c = doc["results"]["configs"]
  pairs = [("router step E=8: X-LoRA / ours (target >= 2.5)", "xlora_train_E8", "p2_E8", 2.5, "ge"),
           ("8 experts at once / one PEFT LoRA step (target <= 1.1)", "lora_train", "p1_E8", 1.1,
            "le_inv"),
           ("single LoRA step: PEFT / ours", "lora_train", "lora", None, ""),
           ("decode b8 live routing tok/s: ours / X-LoRA (target >= 15)", "xlora_gen_E8",
            "gen_safemoe_b8", 15, "tok"),
           ("decode b8 live routing tok/s: ours / PEFT LoRA cached (target >= 0.9)", "lora_gen",
            "gen_safemoe_b8", 0.9, "tok")]
  out = []
  for label, pk, ok, tgt, how in pairs:
    if pk not in p or ok not in c or not p[pk].get("ok"):
      continue
    if how == "tok":
      r = c[ok]["tokens_per_s"] / p[pk]["tokens_per_s"]
    elif how == "le_inv":
      r = c[ok]["median_s"] / p[pk]["median_s"]
    else:
      r = p[pk]["median_s"] / c[ok]["median_s"]
    row = {"what": label, "ratio": r, "peer": pk, "ours": ok}
    if tgt is not None:
      row["met"] = r <= tgt if how == "le_inv" else r >= tgt
    out.append(row)
  return out


# --------------------------------------------------------------------------------------------
# TPU ahead-of-time compilation
# --------------------------------------------------------------------------------------------

# Llama-3.1-8B(-Instruct) and Qwen2.5-1.5B(-Instruct) from their config.json: no checkpoint needed.
LLAMA31_8B = ModelConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    rms_norm_eps=1e-5, max_position_embeddings=131072)
QWEN25_1P5B = ModelConfig(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
    num_kv_heads=2, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
    max_position_embeddings=32768, tie_embeddings=True, qkv_bias=True)
KNOWN_MODELS = {"meta-llama/Llama-3.1-8B-Instruct": LLAMA31_8B, "meta-llama/Llama-3.1-8B": LLAMA31_8B,
                "Qwen/Qwen2.5-1.5B-Instruct": QWEN25_1P5B}
# The three TPU slices of 8 TensorCores-worth the paper-scale config is sized for. A v5p-8 is 4
# chips (v5p counts 2 TensorCores per chip); v5e-8 and v6e-8 are 8 chips.
DEFAULT_TOPOLOGIES = ("v5e:2x4", "v5p:2x2x1", "v6e:2x4")


def libtpu_spec() -> str:
  """The libtpu requirement of the installed jax's `tpu` extra, e.g. 'libtpu==0.0.42.*'."""
  for req in importlib.metadata.requires("jax") or []:
    if req.startswith("libtpu") and "tpu" in req.split(";", 1)[-1]:
      return req.split(";", 1)[0].replace(" ", "")
  return "libtpu"


# sha256 of each libtpu wheel (from PyPI) that the `tpu` extra of a supported jax may bring.
# A download is checked against it before anything is extracted; a jax whose libtpu is not
# listed here is not downloaded for (set TPU_LIBRARY_PATH, or pip install '.[tpu]').
LIBTPU_SHA256 = {
    "libtpu-0.0.42-cp311-cp311-manylinux_2_31_x86_64.whl":
        "8f6608bf5ebb563be990c61783c8d541671a5c9cd6c1f2bd53145c3f0afa18cc",
    "libtpu-0.0.42-cp312-cp312-manylinux_2_31_x86_64.whl":
        "eecac4f4d364fa815d3124b42e682d924601828e82363c2a940c30c725b3f6fb",
    "libtpu-0.0.42-cp313-cp313-manylinux_2_31_x86_64.whl":
        "eb00bfb17125a22905533a60743622dad2df32a0288dab5367fca66a2ee9c38f",
    "libtpu-0.0.42-cp313-cp313t-manylinux_2_31_x86_64.whl":
        "4f4e5b332aa6c3d23f7edc6eb1a93c4a0c066f9a8b9f6d9cd77cab5b99ac9bff",
    "libtpu-0.0.42-cp314-cp314-manylinux_2_31_x86_64.whl":
        "377fb47ba539ec3fb2644c8266d928f8005d377cb02ca7db7617c04a4c682377",
    "libtpu-0.0.42-cp314-cp314t-manylinux_2_31_x86_64.whl":
        "983a8531ca317bd97ed6fc85ddc30b40347448a0bec24a6f633d55dfda0b3ed5",
    "libtpu-0.0.42.1-cp311-cp311-manylinux_2_31_x86_64.whl":
        "4d9975c446f594b0b517510b3db2fc9df65acd9a08f253c638fff5eb6bce163e",
    "libtpu-0.0.42.1-cp312-cp312-manylinux_2_31_x86_64.whl":
        "4026b215b42bca07331aac91d31659394b128b19df848aa6449b30fe16b335a6",
    "libtpu-0.0.42.1-cp313-cp313-manylinux_2_31_x86_64.whl":
        "32f216b88cf04d3b82693378e5612bd23e3b8b88afc72546561830284a2b0091",
    "libtpu-0.0.42.1-cp313-cp313t-manylinux_2_31_x86_64.whl":
        "38c984c89aab1e6e49588ad9f8fd902d67a775c7ce08948909fdaa7686d16efc",
    "libtpu-0.0.42.1-cp314-cp314-manylinux_2_31_x86_64.whl":
        "bffd6bf3944473e394cbed1d7f0875e7b338e3f8d278bfd8687c7450724b1e47",
    "libtpu-0.0.42.1-cp314-cp314t-manylinux_2_31_x86_64.whl":
        "1149f6852e08f97c76572ed8e5064131e384a5e5f72fbe2dabb9c807134a3e3f",
}


def _so_record(so: Path) -> Path:
  return so.with_name(so.name + ".sha256")


def _cached_libtpu(so: Path) -> Path | None:
  """The cached libtpu.so when its bytes are those extracted from a pinned wheel; a copy that
  differs is removed (and downloaded again)."""
  from safemoe_jax.io.assets import sha256_file
  rec = _so_record(so)
  try:
    want, wheel = rec.read_text().split()[:2]
  except (OSError, ValueError):
    want, wheel = "", ""
  if wheel in LIBTPU_SHA256 and sha256_file(so) == want:
    return so
  _log(f"WARNING: cached {so} does not match the record of the pinned wheel it came from; "
       f"removed, it will be downloaded again", False)
  so.unlink(missing_ok=True)
  rec.unlink(missing_ok=True)
  return None


def find_libtpu(download: bool = False, quiet: bool = False) -> Path | None:
  """libtpu.so for ahead-of-time compilation on a CPU host, without installing it.

  In order: $TPU_LIBRARY_PATH; an installed `libtpu` package (the `tpu` extra); the cache
  ($SAFEMOE_CACHE/libtpu/<version>/libtpu.so, checked against the sha256 recorded when it was
  extracted from a pinned wheel); with download=True, `pip download --require-hashes` of the
  wheel that the installed jax's `tpu` extra names, checked against LIBTPU_SHA256, whose
  libtpu.so is extracted into the cache. It is kept out of the environment on purpose: an
  installed libtpu makes every JAX process on the host probe for TPUs and take libtpu's lock
  file.
  """
  from safemoe_jax.io.assets import AssetError, cache_dir, sha256_file
  env = os.environ.get("TPU_LIBRARY_PATH")
  if env and Path(env).is_file():
    return Path(env)
  try:
    import importlib.util
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.origin:
      so = Path(spec.origin).parent / "libtpu.so"
      if so.is_file():
        return so
  except (ImportError, ValueError):
    pass
  req = libtpu_spec()
  tag = re.sub(r"[^0-9A-Za-z.]+", "", req.split("==", 1)[-1]).strip(".") or "latest"
  dest = cache_dir() / "libtpu" / tag / "libtpu.so"
  if dest.is_file() and _cached_libtpu(dest) is not None:
    return dest
  if not download:
    return None
  version = req.split("==", 1)[-1].rstrip("*").rstrip(".") if "==" in req else ""
  pinned = {f: h for f, h in LIBTPU_SHA256.items()
            if version and (f.startswith(f"libtpu-{version}-") or
                            (req.endswith("*") and f.startswith(f"libtpu-{version}.")))}
  if not pinned:
    raise AssetError(f"no pinned sha256 for {req} (the installed jax's TPU library); it is not "
                     f"downloaded unverified. Set TPU_LIBRARY_PATH to a libtpu.so you trust, or "
                     f"pip install '.[tpu]'")
  # --require-hashes needs one exact version: the newest pinned one the requirement allows
  exact = max({f.split("-")[1] for f in pinned}, key=lambda v: tuple(map(int, v.split("."))))
  pinned = {f: h for f, h in pinned.items() if f.split("-")[1] == exact}
  _log(f"pip download --no-deps libtpu=={exact} (for ahead-of-time TPU compilation) -> "
       f"{dest.parent}", quiet)
  with tempfile.TemporaryDirectory() as tmp:
    reqs = Path(tmp) / "requirements.txt"
    reqs.write_text(f"libtpu=={exact} "
                    + " ".join(f"--hash=sha256:{h}" for h in sorted(pinned.values())) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
           "--disable-pip-version-check", "--require-hashes", "-d", tmp, "-r", str(reqs)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
      _log(f"pip download of {req} failed: {e}", quiet)
      return None
    wheels = list(Path(tmp).glob("libtpu-*.whl"))
    if proc.returncode or not wheels:
      _log(f"pip download of {req} failed: {(proc.stderr or proc.stdout).strip()[-400:]}", quiet)
      return None
    whl = wheels[0]
    got = sha256_file(whl)
    if pinned.get(whl.name) != got:
      raise AssetError(f"checksum mismatch for {whl.name}: sha256 {got}, pinned "
                       f"{pinned.get(whl.name, '(no pin for this file)')}; the file was not "
                       f"used. Try again later, or set TPU_LIBRARY_PATH to a libtpu.so you trust")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(".part")
    with zipfile.ZipFile(whl) as z, z.open("libtpu/libtpu.so") as src, open(part, "wb") as f:
      while chunk := src.read(1 << 24):
        f.write(chunk)
    _so_record(dest).write_text(f"{sha256_file(part)} {whl.name} {got}\n")
    os.replace(part, dest)
  return dest


def tpu_topology(name: str, libtpu: Path):
  """Compile-only TPU devices of a topology such as 'v5e:2x4' (no TPU needed)."""
  from jax.experimental import topologies
  os.environ["TPU_LIBRARY_PATH"] = str(libtpu)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other JAX processes may hold the lock
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a Cloud TPU VM: no metadata server
  return topologies.get_topology_desc(platform="tpu", topology_name=name)


def chip_of(topology: str) -> dict[str, Any]:
  gen = topology.split(":", 1)[0]
  if gen not in CHIPS:
    raise ValueError(f"unknown TPU generation in topology {topology!r}; known: {sorted(CHIPS)}")
  return {"generation": gen, **CHIPS[gen]}


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def aot_compile(mcfg: ModelConfig, ecfg: ExpertsConfig, rcfg: RouterConfig, mesh_cfg, devices,
                phase: str, batch: int, seq: int, accum: int = 1) -> dict[str, Any]:
  """Lower and compile one phase's train step for `devices`; memory per chip."""
  from safemoe_jax.core import sharding as S
  mesh = S.make_mesh(mesh_cfg, devices)
  rules = mesh_cfg.rules
  abs_model = nnx.eval_shape(lambda: SafeMoELM(mcfg, ecfg, rcfg, rngs=nnx.Rngs(0)))
  group, routing = ("experts", "oracle") if phase == "phase1" else ("router", "learned")
  tx = optimizer()
  step_fn, params, frozen = make_train_step(abs_model, group, tx, routing, accum)
  opt = jax.eval_shape(tx.init, params)
  p_sh = S.state_shardings(params, mesh, rules)
  o_sh = S.state_shardings(opt, mesh, rules)
  f_sh = S.state_shardings(frozen, mesh, rules)
  lead = (accum, batch // accum) if accum > 1 else (batch,)
  bsh = S.batch_sharding(mesh, len(lead) + 1, batch_dim=len(lead) - 1, rules=rules)
  E = ecfg.num_experts
  batch_abs = {k: jax.ShapeDtypeStruct(lead + (seq,), jnp.int32, sharding=bsh)
               for k in ("input_ids", "attention_mask", "loss_mask", "prompt_mask")}
  dsh = S.batch_sharding(mesh, len(lead) + 1, batch_dim=len(lead) - 1, rules=rules)
  batch_abs["domains"] = jax.ShapeDtypeStruct(lead + (E,), jnp.float32, sharding=dsh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  from jax.sharding import NamedSharding, PartitionSpec
  rng_abs = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  args = (_abstract(params, p_sh), _abstract(opt, o_sh), _abstract(frozen, f_sh), batch_abs,
          rng_abs)
  t0 = time.perf_counter()
  with S.use_mesh_rules(mesh, rules):
    jitted = jax.jit(step_fn, out_shardings=(p_sh, o_sh, None), donate_argnums=(0, 1))
    compiled = jitted.lower(*args).compile()
  mem = _memory_analysis(compiled) or {}
  total = mem.get("argument", 0) + mem.get("temp", 0) + mem.get("output", 0) - mem.get("alias", 0)
  return {"phase": phase, "batch": batch, "seq": seq, "mesh": dict(mesh.shape),
          "compile_s": round(time.perf_counter() - t0, 1), "bytes_per_chip": mem,
          "total_bytes_per_chip": total, "state_bytes_per_chip": _shard_bytes(args[:3]),
          "state_bytes_unsharded": _nbytes(args[:3])}


def _shard_bytes(tree) -> int:
  """Bytes of one device's shards of abstract arrays (before the compiler's tile padding)."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree)))


def aot_model_config(cfg, model_config_file: str | None) -> ModelConfig:
  from safemoe_jax.io import weights
  if model_config_file:
    mcfg = weights.config_from_hf(json.loads(Path(model_config_file).read_text()))
  elif cfg.model.path in KNOWN_MODELS:
    mcfg = KNOWN_MODELS[cfg.model.path]
  elif cfg.model.path and (Path(cfg.model.path) / "config.json").is_file():
    mcfg = weights.config_from_hf(json.loads((Path(cfg.model.path) / "config.json").read_text()))
  else:
    raise SystemExit(f"error: no architecture for model.path={cfg.model.path!r}: give "
                     f"--model-config path/to/config.json (the HF config; no weights needed) or "
                     f"one of {sorted(KNOWN_MODELS)}")
  return dataclasses.replace(mcfg, param_dtype=cfg.model.param_dtype,
                             compute_dtype=cfg.model.compute_dtype, remat=cfg.model.remat)


def fit_mesh(mesh_cfg, n: int):
  """The config's mesh if it fits n chips, else FSDP over all of them (noted in the report)."""
  try:
    mesh_cfg.validate(n)
    return mesh_cfg, None
  except Exception as e:
    fitted = dataclasses.replace(mesh_cfg, data=1, fsdp=n // mesh_cfg.tensor)
    return fitted, f"config mesh does not fit {n} chips ({e}); used data=1 fsdp={fitted.fsdp}"


def run_aot(config: str | None, overrides: Sequence[str], topologies: Sequence[str],
            model_config_file: str | None = None, find_max_batch: bool = True,
            tiny: bool = False, quiet: bool = False, partial: Path | None = None
            ) -> dict[str, Any]:
  from safemoe_jax.train import loop as train
  libtpu = find_libtpu(download=True, quiet=quiet)
  if libtpu is None:
    raise SystemExit(f"error: libtpu is not available; `pip download {libtpu_spec()}` failed. "
                     f"Set TPU_LIBRARY_PATH to a libtpu.so, or pip install '.[tpu]'.")
  cfg = train.load_config(config, overrides)
  mcfg = (dataclasses.replace(TINY, param_dtype=cfg.model.param_dtype,
                              compute_dtype=cfg.model.compute_dtype, remat=cfg.model.remat)
          if tiny else aot_model_config(cfg, model_config_file))
  ecfg = cfg.experts_config()
  seq, B = cfg.data.max_length, cfg.data.batch_size
  out = {"config": config, "overrides": list(overrides), "libtpu": str(libtpu),
         "model": dataclasses.asdict(mcfg), "experts": dataclasses.asdict(ecfg),
         "router": dataclasses.asdict(cfg.router), "batch": B, "seq": seq, "topologies": {}}
  for topo in topologies:
    chip = chip_of(topo)
    td = tpu_topology(topo, libtpu)
    n = len(td.devices)
    mesh_cfg, note = fit_mesh(cfg.mesh, n)
    row: dict[str, Any] = {"chips": n, "device_kind": td.devices[0].device_kind, **chip,
                           "mesh_note": note, "phases": {}}
    for phase in ("phase1", "phase2"):
      pc = getattr(cfg, phase)
      accum = pc.grad_accum
      try:
        r = aot_compile(mcfg, ecfg, cfg.router, mesh_cfg, td.devices, phase, B, seq, accum)
      except Exception as e:  # does not fit: XLA says how much it needs
        need = _oom_bytes(e)
        if need is None:
          raise
        r = {"phase": phase, "batch": B, "seq": seq, "mesh": dict(zip(
             ("data", "fsdp", "tensor"), mesh_cfg.shape(n))), "bytes_per_chip": {},
             "total_bytes_per_chip": need, "compile_error": str(e)[:300]}
      fl = train_flops_per_token(mcfg, seq, phase, ecfg.num_experts, ecfg.rank, ecfg.targets)
      r["flops_per_token"] = fl
      r["flops_per_step"] = fl["total"] * B * seq
      r["tokens_per_s_per_chip_at_50pct_mfu"] = 0.5 * chip["peak_flops"] / fl["total"]
      r["step_s_at_50pct_mfu"] = r["flops_per_step"] / (0.5 * chip["peak_flops"] * n)
      r["fits"] = r["total_bytes_per_chip"] <= chip["hbm_bytes"]
      _log(f"{topo} {phase}: batch {B}x{seq}, {r['total_bytes_per_chip'] / 2**30:.2f} GiB/chip "
           f"of {chip['hbm_bytes'] / 2**30:.0f} (compiled in {r.get('compile_s')}s)", quiet)
      if find_max_batch:
        r["max_batch"] = max_batch(mcfg, ecfg, cfg.router, mesh_cfg, td.devices, phase, seq,
                                   accum, B, r, chip["hbm_bytes"], quiet)
      row["phases"][phase] = r
    out["topologies"][topo] = row
    if partial is not None:
      partial.write_text(json.dumps(out, indent=1, default=str))
  out["table"] = format_aot(out).splitlines()
  return out


def max_batch(mcfg, ecfg, rcfg, mesh_cfg, devices, phase, seq, accum, B0, r0, hbm,
              quiet, max_compiles: int = 5) -> dict[str, Any]:
  """Largest global batch (a multiple of the data shards) whose step fits HBM per chip.

  Memory is close to affine in the batch: predict from two compiles, then bracket the limit
  (largest batch that fits, smallest that does not) and interpolate, a few compiles at most."""
  shape = mesh_cfg.shape(len(devices))
  unit = shape[0] * shape[1] * accum
  B1 = B0 * 2
  tried = {B0: float(r0["total_bytes_per_chip"])}
  tried[B1] = _compiled_bytes(mcfg, ecfg, rcfg, mesh_cfg, devices, phase, B1, seq, accum)
  per = max((tried[B1] - tried[B0]) / (B1 - B0), 1.0)
  fixed = tried[B0] - per * B0
  b = min(int((hbm - fixed) // per), 64 * B1) // unit * unit
  for _ in range(max_compiles):
    if b < unit or b in tried:
      break
    tried[b] = _compiled_bytes(mcfg, ecfg, rcfg, mesh_cfg, devices, phase, b, seq, accum)
    _log(f"  {phase} batch {b}: {tried[b] / 2**30:.2f} GiB/chip", quiet)
    fit = [k for k, v in tried.items() if v <= hbm]
    over = [k for k, v in tried.items() if v > hbm]
    lo, hi = max(fit, default=0), min(over, default=None)
    if hi is not None and hi - lo <= unit:
      break
    if lo and hi is not None:  # interpolate inside the bracket
      b = lo + int((hbm - tried[lo]) / (tried[hi] - tried[lo]) * (hi - lo))
    elif hi is not None:  # nothing fits yet: scale down
      b = int(hi * hbm / tried[hi]) - unit
    else:  # everything fits: extrapolate from the two largest
      k1, k2 = sorted(tried)[-2:]
      slope = max((tried[k2] - tried[k1]) / (k2 - k1), 1.0)
      b = min(k2 + int((hbm - tried[k2]) / slope), 64 * B1)
    b = b // unit * unit
  best = max([k for k, v in tried.items() if v <= hbm], default=0)
  return {"batch": best, "bytes_per_example": per, "fixed_bytes": fixed,
          "compiled": {str(k): v for k, v in sorted(tried.items())}}


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50}


def _compiled_bytes(mcfg, ecfg, rcfg, mesh_cfg, devices, phase, batch, seq, accum) -> float:
  """Bytes per chip of a step, or what the compiler said it needs when it does not fit."""
  try:
    return aot_compile(mcfg, ecfg, rcfg, mesh_cfg, devices, phase, batch, seq, accum)[
        "total_bytes_per_chip"]
  except Exception as e:
    need = _oom_bytes(e)
    if need is None:
      raise
    return need


def _oom_bytes(e: Exception) -> float | None:
  """XLA refuses a program that exceeds HBM (RESOURCE_EXHAUSTED ... (30.52G) ...): its need."""
  m = re.search(r"RESOURCE_EXHAUSTED.*?\(([0-9.]+)([KMGTP]?)\)", str(e))
  return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def format_aot(doc: dict[str, Any]) -> str:
  m = doc["model"]
  e = doc["experts"]
  head = (f"model: {m['num_layers']} layers, d={m['hidden_size']}, vocab {m['vocab_size']}, "
          f"{m['param_dtype']} (remat {m['remat']}); {e['num_experts']} experts rank {e['rank']} on "
          f"{','.join(e['targets'])}; batch {doc['batch']}x{doc['seq']}")
  rows = [("topology", "chips", "mesh", "phase", "args GiB", "temp GiB", "total GiB", "HBM GiB",
           "fits", "max batch", "TFLOP/step", "tok/s/chip @50% MFU")]
  for topo, t in doc["topologies"].items():
    for ph, r in t["phases"].items():
      b = r["bytes_per_chip"]
      mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
      rows.append((topo, str(t["chips"]), mesh, ph, f"{b.get('argument', 0) / 2**30:.2f}",
                   f"{b.get('temp', 0) / 2**30:.2f}", f"{r['total_bytes_per_chip'] / 2**30:.2f}",
                   f"{t['hbm_bytes'] / 2**30:.0f}", "yes" if r["fits"] else "NO",
                   str(r.get("max_batch", {}).get("batch", "-")),
                   f"{r['flops_per_step'] / 1e12:.1f}",
                   f"{r['tokens_per_s_per_chip_at_50pct_mfu']:,.0f}"))
  w = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
  lines = ["| " + " | ".join(str(x).ljust(k) for x, k in zip(row, w)) + " |" for row in rows]
  lines.insert(1, "|" + "|".join("-" * (k + 2) for k in w) + "|")
  notes = [f"{k}: {t['mesh_note']}" for k, t in doc["topologies"].items() if t.get("mesh_note")]
  return "\n".join([head, ""] + lines + notes)


# --------------------------------------------------------------------------------------------
# Evaluation: every routing system, one generation per system vs one pass
# --------------------------------------------------------------------------------------------


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
  from safemoe_jax.data import sources as D
  from safemoe_jax.evaluation import run as EV
  from safemoe_jax.train import loop as train
  t0 = time.perf_counter()
  if run:
    cfg, mcfg, params, tok, model, _ = EV.load_run(Path(run), log=lambda m: _log(m, quiet))
    _, sft = eval_models(cfg, mcfg, params)
    if EV.single_lora_path(Path(run), "sft").exists():
      sft = EV.train_single_lora(cfg, mcfg, params, None, Path(run), "sft")  # loads it
  else:
    cfg = train.load_config(None, overrides)
    path, mcfg, params, tok = train._load_base(cfg)
    model, sft = eval_models(cfg, mcfg, params)
  data = D.build(cfg.data, tok, model_context=mcfg.max_position_embeddings)
  del params
  ecfg = EV.EvalConfig(systems=tuple(systems), judges=("refusal_strings",))
  ecfg = dataclasses.replace(ecfg, batch_size=batch_size or ecfg.batch_size,
                             max_new_tokens=max_new_tokens or ecfg.max_new_tokens,
                             decode_segment=ecfg.decode_segment if segment is None else segment)
  chat = data.cfg.system_prompt
  benches = scale_benches(EV.benchmarks_from_data(data, ecfg, tok, chat), prompts)
  n_prompts = len({p.text for b in benches for p in b.prompts})
  judges = EV.load_judges(ecfg.judges)
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
    systems_ = EV.make_systems(systems, model, Path(tmp), "bench", {"sft": sft})
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
      g = EV.generate_all(systems_, benches, tok, e, EV.JsonlCache(Path(tmp) / f"{name}.jsonl"),
                          chat_system=chat, domains=list(data.cfg.domains), progress=False,
                          log=lambda m: _log(m, quiet))
      t_gen = time.perf_counter() - t1
      EV.judge_all(judges, g, EV.JsonlCache(Path(tmp) / f"{name}_verdicts.jsonl"),
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
  for name, c in doc.get("compare", {}).items():
    d = c["differing_answers"]
    tail.append(f"{name} vs old: {c['speedup_wall']:.2f}x end to end (generation + judging), "
                f"{c['speedup_generate']:.2f}x generation, {c['speedup_cpu']:.2f}x CPU time; "
                f"differing answers {d['n']} of {d['of']} ({100 * d['share']:.2f}%)")
  return "\n".join([head, ""] + lines + [""] + tail)


def main_eval(argv: Sequence[str]) -> int:
  from safemoe_jax.evaluation import run as EV
  ap = argparse.ArgumentParser(prog="python -m safemoe_jax.bench eval", description=(
      "The evaluation's generation + judging: one generation per system (old) vs every system "
      "in one pass (new), in one run, on the embedded default's model and data with random "
      "experts and SFT LoRA (or a trained --run). Reports wall time, tokens/s and the answers "
      "that differ."))
  ap.add_argument("--systems", default=",".join(EV.DEFAULT_SYSTEMS))
  ap.add_argument("--prompts", type=int, default=0,
                  help="about this many prompts, benchmarks cut in proportion (0 = the "
                       "evaluation's default counts)")
  ap.add_argument("--batch-size", type=int, default=None, help="the one pass's batch")
  ap.add_argument("--old-batch-size", type=int, default=16)
  ap.add_argument("--segment", type=int, default=None,
                  help="the one pass's decode segment (0 = no batch halving)")
  ap.add_argument("--max-new-tokens", type=int, default=None)
  ap.add_argument("--paths", default="old,new",
                  help="comma-separated: old, new, new@BATCH (the one pass at another batch)")
  ap.add_argument("--run", default=None, help="a finished training run: its experts, router and "
                  "data (default: the embedded default's data, random experts)")
  ap.add_argument("--out", default="runs/bench/eval.json")
  ap.add_argument("overrides", nargs="*", help="dotted training-config overrides")
  a = ap.parse_args(argv)
  doc = run_eval_bench([s for s in a.systems.split(",") if s], a.prompts, a.batch_size,
                       a.old_batch_size, a.max_new_tokens, a.overrides,
                       [p for p in a.paths.split(",") if p], a.segment, a.run)
  return _write_results(doc, a.out, "eval", argv)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _ints(s: str) -> tuple[int, ...]:
  return tuple(int(x) for x in s.split(",") if x)


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["aot"]:
    return main_aot(argv[1:])
  if argv[:1] == ["eval"]:
    return main_eval(argv[1:])
  ap = argparse.ArgumentParser(prog="python -m safemoe_jax.bench", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="tiny", help="tiny | smollm2 | a .gguf file / HF folder")
  ap.add_argument("--batch", type=int, default=None, help="train batch (default 8)")
  ap.add_argument("--seq", type=int, default=None, help="train length (tiny 64, else 128)")
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--experts", type=_ints, default=(1, 2, 4, 8, 16), help="e.g. 1,2,4,8,16")
  ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (train.py: 0.05)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--repeats", type=int, default=None, help="timed steps per config (5)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--gen-repeats", type=int, default=None, help="timed generate() calls (3)")
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--only", nargs="+", default=None, help="a subset of the configurations")
  ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                  help="peak RSS of every configuration in its own process (default: on, except "
                       "for the tiny model)")
  ap.add_argument("--peer", default=None, help="the peer's results JSON (../shared/peer) to "
                  "compare against")
  ap.add_argument("--out", default=None, help="JSON output (default runs/bench/<model>.json)")
  ap.add_argument("--profile", default=None, metavar="DIR",
                  help="also trace one run of each configuration with jax.profiler into DIR")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--settings", default=None, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.worker:
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v
                    for k, v in json.loads(a.settings).items()})
    Path(a.result_file).write_text(json.dumps(run_memory_worker(a.worker, s)))
    return 0
  tiny = a.model == "tiny"
  s = Settings(model=a.model, batch=a.batch or 8, seq=a.seq or (64 if tiny else 128),
               rank=a.rank, experts=a.experts, dropout=a.dropout, dtype=a.dtype,
               repeats=a.repeats or 5, warmup=a.warmup, gen_repeats=a.gen_repeats or 3,
               new_tokens=a.new_tokens, matmul_n=1024 if tiny else 2048)
  names = config_names(s)
  if a.only:
    bad = [n for n in a.only if n not in names]
    if bad:
      ap.error(f"unknown configurations {bad}; choose from {names}")
    names = [n for n in names if n in a.only]
  memory = a.memory if a.memory is not None else not tiny
  out = Path(a.out or f"runs/bench/{Path(a.model).stem}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  doc = run_bench(s, names, memory=memory, peer=a.peer, profile_dir=a.profile, out=out)
  doc["command"] = "python -m safemoe_jax.bench " + " ".join(argv)
  out.write_text(json.dumps(doc, indent=1, default=str))
  print("\n".join(doc["table"]))
  if doc.get("peer"):
    print("\n| vs peer (same session) | value | met |\n|---|---|---|")
    for r in doc["peer"]:
      print(f"| {r['what']} | {r['ratio']:.2f} | {r.get('met', '')} |")
  print(f"\nresults -> {out}")
  return 0


def main_aot(argv: Sequence[str]) -> int:
  ap = argparse.ArgumentParser(prog="python -m safemoe_jax.bench aot", description=(
      "Compile the phase-1 and phase-2 train steps ahead of time for TPU topologies on this "
      "host (libtpu compile-only devices; no TPU needed) and report memory per chip."))
  ap.add_argument("--config", default=None, help="YAML under configs/ (e.g. llama31_8b_tpu.yaml)")
  ap.add_argument("--topology", action="append", default=None,
                  help=f"repeatable; default {' '.join(DEFAULT_TOPOLOGIES)}")
  ap.add_argument("--model-config", default=None, help="HF config.json of the base model")
  ap.add_argument("--tiny", action="store_true", help="a tiny model instead (tests)")
  ap.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search")
  ap.add_argument("--out", default="runs/bench/aot.json")
  ap.add_argument("overrides", nargs="*", help="dotted config overrides")
  a = ap.parse_args(argv)
  Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  doc = run_aot(a.config, a.overrides, a.topology or DEFAULT_TOPOLOGIES, a.model_config,
                find_max_batch=not a.no_max_batch, tiny=a.tiny, partial=Path(a.out))
  return _write_results(doc, a.out, "aot", argv)


def _write_results(doc: dict, out: str, sub: str, argv: Sequence[str]) -> int:
  """Record the command, write the JSON, print the table: the end of every bench subcommand."""
  doc["command"] = f"python -m safemoe_jax.bench {sub} " + " ".join(argv)
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  Path(out).write_text(json.dumps(doc, indent=1, default=str))
  print("\n".join(doc["table"]))
  print(f"\nresults -> {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

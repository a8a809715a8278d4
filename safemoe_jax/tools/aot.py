"""TPU ahead of time, with no TPU: the run's device work for TPU topologies on this CPU host
(libtpu's compile-only devices, from the pinned, sha256-checked libtpu wheel): the model made
sharded as the trainer makes it (io/shards.abstract_sharded: a chip holds its shards of the base
and trainable state while loading, never a whole tensor), the phase-1 and phase-2 train steps and
the validation pass compiled; bytes per chip against the chip's HBM (the peak of the three), and
the largest batch that fits. Phase 2 compiles with the configured objective, the load as a program
(tools/aot_load.py); `slices` > 1 compiles for that many slices joined by DCN (multislice)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from safemoe_jax.core import sharding as S
from safemoe_jax.core.config import ExpertsConfig, ModelConfig, ObjectiveConfig, RouterConfig
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.io.assets import AssetError, cache_dir, sha256_file
from safemoe_jax.io import shards
from safemoe_jax.io.weights import config_from_hf
from safemoe_jax.log import get_logger
from safemoe_jax.train.config import load_config
from safemoe_jax.train.steps import forward_loss, make_train_step
from safemoe_jax.core.flops import CHIPS, train_flops_per_token
from safemoe_jax.tools.aot_load import aot_load, objective_name
from safemoe_jax.tools.libtpu_pins import LIBTPU_SHA256
from safemoe_jax.tools.bench import TINY, _log, _memory_analysis, _nbytes, optimizer

log = get_logger(__name__)


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


def _so_record(so: Path) -> Path:
  return so.with_name(so.name + ".sha256")


def _cached_libtpu(so: Path) -> Path | None:
  """The cached libtpu.so when its bytes are those extracted from a pinned wheel; a copy that
  differs is removed (and downloaded again)."""
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
  env = os.environ.get("TPU_LIBRARY_PATH")
  if env and Path(env).is_file():
    return Path(env)
  try:
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


def tpu_topology(name: str, libtpu: Path, slices: int = 1):
  """Compile-only TPU devices of a topology such as 'v5e:2x4' (no TPU needed); `slices` > 1:
  that many such slices joined by DCN (multislice: each device has its slice_index)."""
  os.environ["TPU_LIBRARY_PATH"] = str(libtpu)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other JAX processes may hold the lock
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a Cloud TPU VM: no metadata server
  return topologies.get_topology_desc(platform="tpu", topology_name=name,
                                      **({"num_slices": slices} if slices > 1 else {}))


def chip_of(topology: str) -> dict[str, Any]:
  gen = topology.split(":", 1)[0]
  if gen not in CHIPS:
    raise ValueError(f"unknown TPU generation in topology {topology!r}; known: {sorted(CHIPS)}")
  return {"generation": gen, **CHIPS[gen]}


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def aot_compile(mcfg: ModelConfig, ecfg: ExpertsConfig, rcfg: RouterConfig, mesh_cfg, devices,
                phase: str, batch: int, seq: int, accum: int = 1,
                objective: ObjectiveConfig | None = None) -> dict[str, Any]:
  """Lower and compile one phase's train step for `devices`; memory per chip. `objective`:
  phase 2's configured terms, as the trainer passes them (NPO and the retain term add the
  frozen model's forward pass and its logits)."""
  mesh = S.make_mesh(mesh_cfg, devices)
  rules = mesh_cfg.rules
  abs_model = nnx.eval_shape(lambda: SafeMoELM(mcfg, ecfg, rcfg, rngs=nnx.Rngs(0)))
  group, routing = ("experts", "oracle") if phase == "phase1" else ("router", "learned")
  tx = optimizer()
  objective = objective if phase == "phase2" else None
  step_fn, params, frozen = make_train_step(abs_model, group, tx, routing, accum,
                                            objective=objective)
  opt = jax.eval_shape(tx.init, params)
  p_sh = S.state_shardings(params, mesh, rules)
  o_sh = S.state_shardings(opt, mesh, rules)
  f_sh = S.state_shardings(frozen, mesh, rules)
  batch_abs = _batch_abs(mesh, rules, (accum, batch // accum) if accum > 1 else (batch,), seq,
                         ecfg.num_experts, kinds=objective is not None and not objective.plain)
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng_abs = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  args = (_abstract(params, p_sh), _abstract(opt, o_sh), _abstract(frozen, f_sh), batch_abs,
          rng_abs)
  t0 = time.perf_counter()
  with S.use_mesh_rules(mesh, rules):
    jitted = jax.jit(step_fn, out_shardings=(p_sh, o_sh, None), donate_argnums=(0, 1))
    compiled = jitted.lower(*args).compile()
  mem = _memory_analysis(compiled) or {}
  total = mem.get("argument", 0) + mem.get("temp", 0) + mem.get("output", 0) - mem.get("alias", 0)
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # per device, after partitioning
  return {"phase": phase, "compiled_flops_per_chip": cost.get("flops"), "batch": batch, "seq": seq, "mesh": dict(mesh.shape),
          "objective": objective_name(objective),
          "compile_s": round(time.perf_counter() - t0, 1), "bytes_per_chip": mem,
          "total_bytes_per_chip": total, "state_bytes_per_chip": _shard_bytes(args[:3]),
          "state_bytes_unsharded": _nbytes(args[:3])}


def _batch_abs(mesh, rules, lead: tuple[int, ...], seq: int, E: int, kinds: bool = False
               ) -> dict[str, Any]:
  """The trainer's batch, abstract; `kinds`: phase 2's row kind (target, harmful, retain)."""
  bsh = S.batch_sharding(mesh, len(lead) + 1, batch_dim=len(lead) - 1, rules=rules)
  out = {k: jax.ShapeDtypeStruct(lead + (seq,), jnp.int32, sharding=bsh)
         for k in ("input_ids", "attention_mask", "loss_mask", "prompt_mask")}
  out["domains"] = jax.ShapeDtypeStruct(lead + (E,), jnp.float32, sharding=bsh)
  if kinds:
    out["kind"] = jax.ShapeDtypeStruct(lead, jnp.int32, sharding=S.batch_sharding(
        mesh, len(lead), batch_dim=len(lead) - 1, rules=rules))
  return out



def aot_load_and_eval(mcfg: ModelConfig, ecfg: ExpertsConfig, rcfg: RouterConfig, mesh_cfg,
                      devices, routing: str, batch: int, seq: int) -> dict[str, Any]:
  """The trainer's other device work, compiled: loading (shards.sharded_model fills the placement
  that shards.abstract_sharded gives, one shard at a time: a chip's peak is its shards of the
  model, laid out by the compiler: tools/aot_load.py) and the validation forward pass
  (train/loop.make_val_fn)."""
  mesh = S.make_mesh(mesh_cfg, devices)
  rules = mesh_cfg.rules
  graphdef, state, flat_sh = shards.abstract_sharded(mcfg, ecfg, rcfg, mesh, rules)
  leaves = []
  for p, v in nnx.to_flat_state(state):  # the state's own Variables: now with their placement
    leaves.append(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                       sharding=flat_sh[p]))
    v.set_value(leaves[-1])
  load = aot_load(mcfg, ecfg, rcfg, mesh, rules)

  def val(st, b):  # as make_val_fn
    _, m = forward_loss(nnx.merge(graphdef, st), b, routing)
    return m["per_example_nll"], m["per_example_tokens"]

  t0 = time.perf_counter()
  with S.use_mesh_rules(mesh, rules):
    compiled = jax.jit(val).lower(state, _batch_abs(mesh, rules, (batch,), seq,
                                                        ecfg.num_experts)).compile()
  mem = _memory_analysis(compiled) or {}
  total = mem.get("argument", 0) + mem.get("temp", 0) + mem.get("output", 0) - mem.get("alias", 0)
  return {**load, "model_bytes_unsharded": _nbytes(leaves),
          "val_bytes_per_chip": mem, "val_total_bytes_per_chip": total,
          "val_compile_s": round(time.perf_counter() - t0, 1)}


def _shard_bytes(tree) -> int:
  """Bytes of one device's shards of abstract arrays (before the compiler's tile padding)."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(tree)))


def aot_model_config(cfg, model_config_file: str | None) -> ModelConfig:
  if model_config_file:
    mcfg = config_from_hf(json.loads(Path(model_config_file).read_text()))
  elif cfg.model.path in KNOWN_MODELS:
    mcfg = KNOWN_MODELS[cfg.model.path]
  elif cfg.model.path and (Path(cfg.model.path) / "config.json").is_file():
    mcfg = config_from_hf(json.loads((Path(cfg.model.path) / "config.json").read_text()))
  else:
    raise SystemExit(f"error: no architecture for model.path={cfg.model.path!r}: give "
                     f"--model-config path/to/config.json (the HF config; no weights needed) or "
                     f"one of {sorted(KNOWN_MODELS)}")
  return dataclasses.replace(mcfg, param_dtype=cfg.model.param_dtype,
                             compute_dtype=cfg.model.compute_dtype, remat=cfg.model.remat)


def fit_mesh(mesh_cfg, n: int, slices: int = 1):
  """The config's mesh if it fits n chips, else FSDP over all of them (noted in the report);
  over several slices only the data axis may cross them: data = the slices, FSDP within one."""
  try:
    mesh_cfg.validate(n)
    if mesh_cfg.shape(n)[0] % slices == 0:
      return mesh_cfg, None
    raise ValueError(f"mesh.data is not a multiple of the {slices} slices")
  except Exception as e:
    fitted = dataclasses.replace(mesh_cfg, data=slices, fsdp=n // slices // mesh_cfg.tensor)
    return fitted, (f"config mesh does not fit {n} chips ({e}); used data={slices} "
                    f"fsdp={fitted.fsdp}")


def run_aot(config: str | None, overrides: Sequence[str], topologies: Sequence[str],
            model_config_file: str | None = None, find_max_batch: bool = True,
            tiny: bool = False, quiet: bool = False, partial: Path | None = None,
            slices: int = 1) -> dict[str, Any]:
  libtpu = find_libtpu(download=True, quiet=quiet)
  if libtpu is None:
    raise SystemExit(f"error: libtpu is not available; `pip download {libtpu_spec()}` failed. "
                     f"Set TPU_LIBRARY_PATH to a libtpu.so, or pip install '.[tpu]'.")
  cfg = load_config(config, overrides)
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
    td = tpu_topology(topo, libtpu, slices)
    topo = topo if slices == 1 else f"{slices}x{topo}"  # e.g. 2xv5e:2x4: two v5e-8 slices
    n = len(td.devices)
    mesh_cfg, note = fit_mesh(cfg.mesh, n, S.num_slices(td.devices))
    row: dict[str, Any] = {"chips": n, "slices": S.num_slices(td.devices),
                           "device_kind": td.devices[0].device_kind, **chip,
                           "mesh_note": note, "phases": {}}
    for phase in ("phase1", "phase2"):
      pc = getattr(cfg, phase)
      accum = pc.grad_accum
      try:
        r = aot_compile(mcfg, ecfg, cfg.router, mesh_cfg, td.devices, phase, B, seq, accum,
                        objective=cfg.objective)
      except Exception as e:  # does not fit: XLA says how much it needs
        need = _oom_bytes(e)
        if need is None:
          raise
        r = {"phase": phase, "batch": B, "seq": seq, "mesh": dict(zip(
             ("data", "fsdp", "tensor"), mesh_cfg.shape(n))), "bytes_per_chip": {},
             "total_bytes_per_chip": need, "compile_error": str(e)[:300]}
      routing = "oracle" if phase == "phase1" else "learned"
      r.update(aot_load_and_eval(mcfg, ecfg, cfg.router, mesh_cfg, td.devices, routing, B, seq))
      r["peak_bytes_per_chip"] = max(r["total_bytes_per_chip"], r["load_bytes_per_chip"],
                                     r["val_total_bytes_per_chip"])
      fl = train_flops_per_token(mcfg, seq, phase, ecfg.num_experts, ecfg.rank, ecfg.targets)
      r["flops_per_token"] = fl
      r["flops_per_step"] = fl["total"] * B * seq
      r["tokens_per_s_per_chip_at_50pct_mfu"] = 0.5 * chip["peak_flops"] / fl["total"]
      r["step_s_at_50pct_mfu"] = r["flops_per_step"] / (0.5 * chip["peak_flops"] * n)
      r["fits"] = r["peak_bytes_per_chip"] <= chip["hbm_bytes"]
      _log(f"{topo} {phase}: batch {B}x{seq}, {r['total_bytes_per_chip'] / 2**30:.2f} GiB/chip "
           f"of {chip['hbm_bytes'] / 2**30:.0f} (compiled in {r.get('compile_s')}s)", quiet)
      if find_max_batch:
        r["max_batch"] = max_batch(mcfg, ecfg, cfg.router, mesh_cfg, td.devices, phase, seq,
                                   accum, B, r, chip["hbm_bytes"], quiet, objective=cfg.objective)
      row["phases"][phase] = r
    out["topologies"][topo] = row
    if partial is not None:
      partial.write_text(json.dumps(out, indent=1, default=str))
  out["table"] = format_aot(out).splitlines()
  return out


def max_batch(mcfg, ecfg, rcfg, mesh_cfg, devices, phase, seq, accum, B0, r0, hbm,
              quiet, max_compiles: int = 5, objective=None) -> dict[str, Any]:
  """Largest global batch (a multiple of the data shards) whose step fits HBM per chip.

  Memory is close to affine in the batch: predict from two compiles, then bracket the limit
  (largest batch that fits, smallest that does not) and interpolate, a few compiles at most."""
  shape = mesh_cfg.shape(len(devices))
  unit = shape[0] * shape[1] * accum
  B1 = B0 * 2
  tried = {B0: float(r0["total_bytes_per_chip"])}
  tried[B1] = _compiled_bytes(mcfg, ecfg, rcfg, mesh_cfg, devices, phase, B1, seq, accum, objective)
  per = max((tried[B1] - tried[B0]) / (B1 - B0), 1.0)
  fixed = tried[B0] - per * B0
  b = min(int((hbm - fixed) // per), 64 * B1) // unit * unit
  for _ in range(max_compiles):
    if b < unit or b in tried:
      break
    tried[b] = _compiled_bytes(mcfg, ecfg, rcfg, mesh_cfg, devices, phase, b, seq, accum, objective)
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


def _compiled_bytes(mcfg, ecfg, rcfg, mesh_cfg, devices, phase, batch, seq, accum,
                    objective=None) -> float:
  """Bytes per chip of a step, or what the compiler said it needs when it does not fit."""
  try:
    return aot_compile(mcfg, ecfg, rcfg, mesh_cfg, devices, phase, batch, seq, accum,
                       objective=objective)[
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
  rows = [("topology", "chips", "mesh", "phase", "load GiB", "args GiB", "temp GiB", "step GiB",
           "val GiB", "peak GiB", "HBM GiB", "fits", "max batch", "TFLOP/step",
           "tok/s/chip @50% MFU")]
  for topo, t in doc["topologies"].items():
    for ph, r in t["phases"].items():
      b = r["bytes_per_chip"]
      mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
      rows.append((topo, str(t["chips"]), mesh, ph, f"{r['load_bytes_per_chip'] / 2**30:.2f}",
                   f"{b.get('argument', 0) / 2**30:.2f}",
                   f"{b.get('temp', 0) / 2**30:.2f}", f"{r['total_bytes_per_chip'] / 2**30:.2f}",
                   f"{r['val_total_bytes_per_chip'] / 2**30:.2f}",
                   f"{r['peak_bytes_per_chip'] / 2**30:.2f}", f"{t['hbm_bytes'] / 2**30:.0f}", "yes" if r["fits"] else "NO",
                   str(r.get("max_batch", {}).get("batch", "-")),
                   f"{r['flops_per_step'] / 1e12:.1f}",
                   f"{r['tokens_per_s_per_chip_at_50pct_mfu']:,.0f}"))
  w = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
  lines = ["| " + " | ".join(str(x).ljust(k) for x, k in zip(row, w)) + " |" for row in rows]
  lines.insert(1, "|" + "|".join("-" * (k + 2) for k in w) + "|")
  notes = [f"{k}: {t['mesh_note']}" for k, t in doc["topologies"].items() if t.get("mesh_note")]
  return "\n".join([head, ""] + lines + notes)

"""The accelerator check's device-heavy part, in a process of its own (host peak RSS is per
process; a TPU is held by one process): a Llama-3.2-1B-shaped checkpoint loaded sharded, the AOT
tool's memory prediction for its phase-1 step against the device's real peak, step time and MFU
(tools/accel_check.py runs it and turns its figures into rows)."""

from __future__ import annotations

import dataclasses
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from safemoe_jax.core import sharding as S
from safemoe_jax.core.config import ExpertsConfig, RouterConfig
from safemoe_jax.core.flops import device_peak_flops, train_flops_per_token
from safemoe_jax.tools import aot, bench
from safemoe_jax.tools.bench_load import (LLAMA32_1B, rss_mb, timed_sharded_load,
                                          write_random_checkpoint)
from safemoe_jax.train.steps import make_train_step

# Llama-3.2-1B's shapes; its rope_scaling is exercised by llama3_rope_train (it changes no shape).
BIG = {k: v for k, v in LLAMA32_1B.items() if k != "rope_scaling"}
SMOKE_BIG = {**BIG, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "max_position_embeddings": 256}
AOT_TOLERANCE = 1.25  # the real peak may exceed the compiled prediction by at most this factor


@dataclasses.dataclass(frozen=True)
class Settings:
  out: Path
  smoke: bool = False
  dtype: str = "bfloat16"  # of the 1B-shaped model (float32 in smoke: CPU bf16 is emulated)
  batch: int = 8
  seq: int = 512
  steps: int = 5  # timed steps after one warm-up step
  train_steps: int = 40  # the SIGTERM run's phase-1 steps (room to signal before the end)
  sigterm_at: int = 3  # the trainer's step after which SIGTERM is sent


def smoke_settings(out: Path) -> Settings:
  return Settings(out=out, smoke=True, dtype="float32", batch=4, seq=32, steps=2, train_steps=12)


@dataclasses.dataclass
class Row:
  check: str
  status: str  # pass | FAIL | n/a
  figures: dict[str, Any]
  note: str = ""


# --------------------------------------------------------------------------------------------
# 1B-shaped sharded load, AOT memory against the real peak, step time and MFU (a fresh process)
# --------------------------------------------------------------------------------------------


def _device_stats() -> dict[str, int] | None:
  """Largest bytes_in_use and peak_bytes_in_use over this process's devices, or None (CPU)."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if not stats or any(not st or "peak_bytes_in_use" not in st for st in stats):
    return None
  return {k: max(int(st[k]) for st in stats) for k in ("bytes_in_use", "peak_bytes_in_use")}


def matmul_rate(dtype: str, n: int) -> float:
  """FLOP/s of a square matmul on this device, the median of 5 (the MFU reference on CPU)."""
  b = bench.make_matmul_bench(bench.Settings(matmul_n=n, dtype=dtype))
  b.run()
  times = []
  for _ in range(5):
    t0 = time.perf_counter()
    b.run()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times)


def load_and_step(folder: str, dtype: str, batch: int, seq: int, steps: int) -> dict[str, Any]:
  """In a process of its own (host peak RSS is per process): load sharded, then the phase-1
  step: the AOT prediction, the real peak, step time and MFU."""
  jnp.zeros(1).block_until_ready()  # the runtime's own memory belongs to the baseline
  rss0 = rss_mb()
  n = jax.device_count()
  mesh_cfg = S.MeshConfig(data=1, fsdp=n)
  rules = mesh_cfg.rules
  mesh = S.make_mesh(mesh_cfg)
  ecfg = ExpertsConfig(num_experts=2, rank=16, alpha=32.0, targets=("q", "k", "v"), dropout=0.0)
  rcfg = RouterConfig()
  model, leaves, load_s, per_device = timed_sharded_load(folder, dtype, mesh, rules, ecfg, rcfg,
                                                        compute_dtype=dtype)
  doc: dict[str, Any] = {
      "devices": n, "device_kind": jax.devices()[0].device_kind, "load_s": load_s,
      "rss_before_mb": rss0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      / 1024.0, "model_bytes": int(sum(x.nbytes for x in leaves)),
      "per_device_bytes_max": max(per_device.values()), "slice_bytes": aot._shard_bytes(leaves),
      "device_stats_after_load":
      _device_stats()}
  mcfg = model.cfg

  # The AOT tool's prediction for this step on these devices (its own abstract model and step).
  pred = aot.aot_compile(mcfg, ecfg, rcfg, mesh_cfg, jax.devices(), "phase1", batch, seq)
  doc["aot_total_bytes_per_device"] = pred["total_bytes_per_chip"]
  doc["aot_bytes_per_device"] = pred["bytes_per_chip"]

  tx = bench.optimizer()
  step_fn, params, frozen = make_train_step(model, "experts", tx, "oracle")
  p_sh = S.state_shardings(params, mesh, rules)
  o_sh = S.state_shardings(tx.init(params), mesh, rules)
  params = jax.device_put(params, p_sh, may_alias=False)
  opt = jax.device_put(tx.init(params), o_sh)
  frozen = jax.device_put(frozen, S.state_shardings(frozen, mesh, rules))
  ids = np.random.default_rng(0).integers(0, mcfg.vocab_size, (batch, seq)).astype(np.int32)
  b = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
       "prompt_mask": np.zeros_like(ids),
       "domains": np.eye(2, dtype=np.float32)[np.arange(batch) % 2]}
  b = S.shard_batch(b, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  key = jax.random.key(0)
  with S.use_mesh_rules(mesh, rules):
    fn = jax.jit(step_fn, out_shardings=(p_sh, o_sh, replicated), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = fn.lower(params, opt, frozen, b, key).compile()
    doc["compile_s"] = time.perf_counter() - t0
    times = []
    for i in range(steps + 1):
      t0 = time.perf_counter()
      params, opt, m = compiled(params, opt, frozen, b, jax.random.fold_in(key, i))
      jax.block_until_ready((params, opt, m))
      times.append(time.perf_counter() - t0)
  doc["loss"] = float(m["loss"])
  doc["step_s"] = statistics.median(times[1:])
  doc["device_stats_after_steps"] = _device_stats()
  fl = train_flops_per_token(mcfg, seq, "phase1", ecfg.num_experts, ecfg.rank, ecfg.targets)
  doc["flops_per_step"] = fl["total"] * batch * seq
  doc["tokens_per_s"] = batch * seq / doc["step_s"]
  peak, source = device_peak_flops()
  if peak is None:
    peak = matmul_rate(dtype, 256 if mcfg.hidden_size < 512 else 2048)
  doc["peak_flops_per_device"], doc["peak_source"] = peak, source
  doc["mfu"] = doc["flops_per_step"] / doc["step_s"] / (peak * n)
  return doc


def run_load_child(s: Settings) -> dict[str, Any]:
  folder = s.out / ("ckpt_smoke" if s.smoke else "ckpt_llama32_1b_shapes")  # kept: rewritten
  # only when absent
  t0 = time.perf_counter()
  if not (folder / "model.safetensors.index.json").exists():
    write_random_checkpoint(folder, SMOKE_BIG if s.smoke else BIG, s.dtype)
  write_s = time.perf_counter() - t0
  code = ("import json; from safemoe_jax.tools.accel_load import load_and_step; "
          f"print('RESULT', json.dumps(load_and_step({str(folder)!r}, {s.dtype!r}, {s.batch}, "
          f"{s.seq}, {s.steps})))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
  if r.returncode or not line:
    raise RuntimeError(f"the load process failed (exit {r.returncode}): {r.stderr[-1500:]}")
  doc = json.loads(line[0][7:])
  doc["write_s"] = write_s
  doc["checkpoint_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
  return doc


def rows_from_child(doc: dict[str, Any] | None, err: str) -> list[Row]:
  names = ("sharded_load", "aot_vs_real", "step_mfu")
  if doc is None:
    return [Row(n, "FAIL", {}, err) for n in names]
  gib = lambda b: round(b / 2**30, 3)
  ckpt_b = doc["checkpoint_bytes"]
  share = doc["per_device_bytes_max"] / max(doc["model_bytes"], 1)
  load = Row("sharded_load", "pass", {
      "checkpoint_gib": gib(ckpt_b), "devices": doc["devices"], "load_s": round(doc["load_s"], 2),
      "host_peak_added_gib": gib((doc["peak_rss_mb"] - doc["rss_before_mb"]) * 2**20),
      "per_device_gib": gib(doc["per_device_bytes_max"]),
      "per_device_share": round(share, 4),
      "device_in_use_gib": (gib(doc["device_stats_after_load"]["bytes_in_use"])
                            if doc["device_stats_after_load"] else "n/a")})
  if doc["per_device_bytes_max"] > doc["slice_bytes"]:  # more than its slice on a device
    load.status, load.note = "FAIL", (f"a device holds {doc['per_device_bytes_max']} bytes, its "
                                      f"slice of the model is {doc['slice_bytes']}")
  pred, real = doc["aot_total_bytes_per_device"], doc["device_stats_after_steps"]
  if real is None:
    aot_row = Row("aot_vs_real", "n/a", {"aot_gib": gib(pred), "real_peak_gib": "n/a"},
                  "this backend reports no device memory statistics")
  else:
    ratio = real["peak_bytes_in_use"] / max(pred, 1)
    aot_row = Row("aot_vs_real", "pass" if ratio <= AOT_TOLERANCE else "FAIL",
                  {"aot_gib": gib(pred), "real_peak_gib": gib(real["peak_bytes_in_use"]),
                   "real_over_aot": round(ratio, 3)},
                  "" if ratio <= AOT_TOLERANCE else
                  f"the real peak exceeds the AOT prediction by more than {AOT_TOLERANCE}x")
  finite = math.isfinite(doc["loss"])
  step = Row("step_mfu", "pass" if finite else "FAIL", {
      "step_s": round(doc["step_s"], 4), "tokens_per_s": round(doc["tokens_per_s"], 1),
      "mfu": round(doc["mfu"], 4), "peak": doc["peak_source"],
      "compile_s": round(doc["compile_s"], 1)}, "" if finite else f"loss {doc['loss']}")
  return [load, aot_row, step]

"""`launch/accelerator_check.sh`: is this accelerator ready for the paper-scale run? One command,
no network, a few minutes on one H100 or TPU VM; `--smoke` runs the same checks with tiny shapes
on CPU (the slow test tier).

    python -m safemoe_jax.tools.accel_check --out runs/accel_check [--smoke]

Checks (each a row of the table and of <out>/accel_check.json; a failed check does not stop
the others):
  eager_vs_sharded  a tiny checkpoint loaded whole on one device and sharded over every device
                    (fsdp) from the checkpoint: the same logits, experts included
  sharded_load      a Llama-3.2-1B-shaped random checkpoint loaded sharded in a fresh process:
                    seconds, host peak RSS added, bytes per device (2 rank-16 experts on q,k,v)
  aot_vs_real       in that process, the AOT tool's compiled memory for the phase-1 step
                    (tools/aot.aot_compile on these devices) against the device's real peak
                    after running it (n/a where the backend reports no memory statistics: CPU)
  step_mfu          its step time, tokens/s and MFU (model FLOPs, core/flops.py) against the
                    device's peak (CPU: a matmul measured here)
  sigterm_resume    a tiny run of the trainer as a user starts it, SIGTERM at a step: exit 143 and
                    a checkpoint at that step; the same command again resumes there and ends with
                    experts bit-identical to an uninterrupted run
  llama3_rope_train a tiny Llama with Llama-3's rope_scaling through both training phases
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from safemoe_jax import errors
from safemoe_jax.core import sharding as S
from safemoe_jax.core.config import ConfigError, ExpertsConfig, RouterConfig
from safemoe_jax.core.experts import ExpertParam
from safemoe_jax.io import base as B
from safemoe_jax.log import get_logger
from safemoe_jax.tools import accel_fixture as F
from safemoe_jax.tools import aot, bench
from safemoe_jax.tools.bench_load import LLAMA32_1B, write_random_checkpoint
from safemoe_jax.core.flops import device_peak_flops, train_flops_per_token
from safemoe_jax.train import checkpoint as ckpt
from safemoe_jax.train import loop as train_loop
from safemoe_jax.train.config import load_config
from safemoe_jax.train.steps import forward, make_train_step

log = get_logger(__name__)

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


def _row(check: str, fn: Callable[[], tuple[str, dict, str]]) -> Row:
  t0 = time.perf_counter()
  try:
    status, figures, note = fn()
  except Exception as e:  # noqa: BLE001 - a failed check is a row, the others still run
    log.warning(f"{check} failed:\n{traceback.format_exc()}")
    status, figures, note = "FAIL", {}, f"{type(e).__name__}: {errors.message(e)[:400]}"
  figures["check_s"] = round(time.perf_counter() - t0, 1)
  return Row(check, status, figures, note)


# --------------------------------------------------------------------------------------------
# eager == sharded
# --------------------------------------------------------------------------------------------


def _tiny_batch(vocab: int, E: int, b: int = 4, t: int = 16) -> dict[str, np.ndarray]:
  ids = np.random.default_rng(1).integers(3, vocab, (b, t)).astype(np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
          "prompt_mask": np.zeros_like(ids),
          "domains": np.eye(E, dtype=np.float32)[np.arange(b) % E]}


def check_eager_vs_sharded(s: Settings) -> tuple[str, dict, str]:
  folder = F.write_tiny_model(s.out / "work" / "tiny_model")
  n = jax.device_count()
  ecfg = ExpertsConfig(num_experts=2, rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate",
                                                                   "up", "down"), dropout=0.0)
  rcfg = RouterConfig(init_std=0.02)
  eager = B.load_base(folder).model(ecfg, rcfg, seed=0)
  mesh = S.make_mesh(S.MeshConfig(data=1, fsdp=n))
  sharded = B.load_base(folder, lazy=True).sharded_model(ecfg, rcfg, 0, mesh, S.DEFAULT_RULES)
  rng = np.random.default_rng(2)  # trained-looking experts (B = 0 at initialisation)
  trained = {k: (0.05 * rng.standard_normal(v.shape)).astype(v.dtype)
             for k, v in ckpt.flat_arrays(nnx.state(eager, ExpertParam)).items()}
  for m in (eager, sharded):
    st = nnx.state(m, ExpertParam)
    ckpt.assign(st, trained, "random experts")
    nnx.update(m, st)
  batch = _tiny_batch(eager.cfg.vocab_size, 2, b=n * max(1, 4 // n))  # divisible over the mesh
  out = {}
  with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: float32 on both sides
    for name, m, mesh_ in (("eager", eager, None), ("sharded", sharded, mesh)):
      for routing in ("oracle", "learned"):
        if mesh_ is None:
          logits, _ = forward(m, {k: jnp.asarray(v) for k, v in batch.items()}, routing)
        else:
          with S.use_mesh_rules(mesh_, S.DEFAULT_RULES):
            logits, _ = forward(m, S.shard_batch(batch, mesh_), routing)
        out[(name, routing)] = np.asarray(ckpt.host(logits))
  sharded_leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(sharded))]
  devices = {d for x in sharded_leaves for d in x.sharding.device_set}
  figs = {"devices": n, "mesh": dict(mesh.shape), "devices_holding_shards": len(devices)}
  bad = []
  for routing in ("oracle", "learned"):
    a, b = out[("sharded", routing)], out[("eager", routing)]
    diff = float(np.abs(a - b).max())
    figs[f"max_abs_diff_{routing}"] = diff
    scale = float(np.abs(b).max())
    if not np.allclose(a, b, rtol=1e-5, atol=1e-5 * scale):  # float reassociation only
      bad.append(f"{routing}: max |diff| {diff:.3g} at logit scale {scale:.3g}")
  if len(devices) != n:
    bad.append(f"the sharded model spans {len(devices)} of {n} devices")
  return ("FAIL" if bad else "pass"), figs, "; ".join(bad)


# --------------------------------------------------------------------------------------------
# 1B-shaped sharded load, AOT memory against the real peak, step time and MFU (a fresh process)
# --------------------------------------------------------------------------------------------


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


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
  rss0 = _rss_mb()
  n = jax.device_count()
  mesh_cfg = S.MeshConfig(data=1, fsdp=n)
  rules = mesh_cfg.rules
  mesh = S.make_mesh(mesh_cfg)
  ecfg = ExpertsConfig(num_experts=2, rank=16, alpha=32.0, targets=("q", "k", "v"), dropout=0.0)
  rcfg = RouterConfig()
  t0 = time.perf_counter()
  base = B.load_base(folder, param_dtype=dtype, compute_dtype=dtype, with_tokenizer=False,
                     lazy=True)
  model = base.sharded_model(ecfg, rcfg, 0, mesh, rules)
  leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model))]
  jax.block_until_ready(leaves)
  load_s = time.perf_counter() - t0
  per_device: dict[str, int] = {}
  for x in leaves:
    for sh in x.addressable_shards:
      per_device[str(sh.device)] = per_device.get(str(sh.device), 0) + sh.data.nbytes
  doc: dict[str, Any] = {
      "devices": n, "device_kind": jax.devices()[0].device_kind, "load_s": load_s,
      "rss_before_mb": rss0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
      / 1024.0, "model_bytes": int(sum(x.nbytes for x in leaves)),
      "per_device_bytes_max": max(per_device.values()), "slice_bytes": aot._shard_bytes(leaves),
      "device_stats_after_load":
      _device_stats()}
  mcfg = base.config

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
  code = ("import json; from safemoe_jax.tools.accel_check import load_and_step; "
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


# --------------------------------------------------------------------------------------------
# The trainer: SIGTERM -> checkpoint -> bit-identical resume; a Llama-3-rope model
# --------------------------------------------------------------------------------------------


def _order_steps(out: Path, phase: str) -> list[int]:
  f = out / "data_order.jsonl"
  lines = f.read_text().splitlines() if f.exists() else []
  return [json.loads(l)["step"] for l in lines if l.endswith("}") and f'"{phase}"' in l]


def check_sigterm_resume(s: Settings) -> tuple[str, dict, str]:
  work = s.out / "work"
  model = F.write_tiny_model(work / "tiny_model_sigterm", seed=1)
  data = F.write_data(work / "data.jsonl")
  ov = lambda out: F.train_overrides(model, data, out, **{"phase1.steps": 40,
                                                            "phase2.steps": 0})
  ref, run = work / "sigterm_reference", work / "sigterm_run"
  train_loop.run(load_config(None, ov(ref)))  # uninterrupted, in this process
  log_path = work / "sigterm_run.log"
  cmd = [sys.executable, "-m", "safemoe_jax.train", *ov(run)]
  with open(log_path, "w") as f:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f)
  seen = None
  while p.poll() is None:
    if max(_order_steps(run, "phase1"), default=0) >= s.sigterm_at:
      p.send_signal(signal.SIGSTOP)  # read the step while it is stopped: no race
      seen = max(_order_steps(run, "phase1"))
      p.send_signal(signal.SIGTERM)
      p.send_signal(signal.SIGCONT)
      break
    time.sleep(0.01)
  rc = p.wait(timeout=600)
  text = log_path.read_text()
  m = re.search(r"phase1 stopped at step (\d+); checkpoint saved", text)
  figs = {"signalled_after_step": seen, "exit_status": rc,
          "stopped_at": int(m.group(1)) if m else None}
  if seen is None or rc != 143 or m is None or "Traceback" in text:
    return "FAIL", figs, f"expected exit 143 and a checkpoint; log tail: {text[-600:]}"
  stopped = int(m.group(1))
  on_disk = sorted(int(d.name) for d in (run / "checkpoints" / "phase1").iterdir()
                   if d.name.isdigit())
  figs["checkpoints"] = on_disk
  # The same command again (in this process: a second process start is the slow part on CPU).
  before = len(_order_steps(run, "phase1"))
  train_loop.run(load_config(None, ov(run)))
  after = _order_steps(run, "phase1")[before:]  # the steps the resumed run trained
  figs["resumed_from"] = after[0] - 1 if after else None
  a, b = load_file(str(run / "experts.safetensors")), load_file(str(ref / "experts.safetensors"))
  differ = sorted(k for k in b if k not in a or not np.array_equal(a[k], b[k]))
  figs["tensors_compared"], figs["tensors_differing"] = len(b), len(differ)
  bad = []
  if not seen <= stopped <= seen + 1 or stopped not in on_disk:
    bad.append(f"stopped at {stopped} (signalled after {seen}; checkpoints {on_disk})")
  if figs["resumed_from"] != stopped:
    bad.append(f"resumed from {figs['resumed_from']}, not {stopped}")
  if differ or a.keys() != b.keys():
    bad.append(f"experts differ from the uninterrupted run: {differ[:4]}")
  return ("FAIL" if bad else "pass"), figs, "; ".join(bad)


def check_llama3_rope_train(s: Settings) -> tuple[str, dict, str]:
  work = s.out / "work"
  model = F.write_tiny_model(work / "tiny_llama3_rope", rope_scaling=F.LLAMA3_ROPE, seed=2)
  data = F.write_data(work / "data.jsonl")
  out = work / "llama3_rope_run"
  summary = train_loop.run(load_config(None, F.train_overrides(model, data, out)))
  ce = {p: float(summary["metrics"][p].get("ce", "nan")) for p in ("phase1", "phase2")}
  ok = all(math.isfinite(v) for v in ce.values()) and all(
      (out / f).exists() for f in ("experts.safetensors", "router.safetensors"))
  return ("pass" if ok else "FAIL"), {"last_ce": ce}, "" if ok else "no finite loss or artifact"


# --------------------------------------------------------------------------------------------
# All of them
# --------------------------------------------------------------------------------------------


def use_compilation_cache(folder: Path) -> None:
  """One persistent compilation cache for this process and the ones it starts: the trainer's
  second and third starts reuse the first one's programs (compiling is most of a tiny run)."""
  folder = Path(os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(folder)))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def run_checks(s: Settings, only: Sequence[str] = ()) -> dict[str, Any]:
  t0 = time.perf_counter()
  s.out.mkdir(parents=True, exist_ok=True)
  shutil.rmtree(s.out / "work", ignore_errors=True)  # the runs of an earlier check
  use_compilation_cache(s.out / "jax_cache")
  want = lambda n: not only or n in only
  rows: list[Row] = []
  if want("eager_vs_sharded"):
    rows.append(_row("eager_vs_sharded", lambda: check_eager_vs_sharded(s)))
  if want("sharded_load"):
    try:
      doc, err = run_load_child(s), ""
    except Exception as e:  # noqa: BLE001
      doc, err = None, f"{type(e).__name__}: {errors.message(e)[:600]}"
    rows += rows_from_child(doc, err)
  if want("sigterm_resume"):
    rows.append(_row("sigterm_resume", lambda: check_sigterm_resume(s)))
  if want("llama3_rope_train"):
    rows.append(_row("llama3_rope_train", lambda: check_llama3_rope_train(s)))
  d = jax.devices()[0]
  report = {"device": f"{jax.device_count()} x {d.platform} ({d.device_kind})",
            "smoke": s.smoke, "settings": {k: str(v) for k, v in dataclasses.asdict(s).items()},
            "checks": [dataclasses.asdict(r) for r in rows],
            "ok": all(r.status != "FAIL" for r in rows),
            "wall_s": round(time.perf_counter() - t0, 1)}
  report["table"] = format_table(report).splitlines()
  (s.out / "accel_check.json").write_text(json.dumps(report, indent=1, default=str))
  return report


def format_table(report: dict[str, Any]) -> str:
  head = [f"accelerator check on {report['device']}{' (SMOKE: tiny shapes)' if report['smoke'] else ''}"
          f", {report['wall_s']} s", ""]
  rows = [("check", "status", "figures", "note")]
  for r in report["checks"]:
    figs = ", ".join(f"{k}={v}" for k, v in r["figures"].items())
    rows.append((r["check"], r["status"], figs, r["note"][:200]))
  w = [max(len(str(row[i])) for row in rows) for i in range(4)]
  lines = ["| " + " | ".join(str(x).ljust(k) for x, k in zip(row, w)) + " |" for row in rows]
  lines.insert(1, "|" + "|".join("-" * (k + 2) for k in w) + "|")
  return "\n".join(head + lines)


CHECKS = ("eager_vs_sharded", "sharded_load", "sigterm_resume", "llama3_rope_train")


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m safemoe_jax.tools.accel_check",
                               description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="runs/accel_check", help="folder for accel_check.json and "
                  "the checks' work files")
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU, the slow test tier)")
  ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(CHECKS)} "
                  "(sharded_load also runs aot_vs_real and step_mfu)")
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--seq", type=int, default=None)
  a = ap.parse_args(argv)
  only = tuple(x for x in a.only.split(",") if x)
  if unknown := [x for x in only if x not in CHECKS]:
    raise ConfigError(f"--only names unknown checks {unknown}; the checks are {list(CHECKS)}")
  s = smoke_settings(Path(a.out)) if a.smoke else Settings(out=Path(a.out))
  s = dataclasses.replace(s, batch=a.batch or s.batch, seq=a.seq or s.seq)
  if s.batch < 1 or s.seq < 2:
    raise ConfigError(f"--batch must be >= 1 and --seq >= 2, got {s.batch} and {s.seq}")
  report = run_checks(s, only)
  print("\n".join(report["table"]))
  print(f"written: {s.out / 'accel_check.json'}")
  return 0 if report["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())

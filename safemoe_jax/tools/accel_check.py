"""`launch/accelerator_check.sh`: is this accelerator ready for the paper-scale run? One command,
no network, a few minutes on one H100 or TPU VM; `--smoke` runs the same checks with tiny shapes
on CPU (the slow test tier).

    safemoe accel_check --out runs/accel_check [--smoke]

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

import dataclasses
import json
import math
import os
import re
import shutil
import signal
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
from safemoe_jax.tools.accel_load import (Row, Settings, rows_from_child, run_load_child,
                                          smoke_settings)
from safemoe_jax.train import checkpoint as ckpt
from safemoe_jax.train import loop as train_loop
from safemoe_jax.train.config import load_config
from safemoe_jax.train.steps import forward

log = get_logger(__name__)

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
  ov = lambda out: F.train_overrides(model, data, out, **{"phase1.steps": s.train_steps,
                                                            "phase2.steps": 0})
  ref, run = work / "sigterm_reference", work / "sigterm_run"
  # Every run a process of its own, one at a time: a TPU is held by one process.
  first = subprocess.run([sys.executable, "-m", "safemoe_jax.train", *ov(ref)],
                         capture_output=True, text=True)  # uninterrupted
  if first.returncode:
    return "FAIL", {}, f"the uninterrupted run failed: {first.stderr[-600:]}"
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
  before = len(_order_steps(run, "phase1"))
  again = subprocess.run(cmd, capture_output=True, text=True)  # the same command again
  if again.returncode:
    return "FAIL", figs, f"the resumed run: exit {again.returncode}: {again.stderr[-600:]}"
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


CHILD_CHECKS = {"eager_vs_sharded": check_eager_vs_sharded,
                "llama3_rope_train": check_llama3_rope_train}


def child_main(check: str, s: Settings) -> None:
  """In a process of its own: one check; prints its row and the device as a RESULT line."""
  use_compilation_cache(s.out / "jax_cache")
  row = _row(check, lambda: CHILD_CHECKS[check](s))
  d = jax.devices()[0]
  print("RESULT", json.dumps({"row": dataclasses.asdict(row), "device":
                              f"{jax.device_count()} x {d.platform} ({d.device_kind})"},
                             default=str), flush=True)


def run_child(check: str, s: Settings) -> tuple[Row, str]:
  argv = ["--child", check, "--out", str(s.out), "--batch", str(s.batch), "--seq", str(s.seq)]
  r = subprocess.run([sys.executable, "-m", "safemoe_jax", "accel_check", *argv,
                      *(["--smoke"] if s.smoke else [])], capture_output=True, text=True)
  line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
  if r.returncode or not line:
    return Row(check, "FAIL", {}, f"its process failed (exit {r.returncode}): "
                                  f"{r.stderr[-600:]}"), ""
  doc = json.loads(line[0][7:])
  return Row(**doc["row"]), doc["device"]


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
  device = ""
  # This process never touches the device: each check runs in processes of its own, one at a
  # time (a TPU is held by one process; a GPU's memory is preallocated by the first).
  if want("eager_vs_sharded"):
    row, device = run_child("eager_vs_sharded", s)
    rows.append(row)
  if want("sharded_load"):
    try:
      doc, err = run_load_child(s), ""
      device = device or f"{doc['devices']} x {doc['device_kind']}"
    except Exception as e:  # noqa: BLE001
      doc, err = None, f"{type(e).__name__}: {errors.message(e)[:600]}"
    rows += rows_from_child(doc, err)
  if want("sigterm_resume"):
    rows.append(_row("sigterm_resume", lambda: check_sigterm_resume(s)))
  if want("llama3_rope_train"):
    row, dev = run_child("llama3_rope_train", s)
    rows.append(row)
    device = device or dev
  report = {"device": device or "(no check reached the device)",
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


def run_cli(out: str, smoke: bool, only_csv: str, batch: int | None, seq: int | None,
            child: str = "") -> int:
  """`safemoe accel_check` (cli/accel_check.py parses the flags): every check, or one `child`
  check in this process (run_checks starts those)."""
  only = tuple(x for x in only_csv.split(",") if x)
  if unknown := [x for x in only if x not in CHECKS]:
    raise ConfigError(f"--only names unknown checks {unknown}; the checks are {list(CHECKS)}")
  s = smoke_settings(Path(out)) if smoke else Settings(out=Path(out))
  s = dataclasses.replace(s, batch=batch or s.batch, seq=seq or s.seq)
  if s.batch < 1 or s.seq < 2:
    raise ConfigError(f"--batch must be >= 1 and --seq >= 2, got {s.batch} and {s.seq}")
  if child:  # one check, in a process of its own
    child_main(child, s)
    return 0
  report = run_checks(s, only)
  print("\n".join(report["table"]))
  print(f"written: {s.out / 'accel_check.json'}")
  return 0 if report["ok"] else 1

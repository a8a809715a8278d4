"""Metrics sinks: JSONL (always), TensorBoard (tensorboardX), Weights & Biases (optional)."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from safemoe_jax.io import jsonio, paths
from safemoe_jax.log import get_logger

log = get_logger(__name__)


def json_default(x):
  """`json.dumps(..., default=json_default)`: numpy scalars and arrays as Python values, other
  objects (paths, dtypes) as their string."""
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  return str(x)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
  out: dict[str, float] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "/"))
      continue
    a = np.asarray(v)
    if a.ndim == 0:
      out[key] = float(a)
    elif a.size <= 64:  # small vectors (e.g. per-expert weights) are logged element-wise
      for idx in np.ndindex(a.shape):
        out[key + "/" + "_".join(map(str, idx))] = float(a[idx])
  return out


def repair_jsonl(path: Path) -> None:
  """Cuts a torn last line (a process killed in the middle of a write leaves one) from an
  append-only JSONL log, so the next record starts on a line of its own. (Remote logs: see
  paths.RemoteAppend.)"""
  if not paths.is_local(path):
    return
  path = Path(path)
  if not path.exists():
    return
  with open(path, "rb+") as f:
    f.seek(0, 2)
    size = f.tell()
    if not size:
      return
    f.seek(max(size - (1 << 20), 0))
    tail = f.read()
    if tail.endswith(b"\n"):
      return
    cut = tail.rfind(b"\n")
    keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= 1 << 20 else size)
    log.warning(f"{path}: removed a torn last line ({size - keep} bytes)")
    f.truncate(keep)


def open_append(path: Path):
  """Opens an append-only JSONL log for appending, after `repair_jsonl`; on remote storage
  (gs://) a paths.RemoteAppend, rewritten whole from time to time."""
  if not paths.is_local(path):
    return paths.RemoteAppend(path)
  repair_jsonl(path)
  return open(path, "a", buffering=1)


class MetricsWriter:
  """Writes one JSON object per step to `path` and scalars to TensorBoard / W&B if enabled.
  With several processes only one writes (`enabled`); the others' records are dropped."""

  def __init__(self, out_dir: Path, *, tensorboard: bool = True, wandb_project: str = "",
               run_name: str = "", config: dict | None = None, enabled: bool = True):
    self.path = paths.as_path(out_dir) / "metrics.jsonl"
    self.f = self.tb = self.wandb = None
    if not enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.f = open_append(self.path)
    if tensorboard and not paths.is_local(out_dir):
      log.warning(f"TensorBoard logging off: {out_dir} is not a local folder")
    elif tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
      except ImportError:
        log.warning("tensorboardX not installed; TensorBoard logging off")
    self.wandb = None
    if wandb_project:
      try:
        import wandb
        self.wandb = wandb.init(project=wandb_project, name=run_name or None, config=config,
                                resume="allow")
      except ImportError:
        log.warning("wandb not installed; W&B logging off")

  def write(self, record: dict[str, Any], step: int, tag: str) -> None:
    if self.f is None:
      return
    flat = _flatten(record)
    row = {"tag": tag, "step": step, **{k: (v if math.isfinite(v) else str(v))
                                          for k, v in flat.items()}}
    self.f.write(json.dumps(row) + "\n")
    for k, v in flat.items():
      if self.tb is not None and math.isfinite(v):
        self.tb.add_scalar(f"{tag}/{k}", v, step)
    if self.wandb is not None:
      self.wandb.log({f"{tag}/{k}": v for k, v in flat.items()}, step=step)

  def close(self) -> None:
    if self.f is not None:
      self.f.close()
    if self.tb is not None:
      self.tb.close()
    if self.wandb is not None:
      self.wandb.finish()


class StepMeter:
  """Per-step throughput from the times the loop already measures (no device sync of its own):
  tokens_per_s (input tokens, padding excluded), mfu (model FLOPs of those tokens, core/flops.py,
  over the peak of every device; absent where no peak is known, e.g. CPU) and goodput (the
  time in steps after the first, compiling one, over the wall time since the phase started:
  restoring, compiling, checkpoints and validation are the rest)."""

  def __init__(self, flops_per_token: Callable[[int], float], peak_flops: float | None,
               devices: int):
    self.flops_per_token, self.peak, self.devices = flops_per_token, peak_flops, devices
    self.t0, self.steady, self.steps = time.perf_counter(), 0.0, 0

  def __call__(self, tokens: float, seq: int, dt: float) -> dict[str, float]:
    if self.steps:
      self.steady += dt
    self.steps += 1
    rec = {"tokens_per_s": tokens / dt,
           "goodput": self.steady / max(time.perf_counter() - self.t0, 1e-9)}
    if self.peak:
      rec["mfu"] = self.flops_per_token(seq) * tokens / dt / (self.peak * self.devices)
    return rec


class StepProfiler:
  """A JAX profiler trace of steps [first, last] (1-based, inclusive) into `folder`; a context
  manager, so a run that stops inside the range still closes its trace."""

  def __init__(self, steps: Sequence[int], folder: Path):
    self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
    self.folder, self.on = folder, False

  def before(self, step: int) -> None:
    if step == self.first and jax.process_index() == 0:
      paths.as_path(self.folder).mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.folder))
      self.on = True
      log.info(f"profiling steps {self.first}..{self.last} into {self.folder}")

  def after(self, step: int) -> None:
    if self.on and step >= self.last:
      self.close()

  def close(self) -> None:
    if self.on:
      self.on = False
      jax.profiler.stop_trace()
      log.info(f"profiler trace written to {self.folder}")

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: Path) -> list[dict]:
  """A log's rows (jsonio: a torn last line skipped; a null row or bad byte is an error)."""
  return jsonio.read_jsonl(path)


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
  """Loss curves of both phases (train loss per step, validation where logged) as a PNG."""
  rows = read_jsonl(metrics_path)
  if not rows:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, phase in zip(axes, ("phase1", "phase2")):
    tr = [(r["step"], r["ce"]) for r in rows if r["tag"] == f"{phase}/train" and "ce" in r]
    va = [(r["step"], r["ce"]) for r in rows if r["tag"] == f"{phase}/val" and "ce" in r]
    if tr:
      # Keep the last record per step (a resumed run may re-log a step it had not saved).
      tr = sorted(dict(tr).items())
      ax.plot(*zip(*tr), label="train (per batch)", lw=0.8, alpha=0.6)
      if len(tr) >= 10:  # batches differ a lot in difficulty: a running mean shows the trend
        w = max(5, len(tr) // 8)
        ys = np.convolve([y for _, y in tr], np.ones(w) / w, mode="valid")
        ax.plot([s for s, _ in tr][w - 1:], ys, lw=2, label=f"train (mean of {w})")
    if va:
      ax.plot(*zip(*sorted(dict(va).items())), "o-", label="validation")
    # Step-0 references on the validation set: the base model, and for the router the fixed mixes.
    refs = [r for r in rows if r["tag"] == f"{phase}/val" and r["step"] == 0]
    for key, mark in (("ce_base", "s"), ("ce_uniform", "^"), ("ce_negated", "v")):
      vals = [r[key] for r in refs if key in r]
      if vals:
        ax.plot([0], vals[-1:], mark, ms=8, label=f"validation, {key[3:]} (step 0)")
    ax.set_title({"phase1": "phase 1: experts (oracle routing)",
                  "phase2": "phase 2: router"}[phase])
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy on response tokens")
    if ax.get_legend_handles_labels()[0]:
      ax.legend()
  fig.tight_layout()
  if paths.is_local(out_png):
    fig.savefig(out_png, dpi=110)
  else:  # matplotlib writes local files or file objects
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    paths.as_path(out_png).write_bytes(buf.getvalue())
  plt.close(fig)
  return out_png

"""What the training loop does around each step, as small hooks: the metrics (kept on the device
and brought to the host once per logging interval), the data-order audit trail and the progress
bar. Checkpoints, preemption and validation are `Phase` methods in loop.py."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from safemoe_jax.log import get_logger
from safemoe_jax.train.checkpoint import NonFiniteError
from safemoe_jax.train.config import PhaseConfig
from safemoe_jax.train.metrics import MetricsWriter, open_append

log = get_logger("safemoe_jax.train.loop")

OBJECTIVE_TERMS = ("obj_nll", "obj_contrast", "obj_retain", "obj_route")


class MetricsHook:
  """Buffers each step's metrics (device arrays) and brings them to the host in one transfer at
  `flush`: on the logging cadence (log.every), before a checkpoint or validation, and at the
  end. A flush writes one record per step, handles non-finite steps (on_nonfinite: stop raises
  at the first, before any later checkpoint is written; skip logs each) and times the interval:
  step_time_s is the interval's mean (the first interval includes compilation), tokens_per_s
  leaves the compilation out."""

  def __init__(self, name: str, pc: PhaseConfig, every: int, writer: MetricsWriter,
               lr: Callable[[int], Any], ckpt_dir: Path, *, start: int, progress: bool,
               meter: Callable[[float, int, float], dict] | None = None):
    self.name, self.pc, self.every, self.writer, self.lr = name, pc, every, writer, lr
    self.meter = meter  # per-step tokens/s, MFU and goodput (train/metrics.py StepMeter)
    self.ckpt_dir = ckpt_dir
    # (step, device metrics, tokens, examples, sequence length)
    self.buf: list[tuple[int, Any, float, Any, int]] = []
    self.last: dict[str, Any] = {}
    self.t_interval = time.perf_counter()
    self.t_compiled: float | None = None  # after the first step's call returned (compiled)
    self.tokens_steady = 0.0  # input tokens since then
    self.bar = None
    if progress and start < pc.steps:
      self.bar = tqdm(total=pc.steps, initial=start, desc=name, unit="step", file=sys.stderr,
                      dynamic_ncols=True)

  def add(self, step: int, m, n_in: float, example_index, seq: int = 0) -> None:
    """Step `step` (1-based) was dispatched with metrics `m` (still on the device)."""
    if self.t_compiled is None:
      self.t_compiled = time.perf_counter()
    self.tokens_steady += n_in
    self.buf.append((step, m, n_in, example_index, seq))
    if self.bar is not None:
      self.bar.update(1)

  def due(self, step: int) -> bool:
    return step % self.every == 0

  def flush(self) -> None:
    if not self.buf:
      return
    # The one device -> host transfer of the interval: every step's metrics and learning rate.
    lrs = jax.vmap(self.lr)(jnp.asarray([b[0] - 1 for b in self.buf]))
    ms, lrs = jax.device_get(([b[1] for b in self.buf], lrs))
    now = time.perf_counter()
    dt = (now - self.t_interval) / len(self.buf)
    for (step, _, n_in, examples, seq), m, lr in zip(self.buf, ms, lrs):
      self._record(step, m, n_in, examples, dt, float(lr), seq)
    if self.t_compiled is not None and now > self.t_compiled:
      self.last["tokens_per_s"] = self.tokens_steady / (now - self.t_compiled)
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{float(self.last['ce']):.3f}",
                           tok_s=f"{self.last.get('tokens_per_s', 0.0):.0f}")
    self.buf, self.t_interval = [], now

  def _record(self, step: int, m: dict, n_in: float, examples, dt: float, lr: float,
              seq: int) -> None:
    if bool(m["nonfinite"]):
      where = (f"step {step} of {self.name}, examples "
               f"{[] if examples is None else np.asarray(examples).ravel().tolist()}")
      what = ("non-finite update (new parameters or optimiser state; check "
              f"{self.name}.b1, b2 and lr)" if bool(m["update_nonfinite"])
              else "non-finite loss or gradient")
      if self.pc.on_nonfinite == "stop":
        self.buf = []
        raise NonFiniteError(
            f"{what} at {where} (loss {m['loss']}, grad norm "
            f"{m['grad_norm']}); the update was not applied and the last checkpoint in "
            f"{self.ckpt_dir} is intact. Lower the learning rate, or set "
            f"{self.name}.on_nonfinite=skip to skip such batches.")
      log.warning(f"skipped a non-finite update at {where} ({what})")
    rec = {"loss": m["loss"], "ce": m["ce"], "aux_loss": m["aux_loss"],
           "grad_norm": m["grad_norm"], "lr": lr,
           "tokens": m["tokens"], "input_tokens": n_in, "step_time_s": dt,
           "skipped": bool(m["nonfinite"])}
    if self.meter is not None:
      rec.update(self.meter(n_in, seq, dt))
    rec.update({k[4:]: m[k] for k in OBJECTIVE_TERMS if k in m})
    if "routing" in m:
      rec["routing"] = {"weight_mean": m["routing"]["weight"].mean(0),
                        "entropy_mean": m["routing"]["entropy"].mean()}
    self.writer.write(rec, step, f"{self.name}/train")
    self.last = rec

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class DataOrder:
  """The audit trail of the data order: each step's global batch by example index (process 0
  writes; every process takes part in the gather)."""

  def __init__(self, name: str, path: Path | str):
    self.name = name
    self.f = open_append(path) if jax.process_index() == 0 else None

  def gather(self, example_index) -> np.ndarray | None:
    """The global batch's example indices, by process: [processes, rows]."""
    if example_index is None:
      return None
    rows = np.asarray(example_index).ravel()
    if jax.process_count() > 1:
      return np.asarray(multihost_utils.process_allgather(rows))
    return rows[None]

  def write(self, step: int, rows: np.ndarray | None) -> None:
    if self.f is None or rows is None:
      return
    rec = {"phase": self.name, "step": step, "examples": rows.ravel().tolist()}
    if len(rows) > 1:
      rec["by_process"] = rows.tolist()
    self.f.write(json.dumps(rec) + "\n")

  def close(self) -> None:
    if self.f is not None:
      self.f.close()

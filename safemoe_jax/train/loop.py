"""The two training phases: a `Phase` trains one group (phase 1 the experts with oracle routing,
phase 2 the router with base and experts frozen) with the jitted step over the configured mesh,
checkpointing with Orbax (trainable state, optimiser state, step, data iterator state) and
resuming from the latest checkpoint; `run` trains both phases into a run folder (`RunDir`).

The command is `safemoe train` (safemoe_jax/cli/train.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from safemoe_jax.core import config as C
from safemoe_jax.core import sharding as S
from safemoe_jax.core.config import ConfigError
from safemoe_jax.core.experts import ExpertParam, RouterParam
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.data.card import format_card
from safemoe_jax.data.encode import build
from safemoe_jax.io import base as B
from safemoe_jax.io import jsonio, paths
from safemoe_jax.log import get_logger, set_process_index
from safemoe_jax.train.checkpoint import (StorageError, check_finite, checksums, flat_arrays, host,
                                          load_group, save_group, to_host)
from safemoe_jax.train.hooks import DataOrder, MetricsHook
from safemoe_jax.train.config import PhaseConfig, TrainConfig
from safemoe_jax.train.probe import set_probe_center
from safemoe_jax.train.metrics import (MetricsWriter, StepMeter, StepProfiler, json_default,
                                       plot_losses, repair_jsonl)
from safemoe_jax.core.flops import device_peak_flops, train_flops_per_token
from safemoe_jax.train.optim import make_optimizer
from safemoe_jax.train.rundir import RunDir
from safemoe_jax.train.signals import Preempted, SignalGuard
from safemoe_jax.train.steps import all_finite, forward_loss, make_train_step

log = get_logger(__name__)


# One program, not one eager op per leaf: with several processes each eager reduction of a global
# array is a program of its own with cross-process collectives, and CPU backends run dispatched
# programs concurrently, so two processes could pair their collectives in different orders and
# wait on each other forever (seen: a 2-process run hung in its first checkpoint).
_all_finite = jax.jit(all_finite)


# --------------------------------------------------------------------------------------------
# One phase
# --------------------------------------------------------------------------------------------


class Phase:
  """Trains one group (experts or router) for `pc.steps` updates, checkpointing as it goes."""

  def __init__(self, name: str, pc: PhaseConfig, cfg: TrainConfig, model: SafeMoELM,
               group: str, routing: str, mesh, out: Path, writer: MetricsWriter,
               objective: C.ObjectiveConfig | None = None):
    self.name, self.pc, self.cfg, self.model = name, pc, cfg, model
    self.group, self.routing, self.mesh, self.writer = group, routing, mesh, writer
    self.tx, self.sched = make_optimizer(pc)
    self.needs_base = objective is not None and objective.needs_base  # FLOPs: frozen forward
    step_fn, params, frozen = make_train_step(model, group, self.tx, routing, pc.grad_accum,
                                              objective=objective)
    rules = cfg.mesh.rules
    opt = self.tx.init(params)
    self.p_sh = S.state_shardings(params, mesh, rules)
    self.o_sh = S.state_shardings(opt, mesh, rules)
    f_sh = S.state_shardings(frozen, mesh, rules)
    # A copy: the step donates its parameters, and the model keeps its own (sharded) arrays.
    self.params = jax.device_put(params, self.p_sh, may_alias=False)
    self.opt = jax.device_put(opt, self.o_sh)
    self.frozen = jax.device_put(frozen, f_sh)  # a no-op for a model built sharded
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with S.use_mesh_rules(mesh, rules):  # metrics replicated: every host can read them
      self.step_fn = jax.jit(step_fn, out_shardings=(self.p_sh, self.o_sh, replicated),
                             donate_argnums=(0, 1))
      self._copy = jax.jit(lambda t: t, out_shardings=self.p_sh)
    self.run_dir = RunDir(out)
    self.ckpt_dir = paths.absolute(self.run_dir.checkpoints(name))  # local or gs://
    self.mgr = ocp.CheckpointManager(
        self.ckpt_dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep_checkpoints, create=True,
            # async: waited for at the phase's end and on SIGTERM (save(wait=...))
            enable_async_checkpointing=cfg.async_checkpoints))
    self.key = jax.random.fold_in(jax.random.key(cfg.seed), 1 if name == "phase1" else 2)
    self.profiler = StepProfiler(cfg.profile.steps if cfg.profile.phase == name else (),
                                 self.run_dir.path / "profile")

  # --- checkpoints ---------------------------------------------------------------------
  def save(self, step: int, data_state: Any, wait: bool = True) -> None:
    """async_checkpoints and not `wait`: written in the background (the next save waits)."""
    if not bool(host(_all_finite((self.params, self.opt)))):
      check_finite({**{f"params.{k}": v for k, v in flat_arrays(self.params).items()},
                    **{f"opt.{i}": x for i, x in enumerate(to_host(jax.tree.leaves(self.opt)))}},
                   f"checkpoint {step} of {self.name} to {self.ckpt_dir}")
    meta = {"phase": self.name, "step": step, "seed": self.cfg.seed, "data_state": data_state,
            "checksum": checksums((self.params, self.opt))}
    try:
      self.mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(self.params),
                                                  opt=ocp.args.StandardSave(self.opt),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
      if wait or not self.cfg.async_checkpoints:
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
        log.warning(f"checkpoint {self.ckpt_dir}/{step} cannot be read "
             f"({type(e).__name__}: {str(e)[:200]}); trying an older one")
        bad.append(step)
        continue
      if r.meta.get("seed") != self.cfg.seed:
        raise ConfigError(f"checkpoint {self.ckpt_dir}/{step} was written with seed "
                          f"{r.meta.get('seed')}, this run has seed {self.cfg.seed}; use another "
                          f"output_dir or the same seed")
      self._set_aside(bad)
      self.params, self.opt = r.params, r.opt
      log.info(f"{self.name}: resumed from step {step} ({self.ckpt_dir})")
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
        (self.ckpt_dir / str(s)).rename(dst)
        log.warning(f"moved unreadable checkpoint {s} aside to {dst}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"{self.name}: unreadable checkpoints moved aside")
    self.mgr.reload()

  # --- the loop --------------------------------------------------------------------------
  def run(self, train_iter, val_fn, guard: SignalGuard) -> dict[str, Any]:
    """Steps from the latest checkpoint to pc.steps; the hooks log, checkpoint, stop on
    SIGTERM and validate. Returns the last step's metrics (and validation, tokens/s)."""
    with self.profiler:  # a stop inside the profiled steps still closes the trace
      return self._run(train_iter, val_fn, guard)

  def _run(self, train_iter, val_fn, guard: SignalGuard) -> dict[str, Any]:
    pc = self.pc
    start, data_state = self.restore_latest()
    if data_state is not None:
      train_iter.set_state(data_state)
    if start >= pc.steps:
      log.info(f"{self.name}: already complete ({start}/{pc.steps} steps)")
    metrics = MetricsHook(self.name, pc, self.cfg.log.every, self.writer, self.sched,
                          self.ckpt_dir, start=start, meter=self.step_meter(),
                          progress=self.cfg.log.progress and jax.process_index() == 0)
    order = DataOrder(self.name, self.run_dir.data_order)
    try:
      for step in range(start, pc.steps):
        self.step(step, next(train_iter), metrics, order)
        self.after_step(step + 1, train_iter, val_fn, guard, metrics)
      metrics.flush()
      if start >= pc.steps and val_fn is not None:  # resumed after its last step: validate once
        self.validate(val_fn, pc.steps, metrics)
    finally:
      metrics.close()
      order.close()
    self.mgr.close()
    return metrics.last

  def step(self, step: int, batch: dict, metrics: MetricsHook, order: DataOrder) -> None:
    """One update (0-based `step`), dispatched without waiting for it: its metrics stay on the
    device until the next flush."""
    pc = self.pc
    example_index = batch.pop("example_index", None)  # this process's rows of the global batch
    order.write(step + 1, order.gather(example_index))
    n_in = float(batch["attention_mask"].sum()) * jax.process_count()  # tokens processed
    if pc.grad_accum > 1:
      batch = {k: v.reshape((pc.grad_accum, -1) + v.shape[1:]) for k, v in batch.items()}
    batch = S.shard_batch(batch, self.mesh, leading_dims=2 if pc.grad_accum > 1 else 1)
    seq = batch["input_ids"].shape[-1]
    self.profiler.before(step + 1)
    with S.use_mesh_rules(self.mesh, self.cfg.mesh.rules):
      self.params, self.opt, m = self.step_fn(self.params, self.opt, self.frozen, batch,
                                              jax.random.fold_in(self.key, step))
    self.profiler.after(step + 1)
    metrics.add(step + 1, m, n_in, example_index, seq)

  def after_step(self, step: int, train_iter, val_fn, guard: SignalGuard,
                 metrics: MetricsHook) -> None:
    """The hooks after update `step` (1-based): metrics on their cadence, then checkpoint,
    preemption and validation (each flushes the metrics first, so a non-finite step stops the
    run before a checkpoint could hold the updates after it)."""
    done = step == self.pc.steps
    stop = guard.stop()  # every process, every step: all stop at the same one
    ckpt = step % self.pc.ckpt_every == 0 or done or stop
    val = val_fn is not None and (done or (self.pc.eval_every and step % self.pc.eval_every == 0))
    if metrics.due(step) or ckpt or val:
      metrics.flush()
    if ckpt:
      self.save(step, train_iter.get_state(), wait=done or stop)  # SIGTERM: finished
    if stop:  # also on the last step: stop before validation and the next phase
      log.warning(f"{self.name}: process {jax.process_index()} stops at step {step} "
                  f"(SIGTERM {'here' if guard.own else 'on another process'})")
      raise Preempted(f"{self.name} stopped at step {step}; checkpoint saved")
    if val:
      self.validate(val_fn, step, metrics)

  def validate(self, val_fn, step: int, metrics: MetricsHook) -> None:
    val = val_fn(self.merged())
    self.writer.write(val, step, f"{self.name}/val")
    metrics.last["val"] = val

  def step_meter(self) -> StepMeter:
    """tokens/s, MFU (model FLOPs against the devices' peak) and goodput of this phase's steps."""
    e = self.model.ecfg
    fl = lambda seq: train_flops_per_token(self.model.cfg, seq, self.name, e.num_experts, e.rank,
                                           e.targets, base_forward=self.needs_base)["total"]
    peak, _ = device_peak_flops()
    if peak is None:
      log.info(f"{self.name}: MFU not logged ({jax.devices()[0].platform}: no known peak FLOP/s)")
    return StepMeter(fl, peak, jax.device_count())

  def merged(self) -> SafeMoELM:
    """The model with this phase's current trainable group (a sharded copy: the step donates
    its own)."""
    nnx.update(self.model, self._copy(self.params))
    return self.model


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _gather(x) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


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


QuickLook = Callable[..., str]  # (model, tok, data, out, *, n_harmful, n_benign, progress, log)


def run(cfg: TrainConfig, quick_look: QuickLook | None = None) -> dict[str, Any]:
  """Both phases end to end; returns the summary written to <output_dir>/safemoe.json.
  quick_look (evaluation.quick.quick_look from the `train` command): the smoke-test table at
  the end when cfg.quick_look > 0."""
  return run_with_model(cfg, quick_look)[0]


def run_with_model(cfg: TrainConfig, quick_look: QuickLook | None = None
                   ) -> tuple[dict[str, Any], SafeMoELM]:
  """`run`, also returning the trained model (base, experts and router)."""
  t_start = time.perf_counter()
  S.initialize_distributed()
  set_process_index(jax.process_index())
  rd = RunDir(cfg.output_dir)
  cfg.mesh.validate(jax.device_count())  # every setting is checked before anything is written
  if jax.process_index() == 0:
    rd.check_not_input(cfg.model.path)
    rd.check_writable()
  mesh = S.make_mesh(cfg.mesh)
  log.info(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, mesh "
           f"{dict(mesh.shape)}, processes: {jax.process_count()}")

  base = B.load_base(cfg.model.path, revision=cfg.model.revision,
                     param_dtype=cfg.model.param_dtype, compute_dtype=cfg.model.compute_dtype,
                     remat=cfg.model.remat, lazy=True)
  ecfg = cfg.experts_config()
  log.info(f"base model {base.path.name}: {base.config.num_layers} layers, width "
           f"{base.config.hidden_size}; {ecfg.num_experts} experts of rank {ecfg.rank} on "
           f"{list(ecfg.targets)}")
  # Sharded from the start: each device's shard of the base read straight from the checkpoint.
  model = base.sharded_model(ecfg, cfg.router, cfg.seed, mesh, cfg.mesh.rules)

  data = build(cfg.data, base.tokenizer, model_context=base.config.max_position_embeddings)
  card = data.card()
  rd.record(cfg, base.path, base.config, write=False)  # a refused resume changes nothing
  lock = rd.lock() if jax.process_index() == 0 else None
  try:
    return _run_locked(cfg, t_start, rd, mesh, base, model, data, card, quick_look)
  finally:
    if lock is not None:
      lock.release()


def _run_locked(cfg: TrainConfig, t_start: float, rd: RunDir, mesh, base: B.Base,
                model: SafeMoELM, data, card, quick_look: QuickLook | None
                ) -> tuple[dict[str, Any], SafeMoELM]:
  ecfg = cfg.experts_config()
  out, tok = rd.path, base.tokenizer
  # Again, under the lock: it may have changed. Only process 0 writes run.json (the others
  # share the folder; two writers of one file race on its .tmp).
  info = rd.record(cfg, base.path, base.config, write=jax.process_index() == 0)
  if jax.process_index() == 0:
    repair_jsonl(rd.data_order)  # metrics.jsonl: by its writer
    jsonio.write_json_atomic(rd.data_card("json"), card)
    jsonio.write_text_atomic(rd.data_card("txt"), format_card(card))
    print(format_card(card), file=sys.stderr)

  writer = MetricsWriter(out, tensorboard=cfg.log.tensorboard and jax.process_index() == 0,
                         wandb_project=cfg.log.wandb_project if jax.process_index() == 0 else "",
                         run_name=out.name, config=C.to_dict(cfg),
                         enabled=jax.process_index() == 0)
  pi, pc_ = jax.process_index(), jax.process_count()
  domains = list(cfg.data.domains)
  results: dict[str, Any] = {}
  phases = (("phase1", cfg.phase1, "experts", "oracle", rd.artifact("phase1"), 1),
            ("phase2", cfg.phase2, "router", "learned", rd.artifact("phase2"), 2))
  try:
    with SignalGuard() as guard:
      for name, pc, group, routing, artifact, k in phases:
        filt = ExpertParam if group == "experts" else RouterParam
        if artifact.exists():
          st = nnx.state(model, filt)
          load_group(artifact, st)
          nnx.update(model, st)
          log.info(f"{name}: {artifact.name} exists, loaded it instead of training again")
          continue
        if pc.steps == 0:
          log.info(f"{name}: 0 steps configured, skipped")
          continue
        val_fn = make_val_fn(lambda k=k: data.eval_batches(k, process_index=pi,
                                                           process_count=pc_),
                             routing, domains, mesh, cfg.mesh.rules)
        # Reference points at step 0: the base model (and for the router, the fixed mixes).
        refs = ("base",) if name == "phase1" else ("base", "uniform", "negated")
        ref = {f"ce_{r}": val_fn(model, r)["ce"] for r in refs}
        writer.write(ref, 0, f"{name}/val")
        results[f"{name}_reference"] = ref
        log.info(f"{name}: training the {group} ({routing} routing) for {pc.steps} steps")
        if name == "phase2" and cfg.router.form == "probe":  # restored with the router on resume
          set_probe_center(model, data.train_iterator(k, process_index=pi, process_count=pc_,
                                                      num_epochs=1),
                           mesh, cfg.mesh.rules, cfg.router.center_rows)
        phase = Phase(name, pc, cfg, model, group, routing, mesh, out, writer,
                      objective=cfg.objective if name == "phase2" else None)
        it = data.train_iterator(k, process_index=pi, process_count=pc_)
        results[name] = phase.run(it, val_fn, guard)
        phase.merged()
        save_group(artifact, nnx.state(model, filt),  # every process gathers, process 0 writes
                   {"phase": name, "domains": domains, "run": info}, write=pi == 0)
        if guard.stop():  # SIGTERM during validation or the artifact: stop before the next phase
          raise Preempted(f"{name} finished and saved; stopping before the next phase")
  except Preempted as e:
    writer.close()
    log.info(f"{e}. Run the same command again to resume.")
    raise
  writer.close()

  summary = {"output_dir": str(paths.absolute(out)), "base_model": info["base_model"],
             "domains": domains, "experts": C.to_dict(ecfg), "router": C.to_dict(cfg.router),
             "data_card": card, "metrics": results,
             "artifacts": {"experts": str(rd.experts), "router": str(rd.router)},
             "wall_time_s": time.perf_counter() - t_start}
  if jax.process_index() == 0:
    png = plot_losses(rd.metrics, rd.loss_curves)
    summary["artifacts"]["loss_curves"] = str(png) if png else None
    summary["wall_time_train_s"] = summary["wall_time_s"]
    if cfg.quick_look and quick_look is not None:
      summary["quick_look"] = _quick_look(quick_look, cfg, model, tok, data, out)
      summary["wall_time_s"] = time.perf_counter() - t_start
    rd.write_json(rd.summary, summary, default=json_default)
  return summary, model


def _quick_look(look: QuickLook, cfg: TrainConfig, model, tok, data, out: Path) -> str | None:
  """The before/after table at the end of a run; a failure here never costs the trained run."""
  if jax.process_count() > 1:  # generation here would run on process 0 alone: a deadlock
    log.info(f"quick look skipped on {jax.process_count()} processes; evaluate with: "
             f"python -m safemoe_jax evaluate --run {out}")
    return None
  log.info(f"quick look (a smoke test): base, negated mix and SafeMoE on {cfg.quick_look} "
           f"held-out harmful and {max(cfg.quick_look // 2, 1)} benign prompts")
  try:
    return look(model, tok, data, out, n_harmful=cfg.quick_look,
                            n_benign=max(cfg.quick_look // 2, 1), progress=cfg.log.progress,
                            log=log.info)
  except Exception as e:  # noqa: BLE001 - the artifacts are written; say why and carry on
    log.warning(f"the quick look failed ({type(e).__name__}: {e}); the run's artifacts are "
                f"complete. Evaluate with: python -m safemoe_jax evaluate --run {out}")
    return None

"""The single-LoRA baselines: one LoRA of the experts' rank trained with a phase's budget (sft:
phase 2's safe-informative set; harmful_lora: phase 1's harmful data), reusing the trainer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

from flax import nnx

from safemoe_jax.core import sharding as S
from safemoe_jax.core.config import RouterConfig
from safemoe_jax.core.experts import ExpertParam
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.log import get_logger
from safemoe_jax.train import loop as T
from safemoe_jax.train.checkpoint import load_group, save_group
from safemoe_jax.train.metrics import MetricsWriter, json_default
from safemoe_jax.train.rundir import RunDir

log = get_logger(__name__)


def train_single_lora(cfg, mcfg, params, data, out: Path, kind: Literal["sft", "harmful_lora"],
                      log=log.info):
  """One LoRA, E=1 at gate 1.0, with the experts' rank/targets, trained once and saved.

  sft: the phase-2 safe-informative set with phase 2's steps, lr, schedule and batch (the same
  budget as the router). harmful_lora: all phase-1 harmful data with phase 1's budget.
  Reuses train.Phase (checkpoints, resume, non-finite guard); the artifact is
  <run>/sft_lora.safetensors (or harmful_lora.safetensors) and is loaded instead when present.
  """
  ecfg1 = dataclasses.replace(cfg.experts_config(), num_experts=1, domains=(kind,))
  model = SafeMoELM(mcfg, ecfg1, RouterConfig(), rngs=nnx.Rngs(cfg.seed))
  model.load_base(params)
  rd = RunDir(out)
  art = rd.single_lora(kind)
  st = nnx.state(model, ExpertParam)
  if art.exists():
    load_group(art, st)
    nnx.update(model, st)
    log(f"{kind}: loaded {art}")
    return model
  phase_no, pc = (2, cfg.phase2) if kind == "sft" else (1, cfg.phase1)
  log(f"{kind}: training one LoRA (rank {ecfg1.rank} on {list(ecfg1.targets)}) for {pc.steps} "
      f"steps, lr {pc.lr}, batch {cfg.data.batch_size}, on the phase-{phase_no} training set")
  mesh = S.make_mesh(cfg.mesh)
  writer = MetricsWriter(rd.eval_dir, tensorboard=False)
  # routing 'uniform' with E=1 is gate 1/E = 1.0: exactly the fixed weight [1.0] of generation.
  phase = T.Phase(kind, pc, cfg, model, "experts", "uniform", mesh, out, writer)
  has_val = "validation" in (data.phase2 if phase_no == 2 else data.phase1)
  val_fn = (T.make_val_fn(lambda: data.eval_batches(phase_no), "uniform", list(cfg.data.domains),
                          mesh, cfg.mesh.rules) if has_val else None)
  with T.SignalGuard() as guard:
    # SFT learns the curated answers only: never phase 2's harmful (contrast) or retain rows
    res = phase.run(data.train_iterator(phase_no, targets_only=kind == "sft"), val_fn, guard)
  phase.merged()
  writer.close()
  final = json.loads(json.dumps(res, default=json_default))
  save_group(art, nnx.state(model, ExpertParam), {"kind": kind, "phase_budget": phase_no,
                                                   "final": final})
  return model

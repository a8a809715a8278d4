"""The optimiser of a phase: AdamW with warm-up and decay, optional global-norm clipping."""

from __future__ import annotations

import jax
import optax

from safemoe_jax.train.config import PhaseConfig


def _decayed(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(getattr(k, "key", None) == "center" for k in path), params)


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
  # statistics stored beside the weights (the probe router's centre) are never decayed
  adam = optax.adamw(sched, b1=p.b1, b2=p.b2, weight_decay=p.weight_decay, mask=_decayed)
  if p.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(p.clip_norm), adam), sched
  return adam, sched

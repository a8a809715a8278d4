"""Pure training steps over state pytrees: (state, batch) -> (state, metrics).

The model is split into three groups, `nnx.split(model, RouterParam, ExpertParam, nnx.Param)`:
router, experts, base. A step differentiates only the trainable group; the other two are
passed in as frozen arguments and get neither gradients nor optimiser state.

Batch convention (see data.py): input_ids, attention_mask, loss_mask [B, T] with loss_mask[t] = 1
when token t is a response token (predicted from position t-1); prompt_mask [B, T];
domains [B, E] multi-hot (oracle routing).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from safemoe_jax.core.config import KIND_HARMFUL, KIND_RETAIN, KIND_TARGET, ObjectiveConfig
from safemoe_jax.core.model import SafeMoELM, split_groups

GROUPS = ("router", "experts")


def masked_ce(logits_BTV: jax.Array, ids_BT: jax.Array, loss_mask_BT: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Next-token cross-entropy on the tokens marked in loss_mask (the targets).

  Returns (sum of per-token losses [B], number of target tokens [B], mean loss).
  """
  logp = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), -1)
  tgt = ids_BT[:, 1:]
  w = loss_mask_BT[:, 1:].astype(jnp.float32)
  nll = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  per_ex = jnp.sum(nll * w, -1)
  n_ex = jnp.sum(w, -1)
  return per_ex, n_ex, jnp.sum(per_ex) / jnp.maximum(jnp.sum(n_ex), 1.0)


def all_finite(tree) -> jax.Array:
  """True when every floating-point element of the tree is finite (integer leaves, such as an
  optimiser's step count, are always finite)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def forward(model: SafeMoELM, batch: dict[str, jax.Array], routing: str,
            dropout_rng: jax.Array | None = None, fixed_weights=None
            ) -> tuple[jax.Array, dict[str, Any]]:
  """The model on a training batch: (logits, aux), routing statistics over the response tokens."""
  return model(batch["input_ids"], batch["attention_mask"], routing=routing,
               domains=batch.get("domains"), fixed_weights=fixed_weights,
               prompt_mask=batch.get("prompt_mask"), stats_mask=batch["loss_mask"],
               dropout_rng=dropout_rng)


def forward_loss(model: SafeMoELM, batch: dict[str, jax.Array], routing: str,
                 dropout_rng: jax.Array | None = None, fixed_weights=None
                 ) -> tuple[jax.Array, dict[str, Any]]:
  logits, aux = forward(model, batch, routing, dropout_rng, fixed_weights)
  per_ex, n_ex, ce = masked_ce(logits, batch["input_ids"], batch["loss_mask"])
  loss = ce + aux["aux_loss"]
  metrics = {"loss": loss, "ce": ce, "aux_loss": aux["aux_loss"], "tokens": jnp.sum(n_ex),
             "per_example_nll": per_ex, "per_example_tokens": n_ex}
  if "routing" in aux:
    metrics["routing"] = aux["routing"]
  return loss, metrics


def token_logp(logits_BTV: jax.Array, ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log-probabilities [B, T-1, V], log p of each next token [B, T-1]), in float32."""
  logp = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), -1)
  return logp, jnp.take_along_axis(logp, ids_BT[:, 1:, None], -1)[..., 0]


def objective_norms(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Denominators of each term over the whole (accumulated) batch: target, harmful and retain
  tokens, and harmful answers (each at least 1)."""
  w = batch["loss_mask"][..., 1:].astype(jnp.float32)
  kind = batch["kind"]
  tok = lambda k: jnp.maximum(jnp.sum(w * (kind == k)[..., None]), 1.0)
  return {"target": tok(KIND_TARGET), "harmful": tok(KIND_HARMFUL), "retain": tok(KIND_RETAIN),
          "harmful_rows": jnp.maximum(jnp.sum((kind == KIND_HARMFUL) & (jnp.sum(w, -1) > 0)),
                                      1.0),
          "rows": jnp.maximum(jnp.sum(jnp.sum(w, -1) > 0), 1.0)}


def objective_terms(logits_BTV: jax.Array, base_logits_BTV: jax.Array | None,
                    batch: dict[str, jax.Array], ocfg: ObjectiveConfig,
                    norms: dict[str, jax.Array], score_B: jax.Array | None = None
                    ) -> dict[str, jax.Array]:
  """Phase 2's terms on one micro-batch, each already divided by its whole-batch denominator
  (so sums over micro-batches are the whole batch's terms):
  nll (target rows), contrast (harmful rows: unlikelihood or NPO against the base model),
  retain (benign rows: KL(base || model) per token), route (every row: binary cross-entropy of
  the probe's score score_B [B], 1 on harmful prompts (target, harmful rows), 0 on retain rows)."""
  ids, kind = batch["input_ids"], batch["kind"]
  w = batch["loss_mask"][:, 1:].astype(jnp.float32)
  logp, tgt = token_logp(logits_BTV, ids)
  is_k = lambda k: (kind == k)[:, None].astype(jnp.float32) * w
  out = {"nll": -jnp.sum(tgt * is_k(KIND_TARGET)) / norms["target"]}
  zero = jnp.zeros((), jnp.float32)
  base = None
  if base_logits_BTV is not None:
    base = token_logp(jax.lax.stop_gradient(base_logits_BTV), ids)
  wh = is_k(KIND_HARMFUL)
  if ocfg.contrast == "unlikelihood":  # -log(1 - p(y_t)), p clipped away from 1
    p = jnp.minimum(jnp.exp(tgt), 1.0 - 1e-6)
    out["contrast"] = jnp.sum(-jnp.log1p(-p) * wh) / norms["harmful"]
  elif ocfg.contrast == "npo":
    ratio_B = jnp.sum((tgt - base[1]) * wh, -1)  # log p(y) - log p_base(y) per harmful answer
    has = (jnp.sum(wh, -1) > 0).astype(jnp.float32)
    out["contrast"] = jnp.sum(2.0 / ocfg.beta * jax.nn.softplus(ocfg.beta * ratio_B) * has) / \
        norms["harmful_rows"]
  else:
    out["contrast"] = zero
  if ocfg.retain_coef > 0:
    lpb = base[0]
    kl_BT = jnp.sum(jnp.exp(lpb) * (lpb - logp), -1)
    out["retain"] = jnp.sum(kl_BT * is_k(KIND_RETAIN)) / norms["retain"]
  else:
    out["retain"] = zero
  if ocfg.route_coef > 0:
    if score_B is None:
      raise ValueError("objective.route_coef > 0 needs the probe's score (router.form=probe)")
    y_B = (kind != KIND_RETAIN).astype(jnp.float32)
    s_B = jnp.clip(score_B, 1e-6, 1.0 - 1e-6)
    bce_B = -(y_B * jnp.log(s_B) + (1.0 - y_B) * jnp.log1p(-s_B))
    out["route"] = jnp.sum(bce_B * (jnp.sum(w, -1) > 0)) / norms["rows"]
  else:
    out["route"] = zero
  out["objective"] = (out["nll"] + ocfg.contrast_coef * out["contrast"]
                      + ocfg.retain_coef * out["retain"] + ocfg.route_coef * out["route"])
  return out


def split_for(model: SafeMoELM, group: str):
  """(graphdef, trainable state, frozen states, merge) for training `group`."""
  if group not in GROUPS:
    raise ValueError(f"trainable group must be one of {GROUPS}, got {group!r}")
  graphdef, router, experts, base = split_groups(model)
  if group == "router":
    return graphdef, router, (experts, base), lambda t, f: nnx.merge(graphdef, t, *f)
  return graphdef, experts, (router, base), lambda t, f: nnx.merge(graphdef, f[0], t, f[1])


def make_train_step(model: SafeMoELM, group: str, tx: optax.GradientTransformation,
                    routing: str, accum_steps: int = 1,
                    objective: ObjectiveConfig | None = None) -> tuple[Callable, Any, Any]:
  """Returns (step, trainable, frozen).

  step(params, opt_state, frozen, batch, rng) -> (params, opt_state, metrics) is pure; only
  `params` (the trainable group) is differentiated. With accum_steps > 1 every batch array has
  a leading micro-batch axis [A, b, ...]; gradients are summed over a scan so the update equals
  one step on the whole batch (loss weighted by response tokens, aux losses averaged).
  A non-finite loss, gradient or update (new parameters or optimiser state, e.g. Adam's 0/0
  with b1=1) leaves params and optimiser state unchanged and sets metrics['nonfinite'] (and
  metrics['update_nonfinite'] when only the update was) so the caller can stop or skip.
  objective: phase 2's terms (objective_terms) over the batch's `kind` rows; None or a plain
  objective = the token-mean NLL of every response (the batch needs no `kind`).
  """
  _, trainable, frozen, merge = split_for(model, group)
  terms = objective is not None and not objective.plain

  def micro_loss(p, frozen, mb, rng, n_total, norms):
    if terms:
      return objective_loss(p, frozen, mb, rng, n_total, norms)
    loss, m = forward_loss(merge(p, frozen), mb, routing, dropout_rng=rng)
    # Token-weighted, so the sum over micro-batches equals the loss of the whole batch (exact
    # for the CE, entropy and z-loss; load balance is a product of means, so approximate).
    obj = (jnp.sum(m["per_example_nll"]) + m["aux_loss"] * m["tokens"]) / n_total
    return obj, m

  def objective_loss(p, frozen, mb, rng, n_total, norms):
    model = merge(p, frozen)
    logits, aux = forward(model, mb, routing, rng)
    per_ex, n_ex, _ = masked_ce(logits, mb["input_ids"], mb["loss_mask"])  # every row: metrics
    m = {"aux_loss": aux["aux_loss"], "tokens": jnp.sum(n_ex), "per_example_nll": per_ex,
         "per_example_tokens": n_ex}
    if "routing" in aux:
      m["routing"] = aux["routing"]
    base_logits = None
    if objective.needs_base:  # the frozen base model: no gradient reaches the router
      base_logits, _ = model(mb["input_ids"], mb["attention_mask"], routing="base")
    t = objective_terms(logits, base_logits, mb, objective, norms, aux.get("probe_score"))
    m.update({f"obj_{k}": v for k, v in t.items()})
    return t["objective"] + m["aux_loss"] * m["tokens"] / n_total, m

  def step(params, opt_state, frozen, batch, rng):
    if accum_steps == 1:
      batch = jax.tree.map(lambda x: x[None], batch)
    n_total = jnp.maximum(jnp.sum(batch["loss_mask"][..., 1:].astype(jnp.float32)), 1.0)
    norms = objective_norms(batch) if terms else None
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    rngs = jax.random.split(rng, accum_steps)

    def body(acc, xs):
      mb, r = xs
      (obj, m), g = grad_fn(params, frozen, mb, r, n_total, norms)
      acc = jax.tree.map(jnp.add, acc, (g, obj))
      return acc, m

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))
    (grads, obj), ms = jax.lax.scan(body, zeros, (batch, rngs))
    grad_norm = optax.global_norm(grads)
    grads_ok = jnp.isfinite(obj) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    update_ok = all_finite((new_params, new_opt))
    ok = grads_ok & update_ok
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    metrics = {"loss": obj, "ce": jnp.sum(ms["per_example_nll"]) / n_total,
               "aux_loss": jnp.sum(ms["aux_loss"] * ms["tokens"]) / n_total, "tokens": n_total, "grad_norm": grad_norm,
               "nonfinite": ~ok, "update_nonfinite": grads_ok & ~update_ok,
               "per_example_nll": ms["per_example_nll"].reshape(-1),
               "per_example_tokens": ms["per_example_tokens"].reshape(-1)}
    if "routing" in ms:
      metrics["routing"] = jax.tree.map(lambda x: jnp.mean(x, 0), ms["routing"])
    for k in ("obj_nll", "obj_contrast", "obj_retain", "obj_route"):  # the whole batch's terms
      if k in ms:
        metrics[k] = jnp.sum(ms[k])
    return keep(new_params, params), keep(new_opt, opt_state), metrics

  return step, trainable, frozen

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

from safemoe_jax.model import SafeMoELM, split_groups

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


def forward_loss(model: SafeMoELM, batch: dict[str, jax.Array], routing: str,
                 dropout_rng: jax.Array | None = None, fixed_weights=None
                 ) -> tuple[jax.Array, dict[str, Any]]:
  logits, aux = model(batch["input_ids"], batch["attention_mask"], routing=routing,
                      domains=batch.get("domains"), fixed_weights=fixed_weights,
                      prompt_mask=batch.get("prompt_mask"), stats_mask=batch["loss_mask"],
                      dropout_rng=dropout_rng)
  per_ex, n_ex, ce = masked_ce(logits, batch["input_ids"], batch["loss_mask"])
  loss = ce + aux["aux_loss"]
  metrics = {"loss": loss, "ce": ce, "aux_loss": aux["aux_loss"], "tokens": jnp.sum(n_ex),
             "per_example_nll": per_ex, "per_example_tokens": n_ex}
  if "routing" in aux:
    metrics["routing"] = aux["routing"]
  return loss, metrics


def split_for(model: SafeMoELM, group: str):
  """(graphdef, trainable state, frozen states, merge) for training `group`."""
  if group not in GROUPS:
    raise ValueError(f"trainable group must be one of {GROUPS}, got {group!r}")
  graphdef, router, experts, base = split_groups(model)
  if group == "router":
    return graphdef, router, (experts, base), lambda t, f: nnx.merge(graphdef, t, *f)
  return graphdef, experts, (router, base), lambda t, f: nnx.merge(graphdef, f[0], t, f[1])


def make_train_step(model: SafeMoELM, group: str, tx: optax.GradientTransformation,
                    routing: str) -> tuple[Callable, Any, Any]:
  """Returns (step, trainable, frozen). step(params, opt_state, frozen, batch, rng) is pure:
  -> (params, opt_state, metrics). Only `params` (the trainable group) is differentiated."""
  _, trainable, frozen, merge = split_for(model, group)

  def step(params, opt_state, frozen, batch, rng):
    def loss_fn(p):
      return forward_loss(merge(p, frozen), batch, routing, dropout_rng=rng)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.global_norm(grads)
    return params, opt_state, metrics

  return step, trainable, frozen

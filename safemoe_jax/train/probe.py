"""The probe router's centre (router.form=probe): the mean of its input over training prompts.

The probe reads the base model's hidden state at the last prompt token of a middle layer. That
state has a large component shared by every prompt (the chat template's tokens are the same for
all); subtracted before the probe, the probe sees what differs between prompts, and Adam does not
turn the shared part into a bias. The centre is set once before phase 2 from the phase-2 training
prompts and saved with the router (it is a router array that the step never changes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safemoe_jax.core import sharding as S
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.log import get_logger

log = get_logger(__name__)


def set_probe_center(model: SafeMoELM, batches, mesh, rules, max_rows: int) -> int:
  """Sets model.router.center to the mean probe input over up to max_rows rows of `batches`
  (this process's rows of global batches, as the trainer gets them); returns the rows used."""
  graphdef, state = nnx.split(model)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def feats(state, batch):
    z_BD = nnx.merge(graphdef, state).probe_features(batch["input_ids"],
                                                     batch["attention_mask"],
                                                     batch["prompt_mask"])
    real_B = (jnp.sum(batch["prompt_mask"], -1) > 0).astype(jnp.float32)  # not a filler row
    return jnp.sum(z_BD * real_B[:, None], 0), jnp.sum(real_B)

  with S.use_mesh_rules(mesh, rules):
    f = jax.jit(feats, out_shardings=(replicated, replicated))
    total, n = None, 0.0
    for batch in batches:
      batch = {k: batch[k] for k in ("input_ids", "attention_mask", "prompt_mask")}
      s_D, c = f(state, S.shard_batch(batch, mesh, rules=rules))
      total = s_D if total is None else total + s_D
      n += float(c)
      if n >= max_rows:
        break
  if not n:
    raise ValueError("router.form=probe: no phase-2 training prompt to centre the probe on")
  center = np.asarray(total) / n
  model.router.center[...] = jnp.asarray(center, jnp.float32)
  log.info(f"probe router: centred on {int(n)} training prompts (|centre| "
           f"{float(np.linalg.norm(center)):.3g})")
  return int(n)

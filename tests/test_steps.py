"""Train steps: gradient accumulation is exact; non-finite updates are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safemoe_jax.train.steps import make_train_step
from tests.test_experts import batch, make, randomize


def _batch(B=4):
  ids, mask, prompt, loss = batch(B=B)
  return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
          "prompt_mask": jnp.asarray(prompt), "loss_mask": jnp.asarray(loss),
          "domains": jnp.asarray(np.eye(2, dtype=np.float32)[[0, 1, 1, 0][:B]])}


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch():
  m = make(E=2, init_std=0.2, entropy_coef=0.01)
  randomize(m, 0, groups=(type(m.experts.A_q),))
  b = _batch(4)
  tx = optax.sgd(0.1)
  for group, routing in (("router", "learned"), ("experts", "oracle")):
    s1, p, f = make_train_step(m, group, tx, routing, accum_steps=1)
    s2, _, _ = make_train_step(m, group, tx, routing, accum_steps=2)
    o = tx.init(p)
    p1, _, m1 = jax.jit(s1)(p, o, f, b, jax.random.key(0))
    b2 = {k: v.reshape((2, 2) + v.shape[1:]) for k, v in b.items()}
    p2, _, m2 = jax.jit(s2)(p, o, f, b2, jax.random.key(0))
    np.testing.assert_allclose(float(m1["ce"]), float(m2["ce"]), rtol=1e-6)
    for a, c in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)


def test_nonfinite_update_is_refused_and_flagged():
  m = make(E=2, init_std=0.2)
  b = _batch(3)
  tx = optax.adam(1e-2)
  step, p, f = make_train_step(m, "router", tx, "learned")
  o = tx.init(p)
  # Poison the frozen experts: the loss becomes NaN.
  f = jax.tree.map(lambda x: x * jnp.nan, f[0]), f[1]
  p2, o2, metrics = jax.jit(step)(p, o, f, b, jax.random.key(0))
  assert bool(metrics["nonfinite"])
  for a, c in zip(jax.tree.leaves((p, o)), jax.tree.leaves((p2, o2))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))

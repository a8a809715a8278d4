"""Train steps: gradient accumulation is exact; non-finite updates are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safemoe_jax.train.steps import make_train_step, masked_ce
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


def test_masked_ce_equals_a_numpy_reference():
  """Position t's logits predict token t + 1, which counts iff loss_mask[t + 1] (the data's
  convention): per-example sums, target counts and the token mean, against plain numpy."""
  rng = np.random.default_rng(0)
  B, T, V = 3, 9, 11
  logits = rng.normal(0, 2, (B, T, V)).astype(np.float32)
  ids = rng.integers(0, V, (B, T))
  mask = rng.random((B, T)) < 0.5
  mask[:, 0], mask[:, -1] = [True, False, True], [False, True, True]  # both ends differ by row
  z = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
  want_sum, want_n = (nll * mask[:, 1:]).sum(-1), mask[:, 1:].sum(-1)
  per_ex, n_ex, mean = masked_ce(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(per_ex), want_sum, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(n_ex), want_n)
  np.testing.assert_allclose(float(mean), want_sum.sum() / want_n.sum(), rtol=1e-5)
  _, n0, mean0 = masked_ce(jnp.asarray(logits), jnp.asarray(ids), jnp.zeros((B, T), bool))
  assert float(mean0) == 0.0 and not np.asarray(n0).any()  # nothing to learn: 0, not NaN


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


# --------------------------------------------------------------------------------------------
# Phase 2's objective: target NLL, a contrast on harmful answers, a retain KL on benign rows
# --------------------------------------------------------------------------------------------

def _kind_batch():
  b = _batch(4)
  b["kind"] = jnp.asarray([0, 1, 2, 1], jnp.int32)  # target, harmful, retain, harmful
  return b


def _np_logp(logits):
  z = np.asarray(logits, np.float64)[:, :-1]
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _terms_reference(logits, base_logits, b, ocfg):
  """The three terms written out row by row, token by token in float64."""
  ids, w, kind = (np.asarray(b["input_ids"]), np.asarray(b["loss_mask"])[:, 1:],
                  np.asarray(b["kind"]))
  lp, lpb = _np_logp(logits), _np_logp(base_logits)
  nll, n_t, ul, n_h, npo, rows_h, kl, n_r = 0.0, 0, 0.0, 0, 0.0, 0, 0.0, 0
  for i in range(ids.shape[0]):
    ratio = 0.0
    for t in range(ids.shape[1] - 1):
      if not w[i, t]:
        continue
      y = ids[i, t + 1]
      if kind[i] == 0:
        nll -= lp[i, t, y]; n_t += 1
      elif kind[i] == 1:
        ul -= np.log(1 - np.exp(lp[i, t, y])); n_h += 1
        ratio += lp[i, t, y] - lpb[i, t, y]
      else:
        kl += np.sum(np.exp(lpb[i, t]) * (lpb[i, t] - lp[i, t])); n_r += 1
    if kind[i] == 1 and w[i].sum():
      npo += 2 / ocfg.beta * np.log1p(np.exp(ocfg.beta * ratio)); rows_h += 1
  contrast = {"unlikelihood": ul / n_h, "npo": npo / rows_h, "none": 0.0}[ocfg.contrast]
  retain = kl / n_r if ocfg.retain_coef else 0.0
  return {"nll": nll / n_t, "contrast": contrast, "retain": retain,
          "objective": nll / n_t + ocfg.contrast_coef * contrast + ocfg.retain_coef * retain}


def test_objective_terms_equal_a_numpy_reference():
  from safemoe_jax.core.config import ObjectiveConfig
  from safemoe_jax.train.steps import objective_norms, objective_terms
  m = make(E=2, init_std=0.3)
  randomize(m, 1)
  b = _kind_batch()
  logits, _ = m(b["input_ids"], b["attention_mask"], prompt_mask=b["prompt_mask"])
  base, _ = m(b["input_ids"], b["attention_mask"], routing="base")
  assert np.abs(np.asarray(logits) - np.asarray(base)).max() > 1e-2  # the experts matter
  for ocfg in (ObjectiveConfig(contrast="unlikelihood", contrast_coef=0.5),
               ObjectiveConfig(contrast="npo", beta=0.5, retain_coef=2.0)):
    got = objective_terms(logits, base, b, ocfg, objective_norms(b))
    want = _terms_reference(logits, base, b, ocfg)
    for k in want:
      np.testing.assert_allclose(float(got[k]), want[k], rtol=1e-4, err_msg=f"{ocfg} {k}")


def test_objective_step_trains_only_the_router_and_accumulates_exactly():
  from safemoe_jax.core.config import ObjectiveConfig
  m = make(E=2, init_std=0.2)
  randomize(m, 0, groups=(type(m.experts.A_q),))
  b = _kind_batch()
  tx = optax.sgd(0.1)
  ocfg = ObjectiveConfig(contrast="npo", beta=0.3, retain_coef=1.0)
  s1, p, f = make_train_step(m, "router", tx, "learned", objective=ocfg)
  s2, _, _ = make_train_step(m, "router", tx, "learned", accum_steps=2, objective=ocfg)
  o = tx.init(p)
  p1, _, m1 = jax.jit(s1)(p, o, f, b, jax.random.key(0))
  b2 = {k: v.reshape((2, 2) + v.shape[1:]) for k, v in b.items()}
  p2, _, m2 = jax.jit(s2)(p, o, f, b2, jax.random.key(0))
  for k in ("loss", "obj_nll", "obj_contrast", "obj_retain"):
    np.testing.assert_allclose(float(m1[k]), float(m2[k]), rtol=1e-5, err_msg=k)
  assert float(m1["obj_contrast"]) > 0 and float(m1["obj_retain"]) > 0
  moved = max(float(jnp.abs(a - c).max()) for a, c in zip(jax.tree.leaves(p1), jax.tree.leaves(p)))
  assert moved > 1e-4
  for a, c in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-7)


def test_plain_objective_is_the_paper_objective_bit_for_bit():
  """ObjectiveConfig() (no contrast, no retain) is exactly the token-mean NLL step."""
  from safemoe_jax.core.config import ObjectiveConfig
  m = make(E=2, init_std=0.2)
  randomize(m, 0, groups=(type(m.experts.A_q),))
  b = _batch(4)
  tx = optax.adam(1e-2)
  s0, p, f = make_train_step(m, "router", tx, "learned")
  s1, _, _ = make_train_step(m, "router", tx, "learned", objective=ObjectiveConfig())
  o = tx.init(p)
  a, _, _ = jax.jit(s0)(p, o, f, b, jax.random.key(0))
  c, _, _ = jax.jit(s1)(p, o, f, b, jax.random.key(0))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_npo_pushes_harmful_answers_below_the_base_model():
  """Trained on harmful rows only, NPO lowers their likelihood relative to the base model."""
  from safemoe_jax.core.config import ObjectiveConfig
  from safemoe_jax.train.steps import objective_norms, token_logp
  m = make(E=2)
  randomize(m, 0, groups=(type(m.experts.A_q),), std=0.6)
  b = _batch(4)
  b["kind"] = jnp.ones((4,), jnp.int32)
  ocfg = ObjectiveConfig(contrast="npo", beta=0.5)
  tx = optax.adam(3e-2)
  step, p, f = make_train_step(m, "router", tx, "learned", objective=ocfg)
  step = jax.jit(step)
  o = tx.init(p)
  first = None
  for i in range(15):
    p, o, mt = step(p, o, f, b, jax.random.key(i))
    first = float(mt["obj_contrast"]) if first is None else first
  assert float(mt["obj_contrast"]) < first - 0.1, (first, float(mt["obj_contrast"]))

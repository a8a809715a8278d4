"""Generation: the jitted KV-cache loop equals step-by-step full forward passes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safemoe_jax.config import RouterConfig
from safemoe_jax.generate import generate, left_pad, sample_logits
from tests.test_experts import make, randomize


def _greedy_reference(model, prompts, n, routing, **kw):
  """Re-run the full forward pass on the growing sequence; no cache, no padding."""
  outs = []
  for p in prompts:
    seq = list(p)
    for _ in range(n):
      ids = jnp.asarray([seq], jnp.int32)
      pm = jnp.asarray([[1] * len(p) + [0] * (len(seq) - len(p))], jnp.int32)
      logits, _ = model(ids, routing=routing, prompt_mask=pm, **kw)
      seq.append(int(jnp.argmax(logits[0, -1])))
    outs.append(seq[len(p):])
  return outs


def test_cached_greedy_generation_equals_full_forward_with_live_routing():
  for granularity in ("per_token", "per_sequence"):
    m = make(E=3, targets=("q", "v", "up"), init_std=0.5, granularity=granularity)
    randomize(m, 1)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26]]
    ids, mask = left_pad(prompts, pad_id=0, bucket=8)
    res = generate(m, ids, mask, max_new_tokens=6, eos_ids=[-1], pad_id=0, return_gates=True)
    ref = _greedy_reference(m, prompts, 6, "learned")
    assert res["tokens"].tolist() == ref, granularity
    assert res["gates"].shape == (6, m.cfg.num_layers, 3, 3)
    assert np.abs(res["gates"]).sum() > 0


def test_generation_stops_at_eos_and_pads_after():
  m = make(E=0)
  prompts = [[1, 2, 3], [4, 5, 6]]
  ids, mask = left_pad(prompts, pad_id=0, bucket=4)
  free = generate(m, ids, mask, max_new_tokens=5, eos_ids=[-1], pad_id=0)["tokens"]
  eos = int(free[0, 1])  # make row 0's second token the stop token
  # sensitivity guard: row 1 emits that token later than row 0 (or never), so it must go on
  assert eos not in free[0, :1].tolist() and eos not in free[1, :2].tolist(), free
  res = generate(m, ids, mask, max_new_tokens=5, eos_ids=[eos], pad_id=0)
  for b in range(2):  # each row: its free run up to and including its own stop token, then pad
    row = free[b].tolist()
    n = row.index(eos) + 1 if eos in row else len(row)
    assert res["tokens"][b].tolist() == row[:n] + [0] * (len(row) - n), (b, free, res["tokens"])
  assert res["tokens"][0].tolist()[2:] == [0, 0, 0]


def test_fixed_routing_modes_generate():
  m = make(E=2, targets=("q",))
  randomize(m, 2)
  ids, mask = left_pad([[3, 4, 5]], pad_id=0, bucket=4)
  for mode, kw in (("base", {}), ("uniform", {}), ("negated", {}),
                   ("fixed", {"fixed_weights": np.array([1.0, -0.5], np.float32)}),
                   ("oracle", {"domains": np.array([[0.0, 1.0]], np.float32)})):
    res = generate(m, ids, mask, max_new_tokens=4, eos_ids=[-1], pad_id=0, routing=mode, **kw)
    ref = _greedy_reference(m, [[3, 4, 5]], 4, mode, **{k: jnp.asarray(v) for k, v in kw.items()})
    assert res["tokens"].tolist() == ref, mode


def test_top_p_sampling_stays_in_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  toks = np.array([int(sample_logits(logits, k, 1.0, 0.7)[0]) for k in keys[:200]])
  assert set(toks) <= {0, 1} and {0, 1} <= set(toks)
  assert int(sample_logits(logits, keys[0], 0.0, 0.9)[0]) == 0

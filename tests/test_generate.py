"""Generation: the jitted KV-cache loop equals step-by-step full forward passes."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from safemoe_jax.core.config import RouterConfig
from safemoe_jax.infer.generate import generate, sample_logits
from safemoe_jax.io.tokenizer import left_pad
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


@pytest.mark.slow
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


def test_shrinking_generation_keeps_every_rows_answer(monkeypatch):
  """Decoding in segments with the batch halved as rows stop equals one plain generate() call
  token for token, the answers of rows that stopped before a halving included."""
  from safemoe_jax.infer import generate as G
  shrunk, take = [], G._take_rows
  monkeypatch.setattr(G, "_take_rows", lambda s, sel: shrunk.append(len(sel)) or take(s, sel))
  m = make(E=0)
  prompts = [[1 + i, 2 + 3 * i, 3 + 5 * i] for i in range(8)]
  ids, mask = left_pad(prompts, pad_id=0, bucket=4)
  n = 8
  free = generate(m, ids, mask, max_new_tokens=n, eos_ids=[-1], pad_id=0)["tokens"]
  first = collections.Counter(free[:, :2].ravel().tolist())
  eos = sorted(t for t, _ in first.most_common(3))  # many rows stop early, at different steps
  want = generate(m, ids, mask, max_new_tokens=n, eos_ids=eos, pad_id=0)
  got = G.generate_shrinking(m, ids, mask, max_new_tokens=n, eos_ids=eos, pad_id=0, segment=1,
                             min_rows=2)
  stop = [next((j for j, t in enumerate(r) if t in eos), n) for r in want["tokens"].tolist()]
  assert min(stop) < 2 and len(set(stop)) >= 3, stop  # the halving has stopped rows to drop
  assert shrunk, "no batch was halved"
  np.testing.assert_array_equal(got["tokens"], want["tokens"])


@pytest.mark.slow
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


SYSTEMS = (("base", {}), ("learned", {}), ("uniform", {}), ("negated", {}),
           ("fixed", {"fixed_weights": np.array([1.0, -0.5, 0.25], np.float32)}), ("oracle", {}))
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26], [30, 31, 32],
           [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51], [60]]
DOMAINS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 0, 0], [0, 1, 1]], np.float32)


def _per_system(m, n, eos):
  """Today's evaluation path: one generation per system over all its prompts (greedy)."""
  out = {}
  for mode, kw in SYSTEMS:
    ids, mask = left_pad(PROMPTS, pad_id=0, bucket=8)
    if mode == "oracle":
      kw = {"domains": DOMAINS}
    res = generate(m, ids, mask, max_new_tokens=n, eos_ids=eos, pad_id=0, routing=mode,
                   return_gates=mode == "learned", **kw)
    for b in range(len(PROMPTS)):
      row = res["tokens"][b].tolist()
      k = next((j + 1 for j, t in enumerate(row) if t in eos), n)
      out[mode, b] = (row[:k], res["gates"][:k, :, b] if mode == "learned" else None)
  return out


@pytest.mark.slow
def test_systems_mixed_in_one_batch_equal_per_system_generation(monkeypatch):
  """Every routing system in one loop, rows of all systems in shuffled, length-sorted batches
  with per-row gates, gives each system's own greedy generation token for token; rows stop at
  their own stop token at different steps."""
  from safemoe_jax.infer import generate as G
  from safemoe_jax.core.experts import gate_row
  from safemoe_jax.infer.generate import generate_many
  shrunk, take = [], G._take_rows
  monkeypatch.setattr(G, "_take_rows", lambda s, sel: shrunk.append(len(sel)) or take(s, sel))
  n = 7
  for granularity, top_k in (("per_token", 2), ("per_sequence", 0)):
    m = make(E=3, targets=("q", "v", "o", "up"), init_std=0.5, granularity=granularity,
             top_k=top_k)
    randomize(m, 3)
    free = _per_system(m, n, [-1])
    # Stop tokens: the three commonest of the free-running answers' first three tokens, so
    # rows now stop at different steps, many of them early.
    first = collections.Counter(t for toks, _ in free.values() for t in toks[:3])
    eos = sorted(t for t, _ in first.most_common(3))
    ref = _per_system(m, n, eos)
    lengths = {len(t) for t, _ in ref.values()}
    assert len(lengths) >= 3 and n in lengths, lengths
    rows = [(mode, kw, b) for mode, kw in SYSTEMS for b in range(len(PROMPTS))]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    gates = [gate_row(mode, 3, weights_E=kw.get("fixed_weights"),
                      domains_E=DOMAINS[b] if mode == "oracle" else None) for mode, kw, b in rows]
    ways = [dict(batch_size=8, bucket=4)]
    if granularity == "per_token":  # also decoding in segments, the batch halved as rows stop
      ways.append(dict(batch_size=16, bucket=8, segment=1, min_rows=2))
    for way in ways:
      got = generate_many(m, [PROMPTS[b] for _, _, b in rows], max_new_tokens=n, eos_ids=eos,
                          pad_id=0, gates=gates, return_gates=True, **way)
      for (mode, _, b), g in zip(rows, got):
        want, want_gates = ref[mode, b]
        assert g["tokens"] == want, (granularity, top_k, way, mode, b)
        if mode == "learned":  # the learned rows' recorded routing equals their own run's, up
          # to the float reordering of a different batch shape (tokens above are exact)
          np.testing.assert_allclose(g["gates"], want_gates, rtol=1e-5, atol=1e-6)
        elif mode == "base":
          assert not np.any(g["gates"])
  assert shrunk, "no batch was halved: the segmented decoding went untested"


def test_mixed_routing_needs_a_gate_spec_of_the_batch():
  m = make(E=2, targets=("q",))
  ids, mask = left_pad([[3, 4, 5]], pad_id=0, bucket=4)
  with pytest.raises(ValueError, match="gate_spec"):
    m(jnp.asarray(ids), jnp.asarray(mask), routing="mixed")


def test_schedule_covers_every_row_once_in_length_sorted_buckets():
  from safemoe_jax.infer.generate import batch_rows, schedule
  rng = np.random.default_rng(0)
  lens = list(rng.integers(30, 60, 180)) + list(rng.integers(80, 270, 23))  # a long tail
  B = batch_rows(len(lens), 64)
  assert B == 56  # 203 rows: 4 batches, split evenly (51 each, rounded up to a multiple of 8)
  batches = schedule(lens, B, 16)
  assert sorted(i for idx, _ in batches for i in idx) == list(range(203))
  for idx, P in batches:
    real = sum(lens[i] for i in idx)
    assert len(idx) <= B and P % 16 == 0 and max(lens[i] for i in idx) <= P
    assert P * len(idx) - real <= 16 * len(idx) + 0.5 * real  # padding stays bounded
  # Length-sorted: each batch's rows are no longer than the next batch's.
  for (a, _), (b, _) in zip(batches, batches[1:]):
    assert max(lens[i] for i in a) <= min(lens[i] for i in b)
  # The short prompts fill whole batches; the long tail shares smaller ones of its own.
  assert [len(idx) for idx, _ in batches[:3]] == [56, 56, 56]
  assert all(min(lens[i] for i in idx) >= 80 for idx, _ in batches[4:]) and len(batches) > 4
  assert [batch_rows(n, 64) for n in (5, 24, 64, 65)] == [8, 24, 64, 40]

"""The Llama-family model: parity with PyTorch transformers, KV cache, remat, the real model."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from safemoe_jax.io import weights
from safemoe_jax.core.model import SafeMoELM, rope_inv_freq
from tests import prereq


def _padded_batch(V, B=3, T=24, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, V, (B, T))
  mask = np.ones((B, T), np.int64)
  mask[1, :5] = 0  # left padding (generation)
  mask[2, -6:] = 0  # right padding (training)
  return ids, mask


def _load(ckpt, **kw):
  cfg, params = weights.load_hf_checkpoint(ckpt.path)
  model = SafeMoELM(dataclasses.replace(cfg, **kw), rngs=nnx.Rngs(0))
  model.load_base(params)
  return model


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_llama_tied", "tiny_qwen2"])
def test_logits_match_transformers(name, request):
  import torch
  ckpt = request.getfixturevalue(name)
  model = _load(ckpt)
  ids, mask = _padded_batch(model.cfg.vocab_size)
  pos = np.maximum(mask.cumsum(-1) - 1, 0)  # HF needs explicit positions for left padding
  with torch.no_grad():
    ref = ckpt.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos)).logits.numpy()
  out, _ = model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  err = np.abs(np.asarray(out) - ref)[mask.astype(bool)].max()
  assert err <= 1e-4, err


# Llama-3.1 (8B: head_dim 128, factor 8) and Llama-3.2 (1B/3B: head_dim 64, factor 32): both put
# several frequencies inside the smoothing band (wavelengths between 8192/4 and 8192), which the
# tiny fixtures' wavelengths (6.3 and 32.4 at original context 32) straddle without touching.
@pytest.mark.parametrize("head_dim,factor", [(128, 8.0), (64, 32.0)], ids=["llama3.1", "llama3.2"])
def test_llama3_rope_inv_freq_equals_transformers_initialisation(head_dim, factor):
  torch = prereq.require_module("torch")
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
  hf = LlamaConfig(hidden_size=32 * head_dim, num_attention_heads=32, num_key_value_heads=8,
                   head_dim=head_dim, intermediate_size=64, num_hidden_layers=1, vocab_size=16,
                   max_position_embeddings=131072, rope_parameters=dict(rope))
  want = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))[0].numpy()
  # Through our reader of config.json, so the test holds whatever type rope_scaling takes.
  got = rope_inv_freq(weights.config_from_hf(hf.to_dict()))
  wavelen = 2 * np.pi / (1.0 / 500000.0 ** (np.arange(0, head_dim, 2) / head_dim))
  assert ((wavelen > 8192 / 4) & (wavelen < 8192)).sum() >= 3  # the band is exercised
  assert got.shape == want.shape == (head_dim // 2,)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_cached_decoding_equals_full_forward(tiny_llama):
  model = _load(tiny_llama)
  ids, mask = _padded_batch(model.cfg.vocab_size)
  ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
  full, _ = model(ids, mask)
  cache = model.init_cache(ids.shape[0], 32)
  P = 10
  logits, aux = model(ids[:, :P], mask[:, :P], cache=cache)
  valid = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(logits)[valid[:, :P]], np.asarray(full)[:, :P][
      valid[:, :P]], atol=1e-5)
  cache = aux["cache"]
  step = jax.jit(lambda i, m, c: model(i, m, cache=c))
  for t in range(P, ids.shape[1]):
    logits, aux = step(ids[:, t:t + 1], mask[:, t:t + 1], cache)
    cache = aux["cache"]
    rows = valid[:, t]
    np.testing.assert_allclose(np.asarray(logits[:, 0])[rows], np.asarray(full[:, t])[rows],
                               atol=1e-5)


def test_remat_gives_same_logits_and_gradients(tiny_qwen2):
  m0, m1 = _load(tiny_qwen2), _load(tiny_qwen2, remat=True)
  ids, mask = _padded_batch(m0.cfg.vocab_size)

  def grads(m):
    g, st = nnx.split(m)
    f = lambda s: jnp.mean(nnx.merge(g, s)(jnp.asarray(ids), jnp.asarray(mask))[0] ** 2)
    return jax.grad(f)(st)

  for a, b in zip(jax.tree.leaves(grads(m0)), jax.tree.leaves(grads(m1))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_bfloat16_policy_runs_and_stays_close(tiny_llama, monkeypatch):
  # Sharpen attention (q and k x10) so the logits depend strongly on position; at init scale the
  # tiny model barely attends by position and dropping RoPE moved its logits by only 0.007.
  def load(**kw):
    cfg, params = weights.load_hf_checkpoint(tiny_llama.path)
    params = dict(params, **{k: 10 * params[k] for k in ("layers.q", "layers.k")})
    model = SafeMoELM(dataclasses.replace(cfg, **kw), rngs=nnx.Rngs(0))
    model.load_base(params)
    return model

  m32 = load()
  m16 = load(param_dtype="bfloat16", compute_dtype="bfloat16")
  assert m16.layers.q[...].dtype == jnp.bfloat16
  ids, mask = _padded_batch(m32.cfg.vocab_size)
  run = lambda m: np.asarray(m(jnp.asarray(ids), jnp.asarray(mask))[0])
  a, b = run(m32), m16(jnp.asarray(ids), jnp.asarray(mask))[0]
  assert b.dtype == jnp.float32  # logits are computed in float32
  valid = mask.astype(bool)
  tol = 0.05  # measured bfloat16 error 0.014
  assert np.abs(a - np.asarray(b))[valid].max() < tol
  # sensitivity guard: without RoPE the float32 logits move by far more than the tolerance
  from safemoe_jax.core import model as model_lib
  monkeypatch.setattr(model_lib, "apply_rope", lambda x_BTHD, pos_BT, inv_freq: x_BTHD)
  assert np.abs(a - run(m32))[valid].max() > 10 * tol


def test_too_long_sequence_and_mismatched_checkpoint_are_clear_errors(tiny_llama):
  model = _load(tiny_llama)
  with pytest.raises(ValueError, match="longer than the model's context"):
    model(jnp.zeros((1, model.cfg.max_position_embeddings + 1), jnp.int32))
  _, params = weights.load_hf_checkpoint(tiny_llama.path)
  params["layers.q"] = params["layers.q"][:, :, :8]
  with pytest.raises(ValueError, match="layers.q"):
    model.load_base(params)


@pytest.mark.slow
def test_embedded_smollm2_knows_paris(smollm2_gguf):
  from safemoe_jax.infer.generate import generate
  from safemoe_jax.io.tokenizer import left_pad
  from safemoe_jax.io.tokenizer import tokenizer_from_gguf
  cfg, params, meta = weights.load_gguf(smollm2_gguf)
  model = SafeMoELM(cfg, rngs=nnx.Rngs(0))
  model.load_base(params)
  tok = tokenizer_from_gguf(meta)
  ids, mask = left_pad([tok("The capital of France is")["input_ids"]], tok.pad_token_id, 8)
  res = generate(model, ids, mask, max_new_tokens=8, eos_ids=[tok.eos_token_id],
                 pad_id=tok.pad_token_id)
  text = tok.decode(res["tokens"][0], skip_special_tokens=True)
  assert "Paris" in text, text

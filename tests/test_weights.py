"""HF safetensors and GGUF loaders against the PyTorch state dict and the real SmolLM2 GGUF."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from safemoe_jax.core.config import ModelConfig
from safemoe_jax.io.weights import (WeightsError, check_params, config_from_hf, expected_shapes,
                                 llama3_rope_factors, load_gguf, load_hf_checkpoint)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # as tiny_llama
_LAYER = {"attn_norm": "input_layernorm.weight", "q": "self_attn.q_proj.weight",
          "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
          "o": "self_attn.o_proj.weight", "q_bias": "self_attn.q_proj.bias",
          "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
          "mlp_norm": "post_attention_layernorm.weight", "gate": "mlp.gate_proj.weight",
          "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"}


def _reference(state: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our layout built straight from a torch state dict: transpose Linear weights, stack layers."""
  ref = {"embed": state["model.embed_tokens.weight"], "final_norm": state["model.norm.weight"]}
  if not cfg.tie_embeddings:
    ref["lm_head"] = state["lm_head.weight"].T
  for k, hf in _LAYER.items():
    if k.endswith("bias") and not cfg.qkv_bias:
      continue
    ws = [state[f"model.layers.{i}.{hf}"] for i in range(cfg.num_layers)]
    ref[f"layers.{k}"] = np.stack([w.T if w.ndim == 2 else w for w in ws])
  return ref


def _assert_exact(params: dict, ref: dict) -> None:
  assert sorted(params) == sorted(ref)
  for k in ref:
    assert params[k].dtype == ref[k].dtype and np.array_equal(params[k], ref[k]), k


def _copy(ck, dst: Path) -> Path:
  shutil.copytree(ck.path, dst)
  return dst


def test_llama_exact(tiny_llama):
  cfg, params = load_hf_checkpoint(tiny_llama.path)
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 64, 128)
  assert cfg.vocab_size == 256
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
  assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == LLAMA3_ROPE
  assert cfg.max_position_embeddings == 128 and cfg.rms_norm_eps == 1e-5
  assert not cfg.tie_embeddings and not cfg.qkv_bias
  check_params(cfg, params)
  _assert_exact(params, _reference(tiny_llama.state, cfg))
  assert params["layers.q"].shape == (2, 64, 64) and params["layers.k"].shape == (2, 64, 32)


def test_qwen2_exact_with_qkv_bias(tiny_qwen2):
  cfg, params = load_hf_checkpoint(tiny_qwen2.path)
  assert cfg.qkv_bias and cfg.rope_theta == 1e6 and cfg.rope_scaling is None
  assert params["layers.k_bias"].shape == (2, 32)
  _assert_exact(params, _reference(tiny_qwen2.state, cfg))


def test_tied_ignores_lm_head(tiny_llama_tied, tmp_path):
  cfg, params = load_hf_checkpoint(tiny_llama_tied.path)
  assert cfg.tie_embeddings and "lm_head" not in params
  _assert_exact(params, _reference(tiny_llama_tied.state, cfg))
  # A tied checkpoint that still stores lm_head.weight loads the same (the copy is ignored).
  from safetensors.numpy import load_file, save_file
  d = _copy(tiny_llama_tied, tmp_path / "with_head")
  sd = load_file(d / "model.safetensors")
  assert "lm_head.weight" not in sd
  save_file({**sd, "lm_head.weight": np.ones((256, 64), np.float32)}, d / "model.safetensors")
  _assert_exact(load_hf_checkpoint(d)[1], params)


def test_sharded_loads_identically(tiny_llama, tmp_path):
  tiny_llama.model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  shards = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
  assert len(set(shards.values())) > 1 and not (tmp_path / "model.safetensors").exists()
  cfg, params = load_hf_checkpoint(tmp_path)
  _assert_exact(params, load_hf_checkpoint(tiny_llama.path)[1])


def test_bfloat16_checkpoint(tiny_qwen2, tmp_path):
  import torch
  from transformers import Qwen2ForCausalLM
  m = Qwen2ForCausalLM(tiny_qwen2.model.config)
  m.load_state_dict(tiny_qwen2.model.state_dict())
  m.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
  state = {k: v.float().numpy() for k, v in m.state_dict().items()}  # bf16 values, exactly
  cfg, params = load_hf_checkpoint(tmp_path)  # upcast to float32 on read
  _assert_exact(params, _reference(state, cfg))
  _, p16 = load_hf_checkpoint(tmp_path, dtype="bfloat16")
  assert p16["layers.q"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(p16["layers.q"].astype(np.float32), params["layers.q"])


def test_shape_mismatch_names_the_tensor(tiny_llama, tmp_path):
  d = _copy(tiny_llama, tmp_path / "ck")
  c = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**c, "num_key_value_heads": 4}))
  with pytest.raises(WeightsError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape "
                     r"\(32, 64\).*expects \(64, 64\).*does not match"):
    load_hf_checkpoint(d)


@pytest.mark.parametrize("change, message", [
    ("drop", r"model\.layers\.1\.mlp\.up_proj\.weight \(our layers\.up\) is missing"),
    ("add", r"ignore: \['model\.layers\.0\.mlp\.up_proj\.bias'\]"),
])
def test_missing_or_unexpected_tensor(tiny_llama, tmp_path, change, message):
  from safetensors.numpy import load_file, save_file
  d = _copy(tiny_llama, tmp_path / "ck")
  sd = load_file(d / "model.safetensors")
  if change == "drop":
    del sd["model.layers.1.mlp.up_proj.weight"]
  else:
    sd["model.layers.0.mlp.up_proj.bias"] = np.zeros(128, np.float32)
  save_file(sd, d / "model.safetensors")
  with pytest.raises(WeightsError, match=message):
    load_hf_checkpoint(d)


def test_pickle_only_folder_is_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **_hf_dict()}))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  with pytest.raises(WeightsError, match=r"(?s)pickle is refused.*safe_serialization=True"):
    load_hf_checkpoint(tmp_path)
  with pytest.raises(WeightsError, match="config.json not found"):
    load_hf_checkpoint(tmp_path / "nowhere")


def test_check_params_reports_expected_and_found():
  cfg = ModelConfig()
  params = {k: np.zeros(s, np.float32) for k, s in expected_shapes(cfg).items()}
  check_params(cfg, params)
  params["layers.v"] = np.zeros((2, 64, 64), np.float32)
  del params["final_norm"]
  params["extra"] = np.zeros(3)
  with pytest.raises(WeightsError) as e:
    check_params(cfg, params)
  msg = str(e.value)
  assert "does not match the model config" in msg
  assert "layers.v: shape (2, 64, 64), expected (2, 64, 32)" in msg
  assert "final_norm: missing (expected shape (64,))" in msg and "extra: unexpected" in msg


def _hf_dict(**kw) -> dict:
  return {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
          "num_hidden_layers": 2, "vocab_size": 256, **kw}


def test_config_from_hf_variants():
  c = config_from_hf({"model_type": "llama", **_hf_dict()})  # head_dim and kv heads absent
  assert (c.head_dim, c.num_kv_heads, c.rope_theta, c.rope_scaling) == (16, 4, 10000.0, None)
  # transformers < 5: top-level rope_theta, rope_scaling with "type"
  c = config_from_hf({"model_type": "llama", "rope_theta": 5e5, "tie_word_embeddings": True,
                      "rope_scaling": {**LLAMA3_ROPE, "type": "llama3"}, **_hf_dict()})
  assert c.rope_theta == 5e5 and c.rope_scaling == LLAMA3_ROPE and c.tie_embeddings
  c = config_from_hf({"model_type": "qwen2", "head_dim": None, **_hf_dict()},
                     param_dtype="bfloat16")
  assert c.qkv_bias and c.head_dim == 16 and c.param_dtype == "bfloat16"
  with pytest.raises(WeightsError, match=r"'gpt2' is not supported; supported: \['llama', "
                     r"'mistral', 'qwen2'\]"):
    config_from_hf({"model_type": "gpt2", **_hf_dict()})
  with pytest.raises(WeightsError, match="'yarn' is not supported"):
    config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                    **_hf_dict()})
  with pytest.raises(WeightsError, match=r"unknown ModelConfig override\(s\) \['heads'\]"):
    config_from_hf({"model_type": "llama", **_hf_dict()}, heads=3)


def test_mistral_sliding_window():
  with pytest.warns(UserWarning, match="sliding_window=64 < max_position_embeddings=128"):
    config_from_hf({"model_type": "mistral", "sliding_window": 64,
                    "max_position_embeddings": 128, **_hf_dict()})
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for sw in (None, 128):
      config_from_hf({"model_type": "mistral", "sliding_window": sw,
                      "max_position_embeddings": 128, **_hf_dict()})


def test_llama3_rope_factors_match_transformers():
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # Llama-3.1
  hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                   max_position_embeddings=131072, rope_scaling=scaling)
  inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, None)
  base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
  got = llama3_rope_factors(scaling, 500000.0, 128)
  assert ((got > 1.0) & (got < 8.0)).sum() >= 3  # the smooth band is exercised
  np.testing.assert_allclose(got, base / inv_freq.double().numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's convert_hf_to_gguf.py Q/K permutation (HF rotate-half -> interleaved)."""
  hd = w.shape[0] // n_head
  return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(ck, path: Path, arch: str = "llama", rope_freqs: bool = False) -> Path:
  """A float32 GGUF of a tiny HF checkpoint, written the way llama.cpp's converter does."""
  import gguf
  c, S = ck.model.config, ck.state
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_tensor("token_embd.weight", S["model.embed_tokens.weight"])
  w.add_tensor("output_norm.weight", S["model.norm.weight"])
  if not c.tie_word_embeddings:
    w.add_tensor("output.weight", S["lm_head.weight"])
  if rope_freqs:  # what llama.cpp stores for Llama-3.1 scaling: inv_freq / scaled inv_freq
    hd = c.head_dim
    base = 1.0 / c.rope_parameters["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    w.add_tensor("rope_freqs.weight",
                 (base / ck.model.model.rotary_emb.inv_freq.double().numpy()).astype(np.float32))
  names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
           "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
           "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
  for i in range(c.num_hidden_layers):
    for g, hf in names.items():
      for kind in ("weight", "bias"):
        if (t := S.get(f"model.layers.{i}.{hf}.{kind}")) is None:
          continue
        if arch == "llama" and g in ("attn_q", "attn_k"):  # qwen2 is stored unpermuted
          t = _permute(t, c.num_attention_heads if g == "attn_q" else c.num_key_value_heads)
        w.add_tensor(f"blk.{i}.{g}.{kind}", t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def test_gguf_matches_hf_tied(tiny_llama_tied, tmp_path):
  cfg, params, md = load_gguf(_write_gguf(tiny_llama_tied, tmp_path / "t.gguf"))
  hf_cfg, hf_params = load_hf_checkpoint(tiny_llama_tied.path)
  assert cfg == hf_cfg and md["general.architecture"] == "llama"
  _assert_exact(params, hf_params)


def test_gguf_untied_with_llama3_rope(tiny_llama, tmp_path):
  path = _write_gguf(tiny_llama, tmp_path / "t.gguf", rope_freqs=True)
  with pytest.raises(WeightsError, match=r"scaled RoPE \(rope_freqs.weight\).*pass them"):
    load_gguf(path)
  with pytest.raises(WeightsError, match="gives RoPE factors"):
    load_gguf(path, rope_scaling={**LLAMA3_ROPE, "factor": 4.0})
  cfg, params, _ = load_gguf(path, rope_scaling=LLAMA3_ROPE)
  hf_cfg, hf_params = load_hf_checkpoint(tiny_llama.path)
  assert cfg == hf_cfg and not cfg.tie_embeddings
  _assert_exact(params, hf_params)


def test_gguf_qwen2_with_qkv_bias_matches_hf(tiny_qwen2, tmp_path):
  """qwen2 GGUFs keep Q/K in HF's layout (llama.cpp permutes llama only) and carry q/k/v biases."""
  cfg, params, md = load_gguf(_write_gguf(tiny_qwen2, tmp_path / "q.gguf", arch="qwen2"))
  hf_cfg, hf_params = load_hf_checkpoint(tiny_qwen2.path)
  assert md["general.architecture"] == "qwen2" and cfg.qkv_bias
  assert dataclasses.replace(cfg, max_position_embeddings=0) == dataclasses.replace(
      hf_cfg, max_position_embeddings=0)
  _assert_exact(params, hf_params)


def test_gguf_other_arch_refused(tiny_llama_tied, tmp_path):
  with pytest.raises(WeightsError, match=r"architecture 'gemma' is not supported"):
    load_gguf(_write_gguf(tiny_llama_tied, tmp_path / "q.gguf", arch="gemma"))
  with pytest.raises(WeightsError, match="not found"):
    load_gguf(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_gguf_smollm2(smollm2_gguf):
  cfg, params, md = load_gguf(smollm2_gguf)
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
  assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.vocab_size) == (100000.0, 1e-5, 49152)
  assert cfg.tie_embeddings and not cfg.qkv_bias and cfg.rope_scaling is None
  assert cfg.max_position_embeddings == 8192
  check_params(cfg, params)
  assert all(np.isfinite(p).all() for p in params.values())
  assert len(md["tokenizer.ggml.tokens"]) == 49152 and "im_start" in md["tokenizer.chat_template"]


@pytest.mark.slow
def test_gguf_matches_peer_hf_folder(smollm2_gguf, peer_smollm2):
  """The peer folder was converted by transformers' own GGUF loader (its own Q/K un-permute)."""
  cfg, params, _ = load_gguf(smollm2_gguf)
  ref_cfg, ref = load_hf_checkpoint(peer_smollm2)
  assert cfg == dataclasses.replace(ref_cfg, rms_norm_eps=1e-5)  # HF kept float32 9.9999997e-06
  _assert_exact(params, ref)

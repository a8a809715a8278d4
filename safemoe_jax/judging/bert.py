"""BERT encoder (all-MiniLM-L6-v2 and other HF `BertModel`s) in Flax NNX, for the learned judge.

Post-LayerNorm BERT: embeddings (word + position + token type) -> LayerNorm -> L layers of
  h = LN(h + Wo MHA(h)),  h = LN(h + W2 gelu(W1 h))
with exact (erf) GELU. Layers are stacked on a leading axis and run with `jax.lax.scan`, as in
model.py. Weights are stored (in, out). Only safetensors and JSON are read.

Names: B batch, T tokens, D width, H heads, Dh head dim, F MLP width, L layers, V vocab, P
positions, C classes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from safemoe_jax.errors import SafeMoEError


class BertError(SafeMoEError, ValueError):
  """A BERT checkpoint or tokenizer cannot be read or does not match its config."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden_size: int = 384  # D
  num_layers: int = 6  # L
  num_heads: int = 12  # H
  intermediate_size: int = 1536  # F
  max_position: int = 512  # P
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf(cls, d: dict) -> "BertConfig":
    if d.get("model_type", "bert") != "bert" or d.get("hidden_act", "gelu") != "gelu" or \
        d.get("position_embedding_type", "absolute") != "absolute":
      raise BertError(f"only HF BertModel checkpoints with gelu and absolute positions are "
                      f"supported; config has model_type={d.get('model_type')!r}, "
                      f"hidden_act={d.get('hidden_act')!r}")
    return cls(d["vocab_size"], d["hidden_size"], d["num_hidden_layers"],
               d["num_attention_heads"], d["intermediate_size"], d["max_position_embeddings"],
               d.get("type_vocab_size", 2), d.get("layer_norm_eps", 1e-12))


# our key -> (HF key with {i} for the layer, transpose)
_HF = {"word_emb": ("embeddings.word_embeddings.weight", False),
       "pos_emb": ("embeddings.position_embeddings.weight", False),
       "type_emb": ("embeddings.token_type_embeddings.weight", False),
       "emb_ln_w": ("embeddings.LayerNorm.weight", False),
       "emb_ln_b": ("embeddings.LayerNorm.bias", False)}
_HF_LAYER = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"}
_HF_LN = {"ln1": "attention.output.LayerNorm", "ln2": "output.LayerNorm"}


def shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
  L, D, F = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size
  s = {"word_emb": (cfg.vocab_size, D), "pos_emb": (cfg.max_position, D),
       "type_emb": (cfg.type_vocab_size, D), "emb_ln_w": (D,), "emb_ln_b": (D,)}
  for n, (i, o) in {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "up": (D, F),
                    "down": (F, D)}.items():
    s[f"layers.{n}"] = (L, i, o)
    s[f"layers.{n}_b"] = (L, o)
  for n in _HF_LN:
    s[f"layers.{n}_w"] = s[f"layers.{n}_b"] = (L, D)
  return s


def load_hf(path: str | Path) -> tuple[BertConfig, dict[str, np.ndarray]]:
  """(config, params in our layout) from an HF folder with config.json + model.safetensors."""
  path = Path(path)
  if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
    raise BertError(f"{path} must hold config.json and model.safetensors (an HF BertModel "
                    f"folder)")
  cfg = BertConfig.from_hf(json.loads((path / "config.json").read_text()))
  w = load_file(str(path / "model.safetensors"))
  w = {k.removeprefix("bert."): v for k, v in w.items()}
  get = lambda k: w[k] if k in w else _missing(path, k, w)
  p = {k: get(hk) for k, (hk, _) in _HF.items()}
  L = cfg.num_layers
  for n, hk in _HF_LAYER.items():
    p[f"layers.{n}"] = np.stack([get(f"encoder.layer.{i}.{hk}.weight").T for i in range(L)])
    p[f"layers.{n}_b"] = np.stack([get(f"encoder.layer.{i}.{hk}.bias") for i in range(L)])
  for n, hk in _HF_LN.items():
    p[f"layers.{n}_w"] = np.stack([get(f"encoder.layer.{i}.{hk}.weight") for i in range(L)])
    p[f"layers.{n}_b"] = np.stack([get(f"encoder.layer.{i}.{hk}.bias") for i in range(L)])
  for k, s in shapes(cfg).items():
    if p[k].shape != s:
      raise BertError(f"{path}: tensor {k} has shape {p[k].shape}, config expects {s}")
  return cfg, {k: np.ascontiguousarray(v, np.float32) for k, v in p.items()}


def _missing(path, key, w):
  raise BertError(f"{path}/model.safetensors has no tensor {key!r} (it has e.g. "
                  f"{sorted(w)[:6]}); is it a BertModel checkpoint?")


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mu = jnp.mean(x32, -1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mu), -1, keepdims=True)
  return ((x32 - mu) * jax.lax.rsqrt(var + eps) * w + b).astype(x.dtype)


class Bert(nnx.Module):
  """BERT encoder: `__call__(ids, mask, types) -> hidden states [B, T, D]`."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dropout: float = 0.1):
    self.cfg, self.dropout = cfg, dropout
    for k, s in shapes(cfg).items():
      if k.endswith(("_b",)) or k == "emb_ln_b":
        val = jnp.zeros(s, jnp.float32)
      elif k.endswith("_w"):
        val = jnp.ones(s, jnp.float32)
      else:
        val = 0.02 * jax.random.normal(rngs.params(), s, jnp.float32)
      setattr(self, k.replace(".", "_"), nnx.Param(val))

  def load(self, params: dict[str, Any]) -> None:
    want = shapes(self.cfg)
    if set(params) != set(want):
      raise BertError(f"BERT params do not match the config: missing "
                      f"{sorted(set(want) - set(params))}, unexpected "
                      f"{sorted(set(params) - set(want))}")
    for k, s in want.items():
      if tuple(params[k].shape) != s:
        raise BertError(f"BERT tensor {k} has shape {tuple(params[k].shape)}, expected {s}")
      getattr(self, k.replace(".", "_"))[...] = jnp.asarray(params[k], jnp.float32)

  def layer_arrays(self) -> dict[str, jax.Array]:
    return {k[7:]: v[...] for k, v in vars(self).items()
            if k.startswith("layers_") and isinstance(v, nnx.Variable)}

  def embed(self, ids_BT: jax.Array, types_BT: jax.Array | None = None) -> jax.Array:
    """Embedding output [B, T, D] (the input of layer 0)."""
    T = ids_BT.shape[1]
    if T > self.cfg.max_position:
      raise BertError(f"{T} tokens exceed the encoder's {self.cfg.max_position} positions")
    types_BT = jnp.zeros_like(ids_BT) if types_BT is None else types_BT
    h = (self.word_emb[...][ids_BT] + self.pos_emb[...][:T][None]
         + self.type_emb[...][types_BT])
    return layer_norm(h, self.emb_ln_w[...], self.emb_ln_b[...], self.cfg.layer_norm_eps)

  def layers(self, h_BTD: jax.Array, mask_BT: jax.Array, start: int = 0, stop: int | None = None,
             *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Run layers [start, stop) on h [B, T, D]; dropout when `dropout_rng` is given."""
    stop = self.cfg.num_layers if stop is None else stop
    stack = jax.tree.map(lambda a: a[start:stop], self.layer_arrays())
    return run_layers(stack, h_BTD, mask_BT, self.cfg,
                      dropout=self.dropout if dropout_rng is not None else 0.0, rng=dropout_rng)

  def __call__(self, ids_BT: jax.Array, mask_BT: jax.Array, types_BT: jax.Array | None = None,
               *, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Hidden states of the last layer [B, T, D] (float32)."""
    return self.layers(self.embed(ids_BT, types_BT), mask_BT, dropout_rng=dropout_rng)


def run_layers(stack: dict[str, jax.Array], h_BTD: jax.Array, mask_BT: jax.Array,
               cfg: BertConfig, *, dropout: float = 0.0, rng: jax.Array | None = None
               ) -> jax.Array:
  """Run a stack of layers (every array with a leading layer axis, as `Bert.layer_arrays()`) on
  h [B, T, D]; mask [B, T] (1 = real token). Dropout `dropout` when `rng` is given."""
  B, T, _ = h_BTD.shape
  n = next(iter(stack.values())).shape[0]
  if n == 0:
    return h_BTD
  p_drop = dropout if rng is not None else 0.0
  keys = jax.random.split(rng, n) if p_drop else jnp.zeros((n, 2), jnp.uint32)
  drop = lambda x, key: (jnp.where(jax.random.bernoulli(key, 1 - p_drop, x.shape),
                                   x / (1 - p_drop), 0.0) if p_drop else x)
  bias_B11T = jnp.where(mask_BT[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)
  Hn, Dh, eps = cfg.num_heads, cfg.head_dim, cfg.layer_norm_eps

  def layer(h, x):
    p, key = x["p"], x["key"]
    k1, k2, k3 = jax.random.split(key, 3)
    heads = lambda n: (h @ p[n] + p[f"{n}_b"]).reshape(B, T, Hn, Dh)
    s = jnp.einsum("bthd,bshd->bhts", heads("q"), heads("k")) / np.sqrt(Dh) + bias_B11T
    a = drop(jax.nn.softmax(s, -1), k1)
    o = jnp.einsum("bhts,bshd->bthd", a, heads("v")).reshape(B, T, Hn * Dh)
    h = layer_norm(h + drop(o @ p["o"] + p["o_b"], k2), p["ln1_w"], p["ln1_b"], eps)
    u = jax.nn.gelu(h @ p["up"] + p["up_b"], approximate=False)
    h = layer_norm(h + drop(u @ p["down"] + p["down_b"], k3), p["ln2_w"], p["ln2_b"], eps)
    return h, None

  return jax.lax.scan(layer, h_BTD, {"p": stack, "key": keys})[0]


def mean_pool(h_BTD: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """Mean over real tokens (sentence-transformers pooling): [B, D]."""
  m = mask_BT.astype(jnp.float32)[..., None]
  return jnp.sum(h_BTD * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)


# --------------------------------------------------------------------------------------------
# Tokenisation of (prompt, response) pairs
# --------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path):
  """A `tokenizers.Tokenizer` from tokenizer.json, with truncation and padding switched off."""
  f = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
  if not f.is_file():
    raise BertError(f"no tokenizer.json at {path}")
  tok = Tokenizer.from_file(str(f))
  tok.no_truncation()
  tok.no_padding()
  return tok


def encode_pairs(tok, prompts: Sequence[str], responses: Sequence[str], max_len: int,
                 max_prompt: int) -> dict[str, np.ndarray]:
  """[CLS] prompt [SEP] response [SEP], int32 [N, max_len] ids, mask and token types.

  The prompt keeps its first `max_prompt` tokens (fewer when the response is short); the
  response fills the rest and loses its end. `truncated` [N] counts rows that lost tokens."""
  if len(prompts) != len(responses):
    raise BertError(f"{len(prompts)} prompts but {len(responses)} responses")
  if not 4 <= max_prompt < max_len - 3:
    raise BertError(f"need 4 <= max_prompt ({max_prompt}) < max_len - 3 ({max_len - 3})")
  cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  N = len(prompts)
  ids = np.zeros((N, max_len), np.int32)
  mask = np.zeros((N, max_len), np.int32)
  types = np.zeros((N, max_len), np.int32)
  trunc = np.zeros((N,), bool)
  enc_p = tok.encode_batch([str(p) for p in prompts], add_special_tokens=False)
  enc_r = tok.encode_batch([str(r) for r in responses], add_special_tokens=False)
  room = max_len - 3
  for i, (ep, er) in enumerate(zip(enc_p, enc_r)):
    p, r = ep.ids, er.ids
    n_p = min(len(p), max(max_prompt, room - len(r)))
    n_r = min(len(r), room - n_p)
    trunc[i] = n_p < len(p) or n_r < len(r)
    seq = [cls_id, *p[:n_p], sep_id, *r[:n_r], sep_id]
    ids[i, :len(seq)] = seq
    mask[i, :len(seq)] = 1
    types[i, n_p + 2:len(seq)] = 1
  return {"ids": ids, "mask": mask, "types": types, "truncated": trunc}

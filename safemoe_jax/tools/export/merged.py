"""Merged export: the base with s * sum_e g_e B_e A_e merged in, for a fixed gate vector g -> an HF
checkpoint (config.json + model.safetensors + tokenizer) that transformers/vLLM load."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import numpy as st

from safemoe_jax.core import numbers
from safemoe_jax.core.config import ModelConfig
from safemoe_jax.io import jsonio
from safemoe_jax.io import weights as W
from safemoe_jax.io.base import load_base
from safemoe_jax.io.tokenizer import tokenizer_from_gguf
from safemoe_jax.train.checkpoint import nonfinite_names
from safemoe_jax.train.rundir import RunDir, RunError, TrainedRun
from safemoe_jax.tools.export.common import (_TOKENIZER_FILES, HF_ARCHITECTURES, check_out,
                                             ExportError, mark_out)


def gate_vector(routing: str, domains: Sequence[str], domain: Sequence[str] | str | None = None,
                weights: Sequence[float] | None = None) -> np.ndarray:
  """g [E] of a fixed routing, as the model's fixed_gates computes it."""
  E = len(domains)
  if routing == "base":
    return np.zeros(E, np.float32)
  if routing == "uniform":
    return np.full(E, 1.0 / E, np.float32)
  if routing == "negated":
    return np.full(E, -1.0 / E, np.float32)
  if routing == "fixed":
    if weights is None or len(weights) != E:
      raise ExportError(f"routing 'fixed' needs --weights with {E} values (one per expert: "
                        f"{list(domains)}), got {weights}")
    for w in weights:  # NaN, inf or beyond float32 would merge into non-finite weights
      numbers.check_value("--weights", float(w), numbers.ANY, ExportError)
    return np.asarray(weights, np.float32)
  if routing == "oracle":
    chosen = [domain] if isinstance(domain, str) else list(domain or [])
    if not chosen or (bad := [d for d in chosen if d not in domains]):
      raise ExportError(f"routing 'oracle' needs --domain, one or more of {list(domains)}; "
                        f"got {chosen}")
    g = np.zeros(E, np.float32)
    g[[domains.index(d) for d in chosen]] = 1.0
    return g / np.float32(g.sum())  # a multi-hot row is split evenly, as in the model
  raise ExportError(f"routing {routing!r} cannot be merged into fixed weights; use base, "
                    "uniform, negated, fixed or oracle (learned routing depends on the input: "
                    "export the experts and router with the 'peft' subcommand)")


def merge_experts(params: dict[str, np.ndarray], experts: dict[str, np.ndarray], scale: float,
                  g_E: np.ndarray) -> dict[str, np.ndarray]:
  """W'[l] = W[l] + s * sum_e g_e A[l, e] @ B[l, e] (our (in, out) layout), in float64 and
  rounded once to float32."""
  out = dict(params)
  g = np.asarray(g_E, np.float64)
  for key in experts:
    if not key.startswith("A_"):
      continue
    t = key[2:]
    A, B = experts[f"A_{t}"].astype(np.float64), experts[f"B_{t}"].astype(np.float64)
    delta = scale * np.einsum("leir,e,lero->lio", A, g, B)
    out[f"layers.{t}"] = (params[f"layers.{t}"].astype(np.float64) + delta).astype(np.float32)
  return out


def hf_state_dict(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our layout -> HF names, PyTorch (out, in) layout; the inverse of weights.load_hf_checkpoint
  (no lm_head.weight with tied embeddings)."""
  W.check_params(cfg, params)
  out = {}
  for key, val in params.items():
    for i in range(cfg.num_layers) if key.startswith("layers.") else [None]:
      w = val[i] if i is not None else val
      if w.ndim == 2 and key != "embed":
        w = w.T
      out[W._hf_name(key, i)] = np.ascontiguousarray(w)
  return out


def hf_config(cfg: ModelConfig, model_type: str | None = None, **extra: Any) -> dict[str, Any]:
  """config.json for `cfg`: the inverse of weights.config_from_hf (llama, mistral, qwen2).
  Written for transformers 5 (rope_parameters) and 4 (rope_theta, rope_scaling) alike."""
  mt = model_type or ("qwen2" if cfg.qkv_bias else "llama")
  if mt not in HF_ARCHITECTURES:
    raise ExportError(f"model_type {mt!r}: supported are {list(HF_ARCHITECTURES)}")
  if cfg.qkv_bias != (mt == "qwen2"):
    raise ExportError(f"qkv_bias={cfg.qkv_bias} cannot be written as {mt!r}: only qwen2 has "
                      "q/k/v biases, and it always has them")
  rs = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  d: dict[str, Any] = {
      "architectures": [HF_ARCHITECTURES[mt]], "model_type": mt, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "use_cache": True,
      "rope_parameters": {"rope_type": "default", **(rs or {}), "rope_theta": cfg.rope_theta},
      "rope_theta": cfg.rope_theta, "rope_scaling": rs, "dtype": "float32",
      "torch_dtype": "float32"}
  if mt == "llama":
    d |= {"attention_bias": False, "mlp_bias": False}
  else:
    d |= {"sliding_window": None, "use_sliding_window": False}
    if mt == "qwen2":
      d["max_window_layers"] = cfg.num_layers
  return d | extra


def _np_dtype(name: str) -> np.dtype:
  return {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}[name]


def _load_base(run: TrainedRun, base: str | Path | None) -> tuple[Path, ModelConfig, dict, dict | None]:
  """(path, config, float32 params, GGUF metadata or None) of the run's base model, checked
  against the fingerprint recorded when the experts were trained."""
  rd = RunDir(run.dir)
  path = rd.base_path(run.base_path, run.base_fingerprint, base)
  if not path.exists():
    raise ExportError(f"base model {path} not found; pass --base with the model the experts "
                      "were trained on")
  try:
    rd.check_base(path, run.base_fingerprint, "pass --base with that model")
  except RunError as e:
    raise ExportError(str(e)) from None
  b = load_base(path, with_tokenizer=False)
  arch = lambda c: dataclasses.replace(c, param_dtype="float32", compute_dtype="float32",
                                       remat=False)
  if arch(b.config) != arch(run.model):
    raise ExportError(f"base model {path} has config {b.config}, the run was trained on "
                      f"{run.model}")
  return path, b.config, b.params, b.gguf_metadata


def export_merged(run: TrainedRun, out: str | Path, g_E: np.ndarray, *, base: str | Path | None = None,
                  dtype: str = "float32", overwrite: bool = False) -> Path:
  """Write base + s * sum_e g_e B_e A_e as an HF checkpoint: config.json, model.safetensors in
  PyTorch layout, and the tokenizer (copied from an HF base, rebuilt from a GGUF's metadata).
  Merged weights that are not finite in `dtype` (large gates, float16 overflow) are refused."""
  out = Path(out)
  check_out(out, run, base, overwrite)
  path, cfg, params, md = _load_base(run, base)
  check_out(out, run, path, overwrite)
  g = np.asarray(g_E, np.float32)
  if g.shape != (len(run.domains),):
    raise ExportError(f"gate vector of shape {g.shape}, expected ({len(run.domains)},)")
  merged = merge_experts(params, run.experts, run.scale, g)
  dt = _np_dtype(dtype)
  with np.errstate(over="ignore", invalid="ignore"):
    tensors = {k: v.astype(dt) for k, v in hf_state_dict(cfg, merged).items()}
  if bad := nonfinite_names(tensors):
    raise ExportError(f"the merged weights hold NaN or inf in {len(bad)} of {len(tensors)} "
                      f"tensors ({bad[:3]}) with gates {g.tolist()} in {dtype}: nothing was "
                      f"written. Use smaller gates (or float32)")
  out.mkdir(parents=True, exist_ok=True)
  mark_out(out)
  if md is None:  # HF base: keep its config.json (token ids, model_type, ...), set the dtype
    hc = jsonio.read_json(path / "config.json")
    hc.setdefault("architectures", [HF_ARCHITECTURES[hc["model_type"]]])
    hc["dtype"] = hc["torch_dtype"] = dtype
    for f in _TOKENIZER_FILES:
      if (path / f).is_file():
        shutil.copy2(path / f, out / f)
  else:
    ids = {f"{n}_token_id": int(md[f"tokenizer.ggml.{n}_token_id"]) for n in ("bos", "eos")
           if f"tokenizer.ggml.{n}_token_id" in md}
    hc = hf_config(cfg, "llama", **ids, dtype=dtype, torch_dtype=dtype)
    tokenizer_from_gguf(md).save_pretrained(out)
  hc["safemoe"] = {"gates": dict(zip(run.domains, g.tolist())), "scale": run.scale,
                   "experts": str(run.dir.absolute() / "experts.safetensors"),
                   "base_model": str(path)}
  tmp = out / f"model.safetensors.{os.getpid()}.tmp"
  st.save_file(tensors, str(tmp), metadata={"format": "pt"})
  os.replace(tmp, out / "model.safetensors")
  jsonio.write_text_atomic(out / "config.json", json.dumps(hc, indent=2) + "\n")
  return out

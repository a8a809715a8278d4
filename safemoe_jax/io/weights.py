"""Checkpoints -> our parameter layout: Hugging Face safetensors folders and GGUF files.

Our layout is a flat dict of numpy arrays, weights stored (in, out) (transposed from PyTorch's
(out, in) Linear weights), the L decoder layers stacked on a leading axis; `expected_shapes` is
the full list. RoPE is HF's rotate-half convention, so llama.cpp's permuted GGUF Q/K are undone.

Only safetensors, GGUF and JSON are read: never pickle, never remote code. Tensors are read one
at a time (memory-mapped) and written into preallocated stacks, so peak memory stays near the
size of the result, also for 8B models.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
from gguf import GGUFReader
from gguf.quants import dequantize
import numpy as np

from safemoe_jax.errors import SafeMoEError
from safemoe_jax.core.config import ModelConfig


class WeightsError(SafeMoEError, ValueError):
  """A checkpoint cannot be read, is of an unsupported kind, or does not match its config."""


HF_MODEL_TYPES = ("llama", "mistral", "qwen2")  # SmolLM2, TinyLlama, Llama 2/3.x are "llama"
GGUF_ARCHS = ("llama", "qwen2")  # llama.cpp permutes Q/K rows for llama only
DType = np.dtype | type | str


# --------------------------------------------------------------------------------------------
# The layout.
# --------------------------------------------------------------------------------------------


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Every parameter of a `cfg`-shaped model and its shape (our layout)."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  Q, K = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim  # Hq*hd, Hkv*hd
  s = {"embed": (V, D), "layers.attn_norm": (L, D),
       "layers.q": (L, D, Q), "layers.k": (L, D, K), "layers.v": (L, D, K), "layers.o": (L, Q, D)}
  if cfg.qkv_bias:
    s |= {"layers.q_bias": (L, Q), "layers.k_bias": (L, K), "layers.v_bias": (L, K)}
  s |= {"layers.mlp_norm": (L, D), "layers.gate": (L, D, F), "layers.up": (L, D, F),
        "layers.down": (L, F, D), "final_norm": (D,)}
  if not cfg.tie_embeddings:
    s["lm_head"] = (D, V)
  return s


def check_params(cfg: ModelConfig, params: dict[str, Any]) -> None:
  """Raise WeightsError unless `params` has exactly the keys and shapes `cfg` expects."""
  want = expected_shapes(cfg)
  problems = [f"  {k}: missing (expected shape {want[k]})" for k in want if k not in params]
  problems += [f"  {k}: shape {tuple(np.shape(params[k]))}, expected {want[k]}"
               for k in want if k in params and tuple(np.shape(params[k])) != want[k]]
  problems += [f"  {k}: unexpected tensor of shape {tuple(np.shape(params[k]))}"
               for k in params if k not in want]
  if problems:
    raise WeightsError("the checkpoint does not match the model config:\n" + "\n".join(problems)
                       + f"\n  config: {_arch_summary(cfg)}\n  fix: load the weights with the "
                       "config that came with them (config.json / GGUF metadata).")


def _arch_summary(cfg: ModelConfig) -> str:
  return (f"layers={cfg.num_layers} hidden={cfg.hidden_size} ffn={cfg.intermediate_size} "
          f"heads={cfg.num_heads} kv_heads={cfg.num_kv_heads} head_dim={cfg.head_dim} "
          f"vocab={cfg.vocab_size} tied={cfg.tie_embeddings} qkv_bias={cfg.qkv_bias}")


def _np_dtype(dtype: DType) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if str(dtype) in ("bfloat16", "bf16") else np.dtype(dtype)


def check_source(cfg: ModelConfig, key: str, layer: int | None, name: str,
                 got: Sequence[int] | None, where: Any) -> None:
  """Source tensor `name` (our `key`, of `layer`) is present (got = its shape, None if absent)
  with the (out, in) shape the config expects; else a WeightsError naming both."""
  if got is None:
    raise WeightsError(f"tensor {name} (our {key}) is missing from {where}.\n"
                       f"  the config ({_arch_summary(cfg)}) needs it; the checkpoint does "
                       "not match the config, or is of a variant we do not support.")
  shape = expected_shapes(cfg)[key]
  want = shape[1:] if layer is not None else shape
  want_src = want[::-1] if len(want) == 2 and key != "embed" else want  # (out, in)
  if tuple(got) != tuple(want_src):
    raise WeightsError(f"tensor {name} has shape {tuple(got)} in {where}, but the config "
                       f"expects {want_src} ({_arch_summary(cfg)}): the checkpoint does not "
                       "match the config.")


def _assemble(cfg: ModelConfig, name_of: Callable[[str, int | None], str],
              read: Callable[[str], np.ndarray | None], dtype: DType, where: str,
              fix: Callable[[str, np.ndarray], np.ndarray] = lambda key, w: w
              ) -> tuple[dict[str, np.ndarray], set[str]]:
  """Fill our layout tensor by tensor: `read(source_name)` gives the (out, in) source array
  (None if absent), `fix` may rewrite it (GGUF Q/K un-permutation). Returns params and the
  source names used."""
  params, used = {}, set()
  for key, shape in expected_shapes(cfg).items():
    out = None  # allocated once the first source tensor has the expected shape
    for i in range(cfg.num_layers) if key.startswith("layers.") else [None]:
      name = name_of(key, i)
      w = read(name)
      check_source(cfg, key, i, name, None if w is None else w.shape, where)
      if out is None:
        out = np.empty(shape, _np_dtype(dtype))
      w = fix(key, w)
      if w.ndim == 2 and key != "embed":
        w = w.T  # (out, in) -> (in, out)
      out[() if i is None else i] = w  # casts to dtype
      used.add(name)
    params[key] = out
  return params, used


# --------------------------------------------------------------------------------------------
# Hugging Face: config.json + safetensors.
# --------------------------------------------------------------------------------------------

_HF_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
             "lm_head": "lm_head.weight", "attn_norm": "input_layernorm.weight",
             "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight",
             "v": "self_attn.v_proj.weight", "o": "self_attn.o_proj.weight",
             "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
             "v_bias": "self_attn.v_proj.bias", "mlp_norm": "post_attention_layernorm.weight",
             "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
             "down": "mlp.down_proj.weight"}


def _hf_name(key: str, i: int | None) -> str:
  if i is None:
    return _HF_NAMES[key]
  return f"model.layers.{i}.{_HF_NAMES[key.removeprefix('layers.')]}"


def _rope_from_hf(cfg: dict) -> tuple[float, dict | None]:
  """(rope_theta, our rope_scaling) from transformers 5 `rope_parameters` or the older
  top-level `rope_theta` + `rope_scaling` ({"type" | "rope_type": ...})."""
  rp = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
  theta = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
  kind = rp.get("rope_type", rp.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind != "llama3":
    raise WeightsError(f"RoPE scaling type {kind!r} is not supported (supported: plain RoPE and "
                       f"'llama3'); rope settings found: {rp}")
  keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  if missing := [k for k in keys if k not in rp]:
    raise WeightsError(f"llama3 RoPE scaling lacks {missing}; found {rp}")
  return theta, {"rope_type": "llama3", **{k: rp[k] for k in keys}}


def config_from_hf(cfg: dict, **overrides: Any) -> ModelConfig:
  """Our ModelConfig from an HF config.json dict (llama, mistral, qwen2); `overrides` replace
  fields afterwards (e.g. param_dtype="bfloat16")."""
  mt = cfg.get("model_type")
  if mt not in HF_MODEL_TYPES:
    raise WeightsError(f"model_type {mt!r} is not supported; supported: {list(HF_MODEL_TYPES)} "
                       "(SmolLM2, TinyLlama and Llama 2/3.x are 'llama').")
  try:
    D, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    F, L, V = int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
  except KeyError as e:
    raise WeightsError(f"config.json lacks {e.args[0]!r}, needed for a {mt} model") from None
  if (act := cfg.get("hidden_act", "silu")) != "silu":
    raise WeightsError(f"hidden_act {act!r} is not supported: the MLP is SwiGLU (silu)")
  if mt != "qwen2" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
    raise WeightsError("attention_bias / mlp_bias = true is not supported (only Qwen2-style "
                       "biases on q, k, v)")
  max_pos = int(cfg.get("max_position_embeddings") or ModelConfig.max_position_embeddings)
  sw = cfg.get("sliding_window")
  if (mt == "mistral" or cfg.get("use_sliding_window")) and sw is not None and sw < max_pos:
    warnings.warn(f"{mt}: sliding_window={sw} < max_position_embeddings={max_pos}; we use full "
                  f"attention, which equals the model only for sequences up to {sw} tokens",
                  stacklevel=2)
  theta, scaling = _rope_from_hf(cfg)
  out = ModelConfig(
      vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=heads,
      num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
      head_dim=int(cfg.get("head_dim") or D // heads), rope_theta=theta, rope_scaling=scaling,
      rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), max_position_embeddings=max_pos,
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=mt == "qwen2")
  return _replace(out, overrides)


def _replace(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  if bad := sorted(set(overrides) - fields):
    raise WeightsError(f"unknown ModelConfig override(s) {bad}; fields are {sorted(fields)}")
  cfg = dataclasses.replace(cfg, **overrides)
  cfg.validate()
  return cfg


# safetensors' own numpy reader cannot return bfloat16, so we read the (simple) format directly:
# 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}, the bytes.
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


@dataclasses.dataclass(frozen=True)
class StTensor:
  """One tensor of a safetensors file: where its bytes are, without reading them."""
  file: Path
  offset: int  # of its first byte in the file
  dtype: np.dtype
  shape: tuple[int, ...]

  def rows(self, rows: slice = slice(None), cols: slice = slice(None),
           chunk_bytes: int = 32 << 20) -> np.ndarray:
    """x[rows, cols] of a 1-D or 2-D tensor, read with plain reads (no mapping), at most
    `chunk_bytes` of source rows at a time: memory holds the result and one chunk. Columns that
    cover under 90% of a row are read row by row (one read of the column span per row), so a
    column slice costs its own bytes, not the whole rows'."""
    n = self.shape[0] if self.shape else 1
    r0, r1, step = rows.indices(n)
    if step != 1:
      raise ValueError("row slices must be contiguous")
    row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
    if len(self.shape) == 2:
      c0, c1, cstep = cols.indices(self.shape[1])
      if cstep == 1 and c1 > c0 and (c1 - c0) < 0.9 * self.shape[1]:
        return self._column_span(r0, r1, c0, c1, row_bytes)
    per = max(1, chunk_bytes // max(row_bytes, 1))
    parts = []
    with open(self.file, "rb") as fh:
      for a in range(r0, r1, per):
        b = min(a + per, r1)
        fh.seek(self.offset + a * row_bytes)
        x = np.frombuffer(fh.read((b - a) * row_bytes), self.dtype).reshape((b - a,) + self.shape[1:])
        parts.append(x[:, cols].copy() if x.ndim == 2 else x)
    if not parts:
      empty = np.zeros((0,) + self.shape[1:], self.dtype)
      return empty[:, cols] if empty.ndim == 2 else empty
    return parts[0] if len(parts) == 1 else np.concatenate(parts)

  def _column_span(self, r0: int, r1: int, c0: int, c1: int, row_bytes: int) -> np.ndarray:
    isz = self.dtype.itemsize
    out = np.empty((max(r1 - r0, 0), c1 - c0), self.dtype)
    buf = memoryview(out).cast("B")
    width = (c1 - c0) * isz
    with open(self.file, "rb", buffering=0) as fh:
      for i, r in enumerate(range(r0, r1)):
        fh.seek(self.offset + r * row_bytes + c0 * isz)
        if fh.readinto(buf[i * width:(i + 1) * width]) != width:
          raise WeightsError(f"{self.file} ends inside a tensor (truncated: download it again)")
    return out


def safetensors_index(files: list[Path]) -> dict[str, StTensor]:
  """name -> StTensor for every tensor of the files, headers checked."""
  out = {}
  for f in files:
    size = f.stat().st_size
    with open(f, "rb") as fh:
      n = int.from_bytes(fh.read(8), "little")
      if size < 8 or not 2 <= n <= min(size - 8, 100 << 20):  # the format caps it at 100 MB
        raise WeightsError(f"{f} is not a safetensors file: its header claims {n} bytes, the "
                           f"file has {size} (truncated or corrupt; download it again)")
      try:
        header = json.loads(fh.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{f}: the safetensors header is not valid JSON ({e}); the file is "
                           f"corrupt, download it again") from None
    if not isinstance(header, dict):
      raise WeightsError(f"{f}: the safetensors header is not a mapping; the file is corrupt")
    data_size = max(size - 8 - n, 0)
    for name, info in header.items():
      if name == "__metadata__":
        continue
      try:
        dtype_name, (a, b), shape = info["dtype"], info["data_offsets"], tuple(info["shape"])
        ok = (all(isinstance(x, int) and x >= 0 for x in (a, b, *shape)) and a <= b)
      except (TypeError, KeyError, ValueError):
        ok = False
      if not ok:
        raise WeightsError(f"{f}: tensor {name} has a corrupt header entry {str(info)[:200]}")
      if dtype_name not in _ST_DTYPES:
        raise WeightsError(f"{f.name}: tensor {name} has dtype {dtype_name}; supported: "
                           f"{list(_ST_DTYPES)}")
      dt = np.dtype(_ST_DTYPES[dtype_name])
      if b - a != math.prod(shape) * dt.itemsize or b > data_size:
        raise WeightsError(f"{f}: tensor {name} has a corrupt header entry {str(info)[:200]}")
      out[name] = StTensor(f, 8 + n + a, dt, shape)
  return out


def _safetensors_tensors(index: dict[str, StTensor]) -> dict[str, Callable[[], np.ndarray]]:
  """name -> zero-argument reader returning a memory-mapped (read-only) array."""
  maps: dict[Path, np.memmap] = {}
  out = {}
  for name, t in index.items():
    if t.file not in maps:
      maps[t.file] = np.memmap(t.file, np.uint8, mode="r")
    nbytes = math.prod(t.shape) * t.dtype.itemsize
    out[name] = (lambda buf=maps[t.file], t=t, nbytes=nbytes:
                 buf[t.offset:t.offset + nbytes].view(t.dtype).reshape(t.shape))
  return out


def _hf_files(d: Path) -> list[Path]:
  if (idx := d / "model.safetensors.index.json").exists():
    return [d / f for f in sorted(set(json.loads(idx.read_text())["weight_map"].values()))]
  if (d / "model.safetensors").exists():
    return [d / "model.safetensors"]
  if list(d.glob("*.bin")) or list(d.glob("*.pt")) or list(d.glob("*.pth")):
    raise WeightsError(
        f"{d} has only PyTorch pickle weights (*.bin / *.pt); pickle is refused because loading "
        "it can run arbitrary code.\n  fix: convert once, where you trust the file: "
        f"AutoModelForCausalLM.from_pretrained('{d}').save_pretrained('{d}', "
        "safe_serialization=True)")
  raise WeightsError(f"{d} has no model.safetensors or model.safetensors.index.json; found "
                     f"{sorted(p.name for p in d.iterdir())[:20]}")


def hf_open(path: str | Path, **overrides: Any) -> tuple[ModelConfig, dict[str, StTensor]]:
  """An HF folder's config and the index of its safetensors (no tensor is read)."""
  d = Path(path)
  if not (d / "config.json").is_file():
    raise WeightsError(f"{d} is not an HF model folder: config.json not found")
  cfg = config_from_hf(json.loads((d / "config.json").read_text()), **overrides)
  return cfg, safetensors_index(_hf_files(d))


def check_unused(cfg: ModelConfig, names: set[str], used: set[str], where: Path) -> None:
  """An HF checkpoint's tensors the model would not read: an unsupported variant."""
  ignored = {"lm_head.weight"} if cfg.tie_embeddings else set()  # tied: duplicate of embed
  extra = sorted(n for n in names - used - ignored if not n.endswith("rotary_emb.inv_freq"))
  if extra:
    raise WeightsError(f"{where} has tensors the model would ignore: {extra[:10]}"
                       f"{' ...' if len(extra) > 10 else ''}; this variant is not supported.")


def load_hf_checkpoint(path: str | Path, dtype: DType = np.float32, **overrides: Any
                       ) -> tuple[ModelConfig, dict[str, np.ndarray]]:
  """Read an HF folder (config.json + model.safetensors, or sharded with its index)."""
  cfg, index = hf_open(path, **overrides)
  tensors, d = _safetensors_tensors(index), Path(path)
  params, used = _assemble(cfg, _hf_name, lambda n: tensors[n]() if n in tensors else None,
                           dtype, where=str(d))
  check_unused(cfg, set(tensors), used, d)
  return cfg, params


# --------------------------------------------------------------------------------------------
# GGUF (llama.cpp): dequantised with the `gguf` package.
# --------------------------------------------------------------------------------------------

_GGUF_NAMES = {"embed": "token_embd.weight", "final_norm": "output_norm.weight",
               "lm_head": "output.weight", "attn_norm": "attn_norm.weight",
               "q": "attn_q.weight", "k": "attn_k.weight", "v": "attn_v.weight",
               "o": "attn_output.weight", "q_bias": "attn_q.bias", "k_bias": "attn_k.bias",
               "v_bias": "attn_v.bias", "mlp_norm": "ffn_norm.weight", "gate": "ffn_gate.weight",
               "up": "ffn_up.weight", "down": "ffn_down.weight"}


def _gguf_name(key: str, i: int | None) -> str:
  if i is None:
    return _GGUF_NAMES[key]
  return f"blk.{i}.{_GGUF_NAMES[key.removeprefix('layers.')]}"


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's interleaved-RoPE row permutation of a Q/K weight (out, in) or bias (out,):
  gives HF's rotate-half layout."""
  hd = w.shape[0] // n_head
  return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
  """Per-frequency divisors of Llama-3.1 RoPE scaling ([head_dim // 2]), as GGUF's rope_freqs."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * np.pi / inv_freq
  old, lo, hi = (scaling["original_max_position_embeddings"], scaling["low_freq_factor"],
                 scaling["high_freq_factor"])
  smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)  # 0: long waves, 1: short waves
  return 1.0 / ((1 - smooth) / scaling["factor"] + smooth)


def _f32(x: Any) -> float:
  return float(str(np.float32(x)))  # shortest decimal of a float32 field: 1e-05, not 9.99e-06


def gguf_metadata(path: str | Path) -> dict[str, Any]:
  """All key/value metadata of a GGUF file as Python values (token lists included)."""
  return {k: f.contents() for k, f in _gguf_reader(path).fields.items()}


def _gguf_reader(path: str | Path):
  if not Path(path).is_file():
    raise WeightsError(f"GGUF file {path} not found")
  try:
    return GGUFReader(path)
  except Exception as e:
    raise WeightsError(f"{path} could not be read as GGUF: {type(e).__name__}: {e}") from e


@dataclasses.dataclass
class GgufSource:
  """An opened GGUF: its config and metadata, and its tensors one at a time (dequantised)."""
  cfg: ModelConfig
  metadata: dict[str, Any]
  read: Callable[[str], np.ndarray | None]  # GGUF name -> float32 (out, in), None if absent
  fix: Callable[[str, np.ndarray], np.ndarray]  # our key, source tensor -> HF's layout
  shapes: dict[str, tuple[int, ...]]  # every tensor in the file, numpy order
  used: set[str]  # those read outside the layout (rope_freqs)

  @property
  def names(self) -> set[str]:
    return set(self.shapes)


def load_gguf(path: str | Path, dtype: DType = np.float32, **overrides: Any
              ) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
  """Read a llama- or qwen2-architecture GGUF: (config, dequantised params, raw metadata)."""
  src = gguf_open(path, **overrides)
  params, used_w = _assemble(src.cfg, _gguf_name, src.read, dtype, where=str(path), fix=src.fix)
  gguf_check_unused(src, used_w, path)
  return src.cfg, params, src.metadata


def gguf_check_unused(src: GgufSource, used: set[str], path: str | Path) -> None:
  if extra := sorted(src.names - src.used - used):
    raise WeightsError(f"{path} has tensors the model would ignore: {extra[:10]}; this variant "
                       "is not supported.")


def gguf_open(path: str | Path, **overrides: Any) -> GgufSource:
  """Config and metadata of a GGUF; its tensors are dequantised only when read."""
  r = _gguf_reader(path)
  md = {k: f.contents() for k, f in r.fields.items()}
  arch = md.get("general.architecture")
  if arch not in GGUF_ARCHS:
    raise WeightsError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                       f"{list(GGUF_ARCHS)} (for others use the HF safetensors checkpoint)")
  tensors = {t.name: t for t in r.tensors}

  def g(key: str, default: Any = None) -> Any:
    if (v := md.get(f"{arch}.{key}", default)) is None:
      raise WeightsError(f"{path}: metadata {arch}.{key} is missing")
    return v

  if (kind := md.get(f"{arch}.rope.scaling.type", "none")) != "none":
    raise WeightsError(f"{path}: RoPE scaling {kind!r} in GGUF is not supported")
  D, heads = int(g("embedding_length")), int(g("attention.head_count"))
  hd = int(md.get(f"{arch}.attention.key_length", D // heads))
  if int(md.get(f"{arch}.rope.dimension_count", hd)) != hd:
    raise WeightsError(f"{path}: partial rotary embeddings (rope.dimension_count "
                       f"{md[f'{arch}.rope.dimension_count']} != head_dim {hd}) are not supported")
  if "token_embd.weight" not in tensors:
    raise WeightsError(f"{path}: no token_embd.weight tensor")
  V = int(tensors["token_embd.weight"].shape[-1])  # ggml shapes are reversed: (D, V)
  if len(md.get("tokenizer.ggml.tokens", ())) > V:
    raise WeightsError(f"{path}: {len(md['tokenizer.ggml.tokens'])} tokens but only {V} "
                       "embedding rows")
  cfg = ModelConfig(
      vocab_size=V, hidden_size=D, intermediate_size=int(g("feed_forward_length")),
      num_layers=int(g("block_count")), num_heads=heads,
      num_kv_heads=int(md.get(f"{arch}.attention.head_count_kv", heads)), head_dim=hd,
      rope_theta=_f32(g("rope.freq_base", 10000.0)),
      rms_norm_eps=_f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
      max_position_embeddings=int(g("context_length", ModelConfig.max_position_embeddings)),
      tie_embeddings="output.weight" not in tensors, qkv_bias="blk.0.attn_q.bias" in tensors)
  cfg = _replace(cfg, overrides)
  used = set()
  if "rope_freqs.weight" in tensors:  # Llama-3.1 RoPE scaling, stored only as its factors
    found = dequantize(tensors["rope_freqs.weight"].data, tensors["rope_freqs.weight"].tensor_type)
    if cfg.rope_scaling is None:
      raise WeightsError(
          f"{path} uses scaled RoPE (rope_freqs.weight) but GGUF does not store its parameters; "
          "pass them, e.g. for Llama-3.1: load_gguf(path, rope_scaling={'rope_type': 'llama3', "
          "'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, "
          "'original_max_position_embeddings': 8192})")
    want = llama3_rope_factors(cfg.rope_scaling, cfg.rope_theta, cfg.head_dim)
    if not np.allclose(found, want, rtol=1e-4):
      raise WeightsError(f"{path}: rope_scaling {cfg.rope_scaling} gives RoPE factors {want}, but "
                         f"the file has {np.asarray(found)}")
    used.add("rope_freqs.weight")

  def read(name: str) -> np.ndarray | None:
    t = tensors.get(name)
    return None if t is None else np.asarray(dequantize(t.data, t.tensor_type), np.float32)

  def fix(key: str, w: np.ndarray) -> np.ndarray:
    if arch == "llama" and key.removesuffix("_bias") in ("layers.q", "layers.k"):
      return unpermute_qk(w, cfg.num_heads if key.startswith("layers.q") else cfg.num_kv_heads)
    return w

  shapes = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in tensors.items()}
  return GgufSource(cfg, md, read, fix, shapes, used)

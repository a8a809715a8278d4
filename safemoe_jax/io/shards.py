"""Sharded from the start: a SafeMoELM whose base weights go from the checkpoint straight into
their devices' shards.

The model is built abstractly (`nnx.eval_shape`: shapes only), each parameter's sharding comes
from the logical-axis rules (`sharding.state_shardings`), and every base parameter is made with
`jax.make_array_from_callback`: the callback reads only that device's slice of the checkpoint
(safetensors: plain reads of the rows it needs; GGUF: one tensor dequantised at a time), cast to
the parameter dtype. Each process reads its block of a parameter (the box around its devices'
slices) once, and cuts each device's slice from it: every byte of the checkpoint is read once
per host, however the parameter is split or replicated over the host's devices. No device and
no process ever holds the whole base model; a process holds its own devices' shards plus its
block of one parameter (GGUF: one stacked parameter, see `GgufReader`).
The trainable groups (experts, router) are made exactly as `SafeMoELM(...)` makes them, from
the same random stream, and placed on their shardings: bit-identical to an eager model.

    reader = open_reader(path, param_dtype="bfloat16")        # config + index, no tensor read
    model = sharded_model(reader, experts_cfg, router_cfg, seed, mesh, rules)
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from safemoe_jax.core import experts as ex
from safemoe_jax.core import sharding as S
from safemoe_jax.core.config import ExpertsConfig, ModelConfig, RouterConfig
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.io import weights as W
from safemoe_jax.io.weights import WeightsError

Index = tuple[slice, ...]


class BaseReader:
  """Any slice of a base parameter in our layout (weights.expected_shapes), read from the
  checkpoint one source tensor at a time. Subclasses give `_rows(name, rows, cols)`: rows and
  columns of one source tensor in its (out, in) layout, after any layout fix."""

  def __init__(self, cfg: ModelConfig, where: Path, name_of, dtype: str):
    self.cfg, self.where, self.name_of = cfg, where, name_of
    self.dtype = W._np_dtype(dtype)
    self.shapes = W.expected_shapes(cfg)

  def source_shapes(self) -> dict[str, tuple[int, ...]]:  # per subclass
    raise NotImplementedError

  def check(self) -> set[str]:
    """Every source tensor is present with the expected shape (weights.check_source, as the
    eager loader checks); returns the source names used."""
    have, used = self.source_shapes(), set()
    for key in self.shapes:
      for i in range(self.cfg.num_layers) if key.startswith("layers.") else [None]:
        name = self.name_of(key, i)
        W.check_source(self.cfg, key, i, name, have.get(name), self.where)
        used.add(name)
    return used

  def read(self, key: str, index: Index | None = None) -> np.ndarray:
    """Our parameter `key`[index] in the reader's dtype."""
    shape = self.shapes[key]
    idx = tuple(index or ()) + (slice(None),) * (len(shape) - len(index or ()))
    layered = key.startswith("layers.")
    layers = range(shape[0])[idx[0]] if layered else [None]
    rest = idx[1:] if layered else idx
    parts = []
    for i in layers:
      name = self.name_of(key, i)
      if len(rest) == 1:  # a vector: norm scale or bias
        w = self._rows(key, name, rest[0], slice(None))
      elif key == "embed":  # stored (vocab, embed) like ours
        w = self._rows(key, name, rest[0], rest[1])
      else:  # ours (in, out) = the source's (out, in) transposed
        w = self._rows(key, name, rest[1], rest[0]).T
      parts.append(np.ascontiguousarray(w, self.dtype))
    return np.stack(parts) if layered else parts[0]

  def _rows(self, key: str, name: str, rows: slice, cols: slice) -> np.ndarray:
    raise NotImplementedError


class HfReader(BaseReader):
  """An HF safetensors folder: each slice read with plain file reads (no memory mapping)."""

  def __init__(self, path: Path, dtype: str, **overrides: Any):
    cfg, self.index = W.hf_open(path, **overrides)
    super().__init__(cfg, Path(path), W._hf_name, dtype)
    W.check_unused(cfg, set(self.index), self.check(), self.where)

  def source_shapes(self):
    return {k: t.shape for k, t in self.index.items()}

  def _rows(self, key, name, rows, cols):
    t = self.index[name]
    return t.rows(rows) if len(t.shape) == 1 else t.rows(rows, cols)


class GgufReader(BaseReader):
  """A GGUF file: a quantised tensor can only be dequantised whole, so the last `num_layers + 1`
  dequantised tensors are kept (each device's callback reads every layer of a parameter)."""

  def __init__(self, path: Path, dtype: str, **overrides: Any):
    self.src = W.gguf_open(path, **overrides)
    super().__init__(self.src.cfg, Path(path), W._gguf_name, dtype)
    self.metadata = self.src.metadata
    self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    W.gguf_check_unused(self.src, self.check(), path)

  def source_shapes(self):
    return self.src.shapes

  def _rows(self, key, name, rows, cols):
    if name not in self._cache:
      self._cache[name] = self.src.fix(key, self.src.read(name))
      while len(self._cache) > self.cfg.num_layers + 1:
        self._cache.popitem(last=False)
    w = self._cache[name]
    return w[rows] if w.ndim == 1 else w[rows, cols]


def open_reader(path: str | Path, param_dtype: str = "float32", **overrides: Any) -> BaseReader:
  """A reader of an HF folder or a .gguf file; reads the config and the tensor index only."""
  path = Path(path)
  if path.suffix == ".gguf":
    return GgufReader(path, param_dtype, **overrides)
  return HfReader(path, param_dtype, **overrides)


class _DrawCounter:
  """Stands in for nnx.Rngs while the base is built abstractly: counts its draws."""

  def __init__(self):
    self.n = 0

  def params(self):
    self.n += 1
    return jax.random.key(0)


def _trainable_groups(cfg: ModelConfig, ecfg: ExpertsConfig, rcfg: RouterConfig, seed: int
                      ) -> tuple[ex.Experts, ex.Router]:
  """Experts and router exactly as SafeMoELM(cfg, ecfg, rcfg, rngs=nnx.Rngs(seed)) makes them:
  the same stream, advanced past the base's draws."""
  count = _DrawCounter()
  nnx.eval_shape(lambda: SafeMoELM(cfg, None, None, rngs=count))  # type: ignore[arg-type]
  rngs = nnx.Rngs(seed)
  for _ in range(count.n):
    rngs.params()
  return (ex.Experts(cfg, ecfg, rngs=rngs), ex.Router(cfg, rcfg, ecfg.num_experts, rngs=rngs))


def abstract_sharded(cfg: ModelConfig, ecfg: ExpertsConfig | None, rcfg: RouterConfig | None,
                     mesh, rules: Sequence[tuple[str, Any]]):
  """(graphdef, abstract state, {path: NamedSharding}) of the model: shapes and placement, no
  array. sharded_model fills it; tools/aot.py sizes it per chip for a TPU topology."""
  ecfg, rcfg = ecfg or ExpertsConfig(), rcfg or RouterConfig()
  abstract = nnx.eval_shape(lambda: SafeMoELM(cfg, ecfg, rcfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  shardings = S.state_shardings(state, mesh, rules)
  return graphdef, state, {p: v.get_value() for p, v in nnx.to_flat_state(shardings)}


def host_box(indices: Sequence[Index], shape: tuple[int, ...]) -> Index:
  """The smallest box (one slice per axis) covering every given device slice of `shape`."""
  box = []
  for d, n in enumerate(shape):
    spans = [(idx[d] if d < len(idx) else slice(None)).indices(n)[:2] for idx in indices]
    box.append(slice(min(a for a, _ in spans), max(b for _, b in spans)))
  return tuple(box)


def _within(idx: Index, box: Index, shape: tuple[int, ...]) -> Index:
  """Device slice `idx` of the parameter, relative to the block read for `box`."""
  out = []
  for d, n in enumerate(shape):
    a, b, _ = (idx[d] if d < len(idx) else slice(None)).indices(n)
    out.append(slice(a - box[d].start, b - box[d].start))
  return tuple(out)


def sharded_model(reader: BaseReader, ecfg: ExpertsConfig | None, rcfg: RouterConfig | None,
                  seed: int, mesh, rules: Sequence[tuple[str, Any]],
                  cfg: ModelConfig | None = None) -> SafeMoELM:
  """A SafeMoELM over `mesh` whose every array already has its sharding; base weights read
  shard by shard from `reader`. `cfg` (default: the reader's) may change dtypes and remat."""
  cfg = cfg or reader.cfg
  ecfg, rcfg = ecfg or ExpertsConfig(), rcfg or RouterConfig()
  graphdef, state, flat_sh = abstract_sharded(cfg, ecfg, rcfg, mesh, rules)
  trained = {}
  if ecfg.num_experts:
    # Made whole on the host's CPU (on an accelerator they would sit whole on its first chip),
    # then sent shard by shard to their devices.
    cpu = jax.devices("cpu")[0] if jax.default_backend() != "cpu" else None
    with jax.default_device(cpu):
      experts, router = _trainable_groups(cfg, ecfg, rcfg, seed)
    trained = {("experts",) + p: v for p, v in nnx.to_flat_state(nnx.state(experts))}
    trained |= {("router",) + p: v for p, v in nnx.to_flat_state(nnx.state(router))}
  dt = np.dtype(jax.numpy.dtype(cfg.param_dtype))
  if dt != reader.dtype:
    raise WeightsError(f"the reader reads {reader.dtype}, the model wants {dt}: open it with "
                       f"param_dtype={cfg.param_dtype!r}")
  for path, var in nnx.to_flat_state(state):
    sh = flat_sh[path]
    key = ".".join(str(p) for p in path)
    if path in trained:
      var.set_value(jax.device_put(trained[path].get_value(), sh))
    elif key in reader.shapes:
      shape = var.get_value().shape
      # This host's block of the parameter (the box around its devices' slices) is read once;
      # each device's slice is cut from it in memory. Per-device reads read a row-sharded
      # tensor's rows for every column shard, and a replicated one once per replica.
      box = host_box(list(sh.addressable_devices_indices_map(shape).values()), shape)
      block = reader.read(key, box)
      var.set_value(jax.make_array_from_callback(
          shape, sh, lambda idx, block=block, box=box: block[_within(idx, box, shape)]))
      del block
    else:
      raise WeightsError(f"model parameter {key} is neither a base weight nor trainable")
  return nnx.merge(graphdef, state)

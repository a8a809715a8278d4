"""Mesh, logical-axis rules and shardings: parallelism is a config change, not a code change.

Every parameter carries `axes=(logical names...)` metadata (model.base_axes, experts.py); every
constrained activation names its axes at the call site (`constrain`). `MeshConfig.rules` maps
logical names to mesh axes ("data", "fsdp", "tensor"), as in maxtext / big_vision. A dimension
that the mapped mesh axes do not divide is replicated (logged once), never an error; a mesh axis
already used by an earlier dimension of the same array is dropped.

    mesh = make_mesh(cfg.mesh)
    sh = state_shardings(params, mesh, cfg.mesh.rules)      # also for optax states of params
    params = jax.device_put(params, sh)
    with use_mesh_rules(mesh, cfg.mesh.rules):               # activates `constrain` in the model
      step = jax.jit(step_fn, out_shardings=(sh, ...))
      out = step(params, ..., shard_batch(batch, mesh))
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from safemoe_jax.core.config import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
MeshAxes = str | tuple[str, ...] | None

DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),  # examples are split over every data-parallel device
    ("embed", "fsdp"),  # ZeRO-3/FSDP: weights sharded on the model width, gathered per layer
    ("vocab", "tensor"),  # embedding rows and logits columns split Megatron-style
    ("q_heads", "tensor"),  # attention heads are independent: split them over tensor
    ("kv_heads", "tensor"),  # follow the query heads they serve (GQA groups stay together)
    ("mlp", "tensor"),  # SwiGLU width: column-parallel gate/up, row-parallel down
    ("layers", None),  # the scan axis: each step needs its whole layer slice
    ("experts", None),  # E is small (a few domains) and every token mixes all experts
    ("rank", None),  # LoRA rank is tiny (<= 64): splitting it only adds collectives
    ("norm", None),  # RMSNorm scales are [D]-sized and read by every shard
    ("router_hidden", None),  # the router is lightweight; replicate it
    ("seq", None),  # no sequence parallelism: sequences fit on one device
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1  # data-parallel ways; -1 = all devices left after fsdp * tensor
  fsdp: int = 1  # parameter (and batch) sharding ways: FSDP / ZeRO-3
  tensor: int = 1  # tensor-parallel ways (heads, MLP width, vocab)
  rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES  # logical -> mesh

  def shape(self, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for `num_devices` devices, -1 resolved; raises ConfigError."""
    self.validate(num_devices)
    data = num_devices // (self.fsdp * self.tensor) if self.data == -1 else self.data
    return data, self.fsdp, self.tensor

  def validate(self, num_devices: int | None = None) -> None:
    for f in ("fsdp", "tensor"):
      if getattr(self, f) < 1:
        raise ConfigError(f"mesh.{f} must be >= 1, got {getattr(self, f)}")
    if self.data < 1 and self.data != -1:
      raise ConfigError(f"mesh.data must be >= 1, or -1 for all remaining devices; got "
                        f"{self.data}")
    seen = set()
    for rule in self.rules:
      if len(rule) != 2:
        raise ConfigError(f"mesh.rules entry {rule!r} must be a pair (logical name, mesh axes)")
      name, axes = rule
      if name in seen:
        raise ConfigError(f"mesh.rules maps logical axis {name!r} more than once")
      seen.add(name)
      bad = [a for a in _as_tuple(axes) if a not in MESH_AXES]
      if bad:
        raise ConfigError(f"mesh.rules[{name!r}] names mesh axes {bad}; the mesh axes are "
                          f"{list(MESH_AXES)}")
    if num_devices is None:
      return
    model = self.fsdp * self.tensor
    if self.data == -1:
      if num_devices % model:
        raise ConfigError(f"mesh.fsdp * mesh.tensor = {self.fsdp} * {self.tensor} = {model} does "
                          f"not divide the {num_devices} available devices; choose fsdp and "
                          f"tensor whose product divides {num_devices}")
    elif self.data * model != num_devices:
      raise ConfigError(f"mesh.data * mesh.fsdp * mesh.tensor = {self.data} * {self.fsdp} * "
                        f"{self.tensor} = {self.data * model}, but {num_devices} devices are "
                        f"available; make the product equal {num_devices}, or set mesh.data=-1 "
                        f"to use all remaining devices for data parallelism")


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def num_slices(devices: Sequence[Any]) -> int:
  """TPU slices the devices span (multislice: a `slice_index` per device); 1 elsewhere."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """The devices as a (data, fsdp, tensor) array in the topology-aware order of mesh_utils (ICI
  neighbours adjacent, as jax.make_mesh orders them). Devices of several slices (multislice):
  a hybrid mesh whose data axis spans the slices over DCN (only data parallelism crosses slices:
  one gradient all-reduce per step), fsdp and tensor within each slice's ICI."""
  devices = list(devices)
  n = num_slices(devices)
  # v5e slices are 2D tori whose axes a mesh axis may span only by splitting (as jax.make_mesh)
  split = getattr(devices[0], "device_kind", "") in ("TPU v5 lite", "TPU v5e")
  if n == 1:
    return mesh_utils.create_device_mesh(tuple(shape), devices, allow_split_physical_axes=split)
  data, fsdp, tensor = shape
  if data % n:
    raise ConfigError(f"the devices span {n} TPU slices and only the data axis crosses slices "
                      f"(DCN): mesh.data={data} must be a multiple of {n} (fsdp * tensor at most "
                      f"one slice's {len(devices) // n} chips)")
  return mesh_utils.create_hybrid_device_mesh((data // n, fsdp, tensor), (n, 1, 1), devices,
                                              allow_split_physical_axes=split)


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh with axes ("data", "fsdp", "tensor"): the one builder for the trainer, evaluation and
  AOT (`devices`: e.g. a TPU topology's compile-only devices; default all of jax.devices()).
  Several slices get the hybrid ICI/DCN mesh of `device_grid`."""
  devices = list(devices) if devices is not None else jax.devices()
  grid = device_grid(cfg.shape(len(devices)), devices)
  auto = (jax.sharding.AxisType.Auto,) * 3  # GSPMD propagation between our constraints
  return Mesh(grid, MESH_AXES, axis_types=auto)


# --------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec
# --------------------------------------------------------------------------------------------

_logged: set[tuple] = set()


def _log_once(key: tuple, msg: str) -> None:
  if key not in _logged:
    _logged.add(key)
    log.info(msg)


def fitting_mesh(m: MeshConfig) -> MeshConfig:
  """`m`, or all devices data-parallel (same rules) where it does not fit this machine (a run
  trained on a pod, loaded for evaluation on fewer devices)."""
  try:
    m.shape(jax.device_count())
    return m
  except ConfigError as e:
    log.warning(f"the run's mesh does not fit this machine ({e}); loading data-parallel")
    return MeshConfig(rules=m.rules)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: Sequence[tuple[str, MeshAxes]]) -> P:
  """PartitionSpec of an array of `shape` whose dims have logical names `axes`.

  Unknown names and None are replicated; a dim not divisible by its mesh axes' total size is
  replicated (logged once); a mesh axis already used by an earlier dim is dropped.
  """
  if len(axes) != len(shape):
    _log_once(("ndim", tuple(axes), tuple(shape)),
              f"logical axes {tuple(axes)} do not match shape {tuple(shape)}: replicated")
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    mesh_axes = tuple(a for a in _as_tuple(table.get(name)) if a not in used)
    size = math.prod(mesh.shape[a] for a in mesh_axes)
    if mesh_axes and dim % size:
      _log_once(("indivisible", name, dim, mesh_axes, size),
                f"logical axis {name!r} of size {dim} is not divisible by mesh axes {mesh_axes} "
                f"(size {size}): replicated")
      mesh_axes = ()
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]]) -> Any:
  """NamedShardings with the structure of `state` (an nnx.State, or a pytree of them such as an
  optax state built on one: adam's mu/nu are States of the same Variables).

  Each Variable keeps its type and metadata and holds a NamedSharding from its `axes`, so the
  result matches the state leaf for leaf (jit in/out_shardings, device_put, tree.map). Variables
  without `axes` and plain arrays (e.g. adam's count) are replicated.
  """
  replicated = NamedSharding(mesh, P())

  def one(x):
    if _is_var(x):
      axes = x.get_metadata().get("axes")
      shape = getattr(x.get_value(), "shape", ())
      spec = P() if axes is None else logical_spec(axes, shape, mesh, rules)
      return x.replace(NamedSharding(mesh, spec))
    return replicated

  return jax.tree.map(one, state, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, ndim: int = 2, *, batch_dim: int = 0,
                   rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> NamedSharding:
  """Shards dim `batch_dim` (the examples) over the mesh axes of the "batch" rule."""
  spec = [None] * ndim
  axes = _as_tuple(dict(rules).get("batch"))
  spec[batch_dim] = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, P(*spec))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, leading_dims: int = 1,
                rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> dict[str, jax.Array]:
  """This process's batch -> global arrays sharded on the batch axis.

  Arrays are [B, ...], or [A, B, ...] with leading_dims=2 (micro-batches for gradient
  accumulation); B is split over the "batch" mesh axes. With several processes each passes its
  own B examples and the global batch is their concatenation. 0-d arrays are replicated.
  """
  bdim = leading_dims - 1
  n_shards = math.prod(mesh.shape[a] for a in _as_tuple(dict(rules).get("batch")))
  multi = jax.process_count() > 1
  out = {}
  for k, v in batch.items():
    v = np.asarray(v) if multi or not isinstance(v, jax.Array) else v
    if v.ndim <= bdim:
      sh = NamedSharding(mesh, P())
    else:
      sh = batch_sharding(mesh, v.ndim, batch_dim=bdim, rules=rules)
      b = v.shape[bdim] * (jax.process_count() if multi else 1)
      if b % n_shards:
        raise ConfigError(f"batch array {k!r} has {b} examples in the global batch (shape "
                          f"{v.shape} in each of {jax.process_count()} process(es)), not "
                          f"divisible by the {n_shards} data-parallel shards (mesh.data * "
                          f"mesh.fsdp); make the global batch size a multiple of {n_shards}")
    out[k] = jax.make_array_from_process_local_data(sh, v) if multi else jax.device_put(v, sh)
  return out


# --------------------------------------------------------------------------------------------
# Activation constraints
# --------------------------------------------------------------------------------------------

_CTX: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "safemoe_mesh_rules", default=None)


@contextlib.contextmanager
def use_mesh_rules(mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]]) -> Iterator[None]:
  """Activates `constrain` (at trace time) and sets `mesh` as JAX's current mesh, which also
  keys jit's cache: a function traced outside the block is retraced inside it."""
  token = _CTX.set((mesh, tuple(rules)))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _CTX.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical axis names; the identity outside use_mesh_rules."""
  ctx = _CTX.get()
  if ctx is None:
    return x
  mesh, rules = ctx
  return jax.lax.with_sharding_constraint(
      x, NamedSharding(mesh, logical_spec(logical_axes, x.shape, mesh, rules)))


# --------------------------------------------------------------------------------------------
# Multi-process
# --------------------------------------------------------------------------------------------

_MULTI_PROCESS_ENV = {  # variable -> predicate on its value that means "several processes"
    "SAFEMOE_DISTRIBUTED": lambda v: v == "1",  # launch/tpu_vm.sh: auto-detect from the TPU VM
    "JAX_COORDINATOR_ADDRESS": bool,  # explicit jax.distributed setup
    "SLURM_NTASKS": lambda v: int(v) > 1,  # SLURM job with several tasks
    "OMPI_COMM_WORLD_SIZE": lambda v: int(v) > 1,  # mpirun
    "TPU_WORKER_HOSTNAMES": lambda v: "," in v,  # multi-host TPU pod slice
    "MEGASCALE_COORDINATOR_ADDRESS": bool,  # multi-slice TPU
}


def multi_process_env() -> str | None:
  """The environment variable that shows this is one of several processes, if any."""
  for var, pred in _MULTI_PROCESS_ENV.items():
    v = os.environ.get(var)
    try:
      if v and pred(v):
        return var
    except ValueError:
      continue
  return None


def initialize_distributed(force: bool = False, **kwargs) -> tuple[int, int]:
  """jax.distributed.initialize() when several processes run (see _MULTI_PROCESS_ENV) or
  `force`; call before any other JAX work. Idempotent. Returns (process index, count)."""
  why = "force=True" if force else multi_process_env()
  if why and not jax.distributed.is_initialized():
    # JAX reads the coordinator from JAX_COORDINATOR_ADDRESS but not the process count and id:
    # launch/local_multihost.sh (and any launcher without a cluster JAX detects) sets these.
    for var, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
      if os.environ.get(var) and key not in kwargs:
        kwargs[key] = int(os.environ[var])
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed initialised (%s): process %d of %d, %d local / %d global devices",
             why, jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
  return jax.process_index(), jax.process_count()

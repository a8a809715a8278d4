"""Trained groups on disk: safetensors artifacts (experts, router) written atomically and never
with a non-finite array, loaded with shape checks; checksums for Orbax checkpoints.

Arrays may span several processes (multi-host): `host` is the one way to bring one to this host,
an all-gather when no process holds all of it, so every process must call it (a collective);
a checksum is a jitted reduction to a replicated scalar, never a copy of the state."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import numpy as st  # st.save_file: looked up per call (tests stub it)

from safemoe_jax.core.config import ConfigError
from safemoe_jax.io import paths
from safemoe_jax.errors import SafeMoEError


def host(x) -> np.ndarray:
  """x on this host as numpy. An array no process holds whole (sharded across processes) is
  all-gathered: a collective, so every process must call this for the same arrays."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def flat_arrays(tree) -> dict[str, np.ndarray]:
  """A group's state -> flat {name: array} on this host (for safetensors artifacts); a collective
  across processes, see `host`."""
  flat = {}
  for path, v in nnx.to_flat_state(tree):
    flat[".".join(str(p) for p in path)] = host(v.get_value() if isinstance(v, nnx.Variable)
                                                else v)
  return flat


class StorageError(SafeMoEError, RuntimeError):
  """A checkpoint or artifact could not be written (disk full, quota, storage gone)."""


class NonFiniteError(SafeMoEError, FloatingPointError):
  """A loss, gradient, update or array about to be saved is NaN or infinite."""


def nonfinite_names(flat: dict[str, np.ndarray]) -> list[str]:
  """Names of the floating-point arrays with a NaN or an infinity."""
  return [k for k, v in flat.items()
          if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all()]


def check_finite(flat: dict[str, np.ndarray], what: str) -> None:
  """Refuses to write a non-finite array: a NaN checkpoint or artifact would look trained."""
  if bad := nonfinite_names(flat):
    raise NonFiniteError(f"refusing to write {what}: {len(bad)} array(s) hold NaN or inf "
                         f"({bad[:4]}); nothing was written. Lower the learning rate or check "
                         f"the optimiser settings, then run again")


def save_group(path: Path, state, meta: dict, write: bool = True) -> None:
  """Writes a group's state as safetensors, atomically. Every process calls it (the arrays are
  gathered collectively); only those with `write` write the file."""
  arrays = flat_arrays(state)
  if not write:
    return
  check_finite(arrays, str(path))
  if not paths.is_local(path):  # written locally, then copied whole (an atomic object write)
    try:
      with tempfile.TemporaryDirectory() as d:
        st.save_file(arrays, f"{d}/a", metadata={"safemoe": json.dumps(meta)})
        paths.as_path(path).write_bytes(Path(f"{d}/a").read_bytes())
    except Exception as e:
      raise StorageError(f"could not write {path} ({type(e).__name__}: {e}); the phase's last "
                         f"checkpoint is intact. Fix the storage, then run the same command "
                         f"again") from e
    return
  tmp = path.with_suffix(".tmp")
  try:
    st.save_file(arrays, str(tmp), metadata={"safemoe": json.dumps(meta)})
    os.replace(tmp, path)
  except Exception as e:  # a full disk is a SafetensorError, not an OSError
    tmp.unlink(missing_ok=True)
    raise StorageError(f"could not write {path} ({type(e).__name__}: {e}); nothing was written "
                       f"in its place and the phase's last checkpoint is intact. Free space or "
                       f"fix the storage, then run the same command again") from e


def load_group(path: Path, state) -> None:
  """Load a safetensors artifact into a group's state in place, with shape checks."""
  if paths.is_local(path):
    assign(state, st.load_file(str(path)), path)
  else:
    assign(state, st.load(paths.as_path(path).read_bytes()), path)


def assign(state, arrays: dict[str, np.ndarray], path) -> None:
  """Set a group's state in place from flat {name: array}, with name and shape checks."""
  for p, v in nnx.to_flat_state(state):
    key = ".".join(str(x) for x in p)
    if key not in arrays:
      raise ConfigError(f"{path} has no tensor {key!r}: it was written for a different model or "
                        f"expert configuration (found {sorted(arrays)[:8]})")
    if arrays[key].shape != v[...].shape:
      raise ConfigError(f"{path}: tensor {key!r} has shape {arrays[key].shape}, this run expects "
                        f"{v[...].shape} (different number of experts, rank or model?)")
    old = v.get_value()
    if isinstance(old, jax.Array) and isinstance(old.sharding, jax.sharding.NamedSharding):
      a = np.asarray(arrays[key], old.dtype)  # keeps the layout, also one spanning processes
      v.set_value(jax.make_array_from_callback(a.shape, old.sharding, lambda i, a=a: a[i]))
    else:
      v[...] = jnp.asarray(arrays[key])


def to_host(tree):
  """A pytree of (possibly multi-host) arrays on this host; a collective, see `host`."""
  return jax.tree.map(host, tree)


@jax.jit
def _checksum_fn(tree):
  def leaf(x):
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    u = (x.astype(jnp.uint32) if x.dtype == jnp.bool_ else
         jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32))
    i = jnp.arange(u.size, dtype=jnp.uint32).reshape(u.shape)
    return jnp.sum(u * (2 * i + 1), dtype=jnp.uint32)  # wraps mod 2**32: exact, order-free
  return jax.tree.map(leaf, tree)


def checksums(tree) -> list[int]:
  """Per leaf, sum_i bits(x_i) * (2i + 1) mod 2**32: any changed element changes it (odd
  weights are invertible), on any mesh. Orbax has no checksum of its own: a checkpoint with
  overwritten bytes restores silently, so one is stored with each checkpoint and checked."""
  return [int(host(v)) for v in jax.tree.leaves(_checksum_fn(tree))]

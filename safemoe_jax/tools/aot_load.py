"""The load, compiled ahead of time: a program that makes every array of the model (base,
experts, router) in the trainer's placement (io/shards.abstract_sharded), so the compiler lays out
each chip's shards (tile padding included) and reports its bytes, where summing shard shapes
(`aot._shard_bytes`) cannot see the padding. For TPU topologies (tools/aot.py) or any devices."""

from __future__ import annotations

import math
import time
from typing import Any

import jax
from flax import nnx

from safemoe_jax.core import sharding as S
from safemoe_jax.core.config import ExpertsConfig, ModelConfig, ObjectiveConfig, RouterConfig
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.io import shards
from safemoe_jax.tools.bench import _memory_analysis


def aot_load(mcfg: ModelConfig, ecfg: ExpertsConfig, rcfg: RouterConfig, mesh, rules
             ) -> dict[str, Any]:
  """Compiles the making of the model's state with the trainer's shardings; bytes per chip."""
  _, state, _ = shards.abstract_sharded(mcfg, ecfg, rcfg, mesh, rules)
  out_sh = S.state_shardings(state, mesh, rules)

  def make():
    return nnx.state(SafeMoELM(mcfg, ecfg, rcfg, rngs=nnx.Rngs(0)))

  t0 = time.perf_counter()
  with S.use_mesh_rules(mesh, rules):
    compiled = jax.jit(make, out_shardings=out_sh).lower().compile()
  mem = _memory_analysis(compiled) or {}
  unpadded = sum(math.prod(v.get_value().sharding.shard_shape(v.get_value().shape))
                 * v.get_value().dtype.itemsize for _, v in nnx.to_flat_state(
                     jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  state, out_sh)))
  return {"load_bytes_per_chip": mem.get("output", unpadded), "load_temp_bytes": mem.get("temp", 0),
          "load_bytes_per_chip_unpadded": int(unpadded),
          "load_compile_s": round(time.perf_counter() - t0, 1)}


def objective_name(o: ObjectiveConfig | None) -> str:
  """phase 2's terms in a word: nll, nll+npo+retain(1), ..."""
  if o is None or o.plain:
    return "nll"
  return "+".join(["nll"] + ([o.contrast] if o.contrast != "none" else []) +
                  ([f"retain({o.retain_coef:g})"] if o.retain_coef > 0 else []))

"""Loading a base model sharded from the start (io/shards.py), measured: a random checkpoint of a
real model's shapes (default Llama-3.2-1B) written as sharded safetensors, then loaded over N
devices in a fresh process; peak host memory (ru_maxrss) against the checkpoint's size, and the
bytes each device holds.

On a CPU host the "devices" live in host memory, so the loaded model itself (1x the checkpoint)
is part of the peak: what sharded loading adds on top is what this measures (a load through
one full host copy would be about 2x, plus a full device copy on one device).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from safemoe_jax.core import sharding as S
from safemoe_jax.io import base as B
from safemoe_jax.io import weights as W
from safemoe_jax.log import get_logger

log = get_logger(__name__)

# Llama-3.2-1B(-Instruct) config.json (the fields we read).
LLAMA32_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
              "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 131072, "tie_word_embeddings": True,
              "rope_theta": 500000.0, "hidden_act": "silu",
              "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}

_ST_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def write_random_checkpoint(folder: Path, hf_config: dict, dtype: str = "bfloat16",
                            shard_bytes: int = 1 << 30, seed: int = 0) -> int:
  """config.json + model-0000i-of-0000n.safetensors + the index, HF's layout, random N(0, 0.02)
  weights (norms 1); tensors generated and written one at a time. Returns the tensors' bytes."""
  folder.mkdir(parents=True, exist_ok=True)
  cfg = W.config_from_hf(hf_config)
  dt = W._np_dtype(dtype)
  tensors: list[tuple[str, tuple[int, ...]]] = []
  for key, shape in W.expected_shapes(cfg).items():
    layered = key.startswith("layers.")
    for i in range(cfg.num_layers) if layered else [None]:
      s = shape[1:] if layered else shape
      tensors.append((W._hf_name(key, i), s[::-1] if len(s) == 2 and key != "embed" else s))
  shards, cur, size = [], [], 0
  for name, shape in tensors:
    n = math.prod(shape) * dt.itemsize
    if cur and size + n > shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append((name, shape))
    size += n
  shards.append(cur)
  rng = np.random.default_rng(seed)
  weight_map, total = {}, 0
  for k, group in enumerate(shards):
    fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    header, off = {}, 0
    for name, shape in group:
      n = math.prod(shape) * dt.itemsize
      header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
      off += n
      weight_map[name] = fname
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(folder / fname, "wb") as f:
      f.write(len(h).to_bytes(8, "little") + h)
      for name, shape in group:
        x = (np.ones(shape, np.float32) if "norm" in name else
             rng.standard_normal(shape, np.float32) * 0.02)
        f.write(x.astype(dt).tobytes())
        total += x.size * dt.itemsize
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}))
  (folder / "config.json").write_text(json.dumps(hf_config))
  return total


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def timed_sharded_load(folder: str, dtype: str, mesh, rules, ecfg=None, rcfg=None, **kw):
  """(model, its arrays, seconds, bytes per device): the folder loaded sharded over `mesh` as
  training loads it, timed until every array is on its devices."""
  t0 = time.perf_counter()
  base = B.load_base(folder, param_dtype=dtype, with_tokenizer=False, lazy=True, **kw)
  model = base.sharded_model(ecfg, rcfg, 0, mesh, rules)
  leaves = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model))]
  jax.block_until_ready(leaves)
  seconds = time.perf_counter() - t0
  per_device: dict[str, int] = {}
  for x in leaves:
    for sh in x.addressable_shards:
      per_device[str(sh.device)] = per_device.get(str(sh.device), 0) + sh.data.nbytes
  return model, leaves, seconds, per_device


def measure_child(folder: str, dtype: str, fsdp: int) -> dict[str, Any]:
  """In a process of its own: load the folder sharded over every device; memory figures."""
  jax.numpy.zeros(1).block_until_ready()  # the runtime's own memory belongs to the baseline
  before = rss_mb()
  mesh = S.make_mesh(S.MeshConfig(data=-1, fsdp=fsdp))
  _, leaves, seconds, per_device = timed_sharded_load(folder, dtype, mesh, S.DEFAULT_RULES)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  return {"devices": jax.device_count(), "mesh": dict(mesh.shape), "load_s": seconds,
          "rss_before_mb": before, "rss_after_mb": rss_mb(), "peak_rss_mb": peak,
          "model_bytes": sum(x.nbytes for x in leaves), "per_device_bytes": per_device}


def run_load_bench(folder: Path, devices: int = 8, dtype: str = "bfloat16",
                   write: bool = True, hf_config: dict | None = None) -> dict[str, Any]:
  hf_config = hf_config or LLAMA32_1B
  t0 = time.perf_counter()
  if write or not (folder / "config.json").exists():
    log.info(f"writing a random {dtype} checkpoint of the model's shapes to {folder}")
    write_random_checkpoint(folder, hf_config, dtype)
  write_s = time.perf_counter() - t0
  ckpt = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  code = ("import json, sys; from safemoe_jax.tools.bench_load import measure_child; "
          f"print('RESULT', json.dumps(measure_child({str(folder)!r}, {dtype!r}, {devices})))")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
  if r.returncode or not line:
    raise RuntimeError(f"the load process failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
  m = json.loads(line[0][7:])
  added = m["peak_rss_mb"] - m["rss_before_mb"]
  per_dev = list(m["per_device_bytes"].values())
  doc = {"checkpoint_dir": str(folder), "checkpoint_bytes": ckpt, "dtype": dtype,
         "write_s": write_s, **m,
         "peak_added_over_checkpoint": added * 2**20 / ckpt,
         "per_device_max_over_checkpoint": max(per_dev) / ckpt,
         "per_device_min_over_checkpoint": min(per_dev) / ckpt}
  gib = lambda b: f"{b / 2**30:.3f} GiB"
  doc["table"] = [
      f"checkpoint: {gib(ckpt)} ({dtype}, {len(list(folder.glob('*.safetensors')))} files)",
      f"loaded over {m['devices']} devices (mesh {m['mesh']}) in {m['load_s']:.1f} s",
      f"host RSS before loading {m['rss_before_mb'] / 1024:.3f} GiB, peak "
      f"{m['peak_rss_mb'] / 1024:.3f} GiB: loading added {added / 1024:.3f} GiB = "
      f"{doc['peak_added_over_checkpoint']:.3f}x the checkpoint (the devices' shards included)",
      f"per device: {gib(min(per_dev))} .. {gib(max(per_dev))} = "
      f"{doc['per_device_min_over_checkpoint']:.4f} .. {doc['per_device_max_over_checkpoint']:.4f}"
      f"x the checkpoint (1/{m['devices']} = {1 / m['devices']:.4f})"]
  return doc

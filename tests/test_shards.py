"""Sharded from the start (io/shards.py): the model built abstractly, each base parameter read
shard by shard from the checkpoint, equals the eagerly loaded model bit for bit; slices read from
safetensors (in chunks) and GGUF equal slices of the whole tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from safemoe_jax.core import sharding as S
from safemoe_jax.core.config import ExpertsConfig, RouterConfig
from safemoe_jax.io import base as B
from safemoe_jax.io import shards, weights
from tests.test_weights import _write_gguf

ECFG = ExpertsConfig(num_experts=3, rank=4, alpha=8.0, targets=("q", "v", "down"))
RCFG = RouterConfig(form="mlp", mlp_hidden=8, init_std=0.05)


def _flat(model) -> dict[str, np.ndarray]:
  return {".".join(map(str, k)): np.asarray(v.get_value())
          for k, v in nnx.to_flat_state(nnx.state(model))}


@pytest.mark.parametrize("fixture,dtype", [("tiny_llama", "float32"), ("tiny_qwen2", "bfloat16"),
                                           ("gguf", "float32")])
def test_sharded_model_equals_the_eager_model_bit_for_bit(fixture, dtype, request, tmp_path):
  path = (_write_gguf(request.getfixturevalue("tiny_llama_tied"), tmp_path / "t.gguf")
          if fixture == "gguf" else request.getfixturevalue(fixture).path)
  eager = B.load_base(path, param_dtype=dtype, with_tokenizer=False)
  lazy = B.load_base(path, param_dtype=dtype, with_tokenizer=False, lazy=True)
  assert lazy.params == {} and lazy.config == eager.config
  mesh = S.make_mesh(S.MeshConfig())
  want = _flat(eager.model(ECFG, RCFG, seed=7))
  got = _flat(lazy.sharded_model(ECFG, RCFG, 7, mesh, S.DEFAULT_RULES))
  assert got.keys() == want.keys()
  for k in want:  # base weights, experts (A random, B zero) and router: the same bits
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert any(k.startswith("router.") and np.abs(want[k]).max() > 0 for k in want)


def test_reader_slices_equal_slices_of_the_whole_tensor(tiny_llama, monkeypatch):
  reader = shards.open_reader(tiny_llama.path)
  _, full = weights.load_hf_checkpoint(tiny_llama.path)
  rows = weights.StTensor.rows
  # 100-byte chunks: several reads per slice, so the chunk joins are exercised too
  monkeypatch.setattr(weights.StTensor, "rows",
                      lambda self, r=slice(None), c=slice(None): rows(self, r, c, chunk_bytes=100))
  cases = {"embed": (slice(64, 128), slice(16, 48)), "lm_head": (slice(0, 32), slice(128, 256)),
           "layers.q": (slice(1, 2), slice(32, 64), slice(0, 16)),
           "layers.down": (slice(0, 2), slice(64, 128), slice(0, 32)),
           "layers.attn_norm": (slice(0, 1), slice(32, 64)), "final_norm": (slice(16, 32),)}
  for key, idx in cases.items():
    np.testing.assert_array_equal(reader.read(key, idx), full[key][idx], err_msg=key)
    np.testing.assert_array_equal(reader.read(key), full[key], err_msg=key)


def test_reader_refuses_a_checkpoint_that_does_not_match(tiny_llama, tmp_path):
  import shutil
  d = tmp_path / "m"
  shutil.copytree(tiny_llama.path, d)
  cfg = (d / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
  (d / "config.json").write_text(cfg)
  with pytest.raises(weights.WeightsError, match="model.layers.2.*missing"):
    shards.open_reader(d)


def test_bench_load_writes_a_sharded_checkpoint_the_reader_loads(tmp_path):
  from safemoe_jax.tools import bench_load
  hf = {**bench_load.LLAMA32_1B, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
  n = bench_load.write_random_checkpoint(tmp_path, hf, "bfloat16", shard_bytes=8192)
  files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert n == sum(p.stat().st_size for p in tmp_path.glob("*.safetensors")) - sum(
      8 + int.from_bytes((tmp_path / f).read_bytes()[:8], "little") for f in files)
  _, full = weights.load_hf_checkpoint(tmp_path, dtype="bfloat16")
  reader = shards.open_reader(tmp_path, "bfloat16")
  for k, v in full.items():
    np.testing.assert_array_equal(reader.read(k), v, err_msg=k)


# A Llama shape every mesh axis of 8 divides, written as sharded safetensors with an index.
SMALL_HF = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8,
            "head_dim": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 128,
            "tie_word_embeddings": False, "rope_theta": 10000.0, "hidden_act": "silu"}
MESHES = {"fsdp8": S.MeshConfig(data=1, fsdp=8), "tensor8": S.MeshConfig(data=1, tensor=8),
          "replicated8": S.MeshConfig(data=8), "2x2x2": S.MeshConfig(data=2, fsdp=2, tensor=2)}


class _Counting:
  """A file object that counts the bytes its reads return."""

  def __init__(self, fh, counter: list[int]):
    self.fh, self.counter = fh, counter

  def read(self, n=-1):
    b = self.fh.read(n)
    self.counter[0] += len(b)
    return b

  def readinto(self, buf):
    n = self.fh.readinto(buf)
    self.counter[0] += n or 0
    return n

  def __getattr__(self, name):
    return getattr(self.fh, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.fh.close()


def _bytes_read_child(folder: str) -> None:
  import builtins
  import json
  import jax
  assert jax.device_count() == 8, jax.devices()
  tensor_bytes = json.loads((Path(folder) / "model.safetensors.index.json").read_text())[
      "metadata"]["total_size"]
  eager = B.load_base(folder, with_tokenizer=False)
  want = _flat(eager.model(ECFG, RCFG, seed=3))
  counter = [0]
  weights.open = lambda *a, **k: _Counting(builtins.open(*a, **k), counter)
  result = {}
  for name, mcfg in MESHES.items():
    lazy = B.load_base(folder, with_tokenizer=False, lazy=True)  # reads the headers only
    counter[0] = 0
    got = _flat(lazy.sharded_model(ECFG, RCFG, 3, S.make_mesh(mcfg), S.DEFAULT_RULES))
    result[name] = counter[0] / tensor_bytes
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
    # Two "hosts" of 4 devices each: what each reads for its block against its share (the
    # union of its devices' slices), so a host holding half the columns reads half the bytes.
    reader = lazy.reader
    _, _, flat_sh = shards.abstract_sharded(lazy.config, ECFG, RCFG, S.make_mesh(mcfg),
                                            S.DEFAULT_RULES)
    for h, host_devices in enumerate((jax.devices()[:4], jax.devices()[4:])):
      counter[0], share = 0, 0
      for path, sh in flat_sh.items():
        key = ".".join(map(str, path))
        if key not in reader.shapes:
          continue
        shape = reader.shapes[key]
        idx = [i for d, i in sh.devices_indices_map(shape).items() if d in host_devices]
        reader.read(key, shards.host_box(idx, shape))
        mine = np.zeros(shape, bool)
        for i in idx:
          mine[i] = True
        share += int(mine.sum()) * reader.dtype.itemsize
      result[f"{name}/host{h}"] = counter[0] / share
  print("RATIOS", json.dumps(result))


def test_loading_reads_each_byte_once_per_host(tmp_path):
  """One host, 8 devices, four meshes (parameters split on rows, on columns, both, or replicated
  over 8 devices): the bytes read from the checkpoint are at most 1.1x its share (here the
  whole checkpoint), and the sharded model equals the eager one. Two halves of the devices
  taken as two hosts each read at most 1.1x their own share."""
  import json
  import os
  import subprocess
  import sys
  from safemoe_jax.tools.bench_load import write_random_checkpoint
  write_random_checkpoint(tmp_path / "ckpt", SMALL_HF, "float32", shard_bytes=200_000)
  assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 1
  root = Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(root),
                                                               os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-c", "from tests.test_shards import _bytes_read_child; "
                      f"_bytes_read_child({str(tmp_path / 'ckpt')!r})"], cwd=root, env=env,
                     capture_output=True, text=True, timeout=300)
  line = [l for l in r.stdout.splitlines() if l.startswith("RATIOS ")]
  assert r.returncode == 0 and line, r.stdout[-2000:] + r.stderr[-4000:]
  ratios = json.loads(line[0][7:])
  assert set(ratios) == set(MESHES) | {f"{m}/host{h}" for m in MESHES for h in (0, 1)}
  for name, ratio in ratios.items():
    assert 1.0 <= ratio <= 1.1, ratios


def test_a_column_slice_reads_its_own_bytes(tiny_llama, monkeypatch):
  """A host whose devices hold half of a tensor's columns reads about half of it."""
  import builtins
  reader = shards.open_reader(tiny_llama.path)
  _, full = weights.load_hf_checkpoint(tiny_llama.path)
  counter = [0]
  monkeypatch.setattr(weights, "open", lambda *a, **k: _Counting(builtins.open(*a, **k), counter),
                      raising=False)
  key = "layers.down"  # ours (L, mlp, embed) = the source's (embed, mlp): mlp is its columns
  L, F, D = full[key].shape
  got = reader.read(key, (slice(None), slice(0, F // 2), slice(None)))
  np.testing.assert_array_equal(got, full[key][:, :F // 2])
  assert counter[0] == full[key][:, :F // 2].nbytes, (counter[0], full[key].nbytes)

"""Sharded from the start (io/shards.py): the model built abstractly, each base parameter read
shard by shard from the checkpoint, equals the eagerly loaded model bit for bit; slices read from
safetensors (in chunks) and GGUF equal slices of the whole tensor."""

from __future__ import annotations

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

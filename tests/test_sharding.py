"""Sharding: logical-axis rules, mesh validation, and 8-device training equal to 1 device.

The multi-device test runs in a subprocess with 8 fake CPU devices (XLA_FLAGS is read when JAX
starts, so this pytest process keeps its single device).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from safemoe_jax.core import sharding as S
from safemoe_jax.core.config import ConfigError, ExpertsConfig, RouterConfig, from_dict, to_dict
from safemoe_jax.core.model import SafeMoELM, split_groups
from safemoe_jax.train.steps import make_train_step
from tests.test_experts import ALL, TINY, randomize

RULES = S.DEFAULT_RULES
MESH8 = AbstractMesh((2, 2, 2), S.MESH_AXES)
# TINY with a vocabulary that tensor=2 divides, so every weight really gets sharded.
CFG = dataclasses.replace(TINY, vocab_size=96)


def make_model(dropout: float = 0.1) -> SafeMoELM:
  ecfg = ExpertsConfig(num_experts=2, rank=4, alpha=6.0, targets=ALL, dropout=dropout)
  rcfg = RouterConfig(form="mlp", mlp_hidden=16, init_std=0.1)
  m = SafeMoELM(CFG, ecfg, rcfg, rngs=nnx.Rngs(0))
  # Trained-LoRA scale. At std 0.3 the deltas dwarf the base weights and the net amplifies float
  # noise: even data=8 (only kernel shapes differ) then moves logits by ~4e-6.
  randomize(m, 1, std=0.05)
  return m


def test_logical_spec_maps_dedups_and_replicates_indivisible(caplog):
  spec = lambda axes, shape, rules=RULES: S.logical_spec(axes, shape, MESH8, rules)
  assert spec(("layers", "embed", "q_heads"), (3, 32, 32)) == P(None, "fsdp", "tensor")
  assert spec(("layers", "experts", "rank", "kv_heads"), (3, 2, 4, 16)) == P(None, None, None,
                                                                              "tensor")
  # fsdp is taken by the batch, so embed is not sharded a second time on it.
  assert spec(("batch", "seq", "embed"), (4, 12, 32)) == P(("data", "fsdp"))
  assert spec(("batch", "seq", "vocab"), (4, 12, 96)) == P(("data", "fsdp"), None, "tensor")
  assert spec(("norm",), (32,)) == P() and spec((), ()) == P()
  assert spec(("unknown", None), (8, 8)) == P()
  with caplog.at_level(logging.INFO, logger="safemoe_jax.core.sharding"):
    assert spec(("vocab", "embed"), (97, 32)) == P(None, "fsdp")  # 97 % 2: replicated
    assert spec(("vocab", "embed"), (97, 32)) == P(None, "fsdp")
  assert sum("'vocab' of size 97" in r.getMessage() for r in caplog.records) == 1  # once
  assert spec(("layers", "embed"), (3, 32, 32)) == P()  # rank mismatch: replicated, not an error
  wide = (("embed", ("fsdp", "tensor")), ("mlp", "tensor"))
  assert spec(("embed", "mlp"), (32, 48), wide) == P(("fsdp", "tensor"))  # tensor used once
  assert spec(("mlp", "embed"), (48, 32), wide) == P("tensor", "fsdp")  # only tensor dropped


def test_mesh_config_validation_and_make_mesh():
  assert S.MeshConfig(fsdp=2, tensor=2).shape(8) == (2, 2, 2)
  assert S.MeshConfig(data=4, tensor=2).shape(8) == (4, 1, 2)
  with pytest.raises(ConfigError, match=r"3 \* 1 \* 2 = 6, but 8 devices.*mesh.data=-1"):
    S.MeshConfig(data=3, tensor=2).validate(8)
  with pytest.raises(ConfigError, match=r"3 \* 1 = 3 does not divide the 8"):
    S.MeshConfig(fsdp=3).validate(8)
  with pytest.raises(ConfigError, match="mesh.tensor must be >= 1"):
    S.MeshConfig(tensor=0).validate(8)
  with pytest.raises(ConfigError, match=r"mesh axes \['model'\]"):
    S.MeshConfig(rules=(("embed", "model"),)).validate()
  with pytest.raises(ConfigError, match="'embed' more than once"):
    S.MeshConfig(rules=(("embed", "fsdp"), ("embed", None))).validate()
  n = jax.device_count()
  with pytest.raises(ConfigError, match=f"{2 * n} does not divide|{n} devices"):
    S.make_mesh(S.MeshConfig(fsdp=2 * n))
  mesh = S.make_mesh(S.MeshConfig(), devices=jax.devices())
  assert dict(mesh.shape) == {"data": n, "fsdp": 1, "tensor": 1}


def test_mesh_config_round_trips_through_yaml_dicts():
  cfg = S.MeshConfig(fsdp=2, rules=(("batch", ("data", "fsdp")), ("embed", "fsdp"),
                                    ("layers", None)))
  assert from_dict(S.MeshConfig, to_dict(cfg)) == cfg  # lists of lists back to the tuples
  with pytest.raises(ConfigError, match="expected 2 items"):
    from_dict(S.MeshConfig, {"rules": [["embed", "fsdp", "tensor"]]})


def test_state_shardings_cover_params_and_optimizer_state():
  m = make_model()
  mesh = S.make_mesh(S.MeshConfig())
  for state in split_groups(m)[1:]:  # every parameter's axes metadata matches its rank
    for _, v in nnx.to_flat_state(state):
      assert len(v.get_metadata()["axes"]) == v.get_value().ndim, v
  _, params, frozen = make_train_step(m, "experts", optax.adamw(1e-3), "oracle")
  opt = optax.adamw(1e-3).init(params)
  sh = S.state_shardings((params, opt, frozen), mesh, RULES)
  assert jax.tree.structure((params, opt, frozen)) == jax.tree.structure(sh)
  assert sh[1][0].count.spec == P()  # plain arrays are replicated
  assert sh[1][0].mu["experts"]["A_q"].get_value().spec == P(None, None, "fsdp")
  placed = jax.device_put((params, opt, frozen), sh)
  assert jax.tree.structure(placed) == jax.tree.structure((params, opt, frozen))
  odd = {"a": jnp.zeros(3), "v": nnx.Variable(jnp.zeros(4))}  # no axes metadata
  out = S.state_shardings(odd, mesh, RULES)
  assert out["a"].spec == P() and out["v"].get_value().spec == P()


# Every parameter's PartitionSpec under the default rules on a (data 2, fsdp 2, tensor 2) mesh,
# written out by hand: Megatron-style column-parallel q/k/v/gate/up (input width on fsdp, output
# on tensor), row-parallel o/down; the vocabulary on tensor; LoRA A/B follow the weight they
# adapt, with the layer, expert and rank axes replicated; norms and the router's hidden width
# replicated. A rule mapped to the wrong mesh axis computes the same numbers on any mesh (GSPMD
# inserts the collectives), so only a table like this one sees it.
_COL, _ROW = P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp")
EXPECTED_SPECS = {
    "embed": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"), "final_norm": P(),
    "layers/attn_norm": P(), "layers/mlp_norm": P(),
    "layers/q": _COL, "layers/k": _COL, "layers/v": _COL, "layers/o": _ROW,
    "layers/gate": _COL, "layers/up": _COL, "layers/down": _ROW,
    "layers/q_bias": P(None, "tensor"), "layers/k_bias": P(None, "tensor"),
    "layers/v_bias": P(None, "tensor"),
    **{f"experts/A_{t}": P(None, None, "fsdp") for t in ("q", "k", "v", "gate", "up")},
    "experts/A_o": P(None, None, "tensor"), "experts/A_down": P(None, None, "tensor"),
    **{f"experts/B_{t}": P(None, None, None, "tensor") for t in ("q", "k", "v", "gate", "up")},
    "experts/B_o": P(None, None, None, "fsdp"), "experts/B_down": P(None, None, None, "fsdp"),
    "router/w_in": P(None, "fsdp"), "router/b_in": P(), "router/w_out": P(), "router/b_out": P(),
}


def test_default_rules_give_every_parameter_its_expected_spec_on_a_2x2x2_mesh():
  m = nnx.eval_shape(lambda: SafeMoELM(  # shapes and axes only: nothing is computed
      dataclasses.replace(CFG, qkv_bias=True),
      ExpertsConfig(num_experts=2, rank=4, alpha=6.0, targets=ALL),
      RouterConfig(form="mlp", mlp_hidden=16), rngs=nnx.Rngs(0)))
  got = {}
  for state in split_groups(m)[1:]:  # router, experts, base
    for path, sh in nnx.to_flat_state(S.state_shardings(state, MESH8, S.DEFAULT_RULES)):
      got["/".join(map(str, path))] = sh.get_value().spec
  assert got.keys() == EXPECTED_SPECS.keys()
  assert {k: v for k, v in got.items() if v != EXPECTED_SPECS[k]} == {}


def test_batch_sharding_and_constrain_outside_rules_is_identity():
  mesh = S.make_mesh(S.MeshConfig())
  assert S.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
  assert S.batch_sharding(mesh, 3, batch_dim=1).spec == P(None, ("data", "fsdp"), None)
  x = jnp.ones((2, 3, 4))
  assert S.constrain(x, ("batch", "seq", "embed")) is x
  b = S.shard_batch({"ids": np.zeros((2, 5), np.int32), "n": np.int32(3)}, mesh)
  assert isinstance(b["ids"], jax.Array) and b["n"].sharding.spec == P()


def test_initialize_distributed_only_when_multi_process(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
  for var in S._MULTI_PROCESS_ENV:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job is a single process
  assert S.initialize_distributed() == (0, 1) and not calls
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  assert S.multi_process_env() == "JAX_COORDINATOR_ADDRESS"
  S.initialize_distributed()
  S.initialize_distributed()  # idempotent
  assert len(calls) == 1


# --------------------------------------------------------------------------------------------
# 8 devices (data=2, fsdp=2, tensor=2) vs 1 device: same logits, losses and updated state.
# --------------------------------------------------------------------------------------------


def _run_on(mesh_cfg: S.MeshConfig, devices) -> dict:
  """Forward logits and one jitted step per group, with everything placed by our shardings."""
  mesh = S.make_mesh(mesh_cfg, devices)
  model = make_model()
  rng = np.random.default_rng(0)
  B, T = 4, 12
  mask = np.ones((B, T), np.int32)
  mask[1, :3] = 0  # left padding
  mask[2, -2:] = 0  # right padding
  prompt = mask.copy()
  prompt[:, T // 2:] = 0
  batch = S.shard_batch({"input_ids": rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32),
                         "attention_mask": mask, "prompt_mask": prompt,
                         "loss_mask": mask * (1 - prompt),
                         "domains": np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]}, mesh)
  b_sh = jax.tree.map(lambda x: x.sharding, batch)
  out: dict = {}
  graphdef, *groups = split_groups(model)
  g_sh = S.state_shardings(tuple(groups), mesh, RULES)
  groups = jax.device_put(tuple(groups), g_sh)
  fwd = lambda g, b: nnx.merge(graphdef, *g)(b["input_ids"], b["attention_mask"])[0]
  with S.use_mesh_rules(mesh, RULES):
    logits = jax.jit(fwd, in_shardings=(g_sh, b_sh))(groups, batch)
  out["logits"], out["logits_spec"] = logits, logits.sharding.spec  # set by constrain()
  out["param_specs"] = [x.sharding.spec for x in jax.tree.leaves(groups)]
  # Gradients agree to ~1e-6 of each tensor's largest one, but Adam's first update
  # lr * g / (|g| + eps) has slope lr / eps near g = 0: with eps=1e-8 a near-cancelling element
  # (|g| ~ 2e-9) turns 1e-10 of noise into 4e-6. eps=1e-3 (>> most |g|) bounds the slope by 10.
  tx = optax.adamw(1e-2, eps=1e-3, weight_decay=0.01)
  for group, routing in (("router", "learned"), ("experts", "oracle")):
    step, params, frozen = make_train_step(model, group, tx, routing)
    opt = tx.init(params)
    p_sh, o_sh, f_sh = (S.state_shardings(t, mesh, RULES) for t in (params, opt, frozen))
    params, opt, frozen = jax.device_put((params, opt, frozen), (p_sh, o_sh, f_sh))
    key = jax.device_put(jax.random.key(0), NamedSharding(mesh, P()))
    with S.use_mesh_rules(mesh, RULES):
      jitted = jax.jit(step, in_shardings=(p_sh, o_sh, f_sh, b_sh, NamedSharding(mesh, P())),
                       out_shardings=(p_sh, o_sh, None))
      new_p, new_o, metrics = jitted(params, opt, frozen, batch, key)
    out[group] = (new_p, new_o, metrics)
    out[f"{group}_specs"] = [x.sharding.spec for x in jax.tree.leaves(new_p)]
  return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, out)


def _parity_child() -> None:
  assert jax.device_count() == 8, jax.devices()
  one = _run_on(S.MeshConfig(data=1), jax.devices()[:1])
  eight = _run_on(S.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())

  def close(a, b, what):  # float reassociation: rtol 1e-5, atol 1e-6 or 1e-5 of b's scale
    if a.dtype.kind in "biu":
      return np.testing.assert_array_equal(a, b, err_msg=what)
    atol = min(1e-6, 1e-5 * float(np.abs(b).max(initial=0.0)))  # tight on gradient-sized mu/nu
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=what)

  close(eight["logits"], one["logits"], "logits")
  assert eight["logits_spec"] == P(("data", "fsdp"), None, "tensor"), eight["logits_spec"]
  for group in ("router", "experts"):
    for what, a, b in zip(("params", "opt", "metrics"), eight[group], one[group]):
      assert jax.tree.structure(a) == jax.tree.structure(b), what
      for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        close(x, y, f"{group} {what} {jax.tree_util.keystr(path)}")
    assert not eight[group][2]["nonfinite"] and eight[group][2]["grad_norm"] > 0
    assert any(s != P() for s in eight[f"{group}_specs"]), f"{group}: nothing sharded"
  assert P("tensor", "fsdp") in eight["param_specs"]  # the embedding [vocab, embed]
  mesh = S.make_mesh(S.MeshConfig(data=2, fsdp=2, tensor=2))
  with pytest.raises(ConfigError, match="3 examples.*4 data-parallel shards"):
    S.shard_batch({"input_ids": np.zeros((3, 4), np.int32)}, mesh)
  print("PARITY OK")


@pytest.mark.slow
def test_eight_devices_train_like_one():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # keep XLA's warnings: we check for one below
  root = Path(__file__).resolve().parents[1]
  env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
  r = subprocess.run([sys.executable, "-c", "from tests.test_sharding import _parity_child; "
                      "_parity_child()"], cwd=root, env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0 and "PARITY OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]
  # The partitioner replicates a whole global array when our specs ask for a transition it cannot
  # do (e.g. a batch-sharded lookup into an fsdp-sharded embedding table).
  assert "Involuntary full rematerialization" not in r.stderr, r.stderr[-6000:]


def test_several_slices_get_a_mesh_whose_data_axis_crosses_them():
  """Multislice: only the data axis spans slices (DCN); fsdp and tensor stay inside a slice (ICI).
  jax.make_mesh refuses such devices; the one builder takes them (fake 2 x 8 devices here)."""
  import dataclasses as dc

  @dc.dataclass(frozen=True)
  class Dev:
    id: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"
    process_index: int = 0

  devices = [Dev(i, i // 8) for i in range(16)]
  assert S.num_slices(devices) == 2 and S.num_slices(jax.devices()) == 1
  grid = S.device_grid((4, 2, 2), devices)
  assert grid.shape == (4, 2, 2)
  sl = np.vectorize(lambda d: d.slice_index)(grid)
  for i in range(4):  # each data row lies in one slice; the slices alternate along data only
    assert len(set(sl[i].ravel())) == 1
  assert sorted(sl[:, 0, 0]) == [0, 0, 1, 1]
  assert sorted(d.id for d in grid.ravel()) == list(range(16))
  with pytest.raises(ConfigError, match="mesh.data=1 must be a multiple of 2"):
    S.device_grid((1, 16, 1), devices)  # fsdp across the slices' DCN: refused
  # one slice: the order of jax.make_mesh (the trainer's before), also for explicit devices
  n = jax.device_count()
  np.testing.assert_array_equal(S.make_mesh(S.MeshConfig(), jax.devices()).devices,
                                jax.make_mesh((n, 1, 1), S.MESH_AXES).devices)

"""The SafeMoE layer: invariants, parity with PEFT and with a naive per-expert reference."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from safemoe_jax.core import experts as ex
from safemoe_jax.core.config import ExpertsConfig, ModelConfig, RouterConfig
from safemoe_jax.core.model import SafeMoELM, split_groups
from safemoe_jax.train.steps import make_train_step
from tests.prereq import require_module
from tests.reference import ref_forward

TINY = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position_embeddings=64)
ALL = ("q", "k", "v", "o", "gate", "up", "down")


def batch(B=3, T=12, V=97, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, V, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, :3] = 0  # left padding
  mask[2, -2:] = 0  # right padding
  prompt = mask.copy()
  prompt[:, T // 2:] = 0
  loss = mask * (1 - prompt)
  return ids, mask, prompt, loss


def randomize(model: SafeMoELM, seed: int, groups=(ex.ExpertParam, ex.RouterParam), std=0.3):
  """Give the chosen groups random non-zero values (B is zero at init)."""
  key = jax.random.key(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Variable) and type(var) in groups:
      key, sub = jax.random.split(key)
      var[...] = std * jax.random.normal(sub, var[...].shape)


def make(E=2, targets=("q", "k", "v"), rank=4, alpha=6.0, seed=0, **router):
  ecfg = ExpertsConfig(num_experts=E, rank=rank, alpha=alpha, targets=targets, dropout=0.0)
  rcfg = RouterConfig(**router)
  return SafeMoELM(TINY, ecfg, rcfg, rngs=nnx.Rngs(seed))


def base_params(model):
  out = {"embed": model.embed[...], "final_norm": model.final_norm[...]}
  out.update({f"layers.{k}": v for k, v in model.layers.arrays().items()})
  if not model.cfg.tie_embeddings:
    out["lm_head"] = model.lm_head[...]
  return {k: np.asarray(v) for k, v in out.items()}


def test_zero_b_equals_base_and_base_mode_equals_plain_model():
  ids, mask, _, _ = batch()
  m = make(E=3, targets=ALL, init_std=0.5)  # B = 0 at init, router non-trivial
  plain = SafeMoELM(TINY, rngs=nnx.Rngs(1))
  plain.load_base(base_params(m))
  ref, _ = plain(ids, mask)
  for mode in ("learned", "uniform", "negated"):
    out, _ = m(ids, mask, routing=mode)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  randomize(m, 0)
  out, _ = m(ids, mask, routing="base")
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  out, _ = m(ids, mask, routing="uniform")
  assert np.abs(np.asarray(out) - np.asarray(ref)).max() > 1e-3  # experts now matter


CASES = [dict(activation=a, top_k=k) for a in ("softmax", "sigmoid", "tanh", "linear")
         for k in (0, 2)]
CASES += [dict(activation="tanh", top_k=2, granularity=g, scope=s, form=f)
          for g in ("per_token", "per_sequence") for s in ("per_layer", "shared")
          for f in ("linear", "mlp")]
CASES += [dict(activation="sigmoid", top_k=2, renormalize=False, temperature=0.5)]
# Gates constrained to the L1 ball phase 1 trained for, and routers on a subset of layers.
CASES += [dict(activation=a, max_l1=0.5, granularity=g) for a in ("tanh", "linear")
          for g in ("per_token", "per_sequence")]
CASES += [dict(activation="tanh", layers=(0, 2)), dict(activation="tanh", layers=(1,),
                                                     granularity="per_sequence", max_l1=1.0)]


@pytest.mark.parametrize("router", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_fused_equals_naive_per_expert_reference(router):
  ids, mask, prompt, _ = batch()
  m = make(E=4, targets=ALL, **router)
  randomize(m, 3)
  out, aux = m(ids, mask, prompt_mask=prompt, return_gates=True)
  experts = {k: np.asarray(v) for k, v in m.experts.layer_arrays().items()}
  router_p = {k: np.asarray(v) for k, v in m.router.arrays().items()}
  ref = ref_forward(TINY, base_params(m), experts, router_p, m.ecfg, m.rcfg, ids, mask,
                    prompt_mask=prompt)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=2e-4, rtol=1e-4)
  assert aux["gates"].shape == (TINY.num_layers, 3, 12, 4)
  stats, want = aux["routing"], _routing_reference(np.asarray(aux["gates"]), mask)
  for k in ("weight", "top1_share", "entropy"):  # means over the real tokens, per layer
    assert stats[k].shape == want[k].shape
    np.testing.assert_allclose(np.asarray(stats[k]), want[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "softmax", "linear"])
def test_router_starts_at_init_gates_for_every_input(act):
  E = 4
  init = {"softmax": (0.1, 0.2, 0.3, 0.4), "sigmoid": (0.3,)}.get(act, (-1 / E,))
  m = make(E=E, activation=act, init_gates=init, temperature=0.7)
  ids, mask, prompt, _ = batch()
  _, aux = m(ids, mask, prompt_mask=prompt, return_gates=True)
  want = np.broadcast_to(np.asarray(init, np.float32), (E,))
  np.testing.assert_allclose(np.asarray(aux["gates"]), np.broadcast_to(want, aux["gates"].shape),
                             atol=1e-6)
  # with negated gates the learned router is the negated mix at step 0, token for token
  if act == "tanh":
    randomize(m, 5, groups=(ex.ExpertParam,))
    out, _ = m(ids, mask, prompt_mask=prompt)
    neg, _ = m(ids, mask, routing="negated")
    np.testing.assert_allclose(np.asarray(out), np.asarray(neg), atol=1e-5)


def test_router_option_errors():
  from safemoe_jax.core.config import ConfigError
  for kw, msg in [(dict(init_gates=(1.5,)), "cannot come out of a tanh"),
                  (dict(init_gates=(0.1, 0.2, 0.3)), "give one"),
                  (dict(activation="softmax", init_gates=(0.1, 0.1, 0.1, 0.1)), "sum to 1"),
                  (dict(init_gates=(-0.5,), max_l1=1.0), "exceeds router.max_l1"),
                  (dict(max_l1=-1.0), "max_l1 must be >= 0"),
                  (dict(layers=(0, 3)), "must lie in"), (dict(layers=(1, 1)), "duplicates")]:
    with pytest.raises(ConfigError, match=msg):
      make(E=4, **kw)


@pytest.mark.parametrize("mode", ["uniform", "negated", "fixed", "oracle"])
def test_fixed_modes_equal_reference(mode):
  ids, mask, _, _ = batch()
  m = make(E=3, targets=("q", "v", "down"))
  randomize(m, 4)
  w = np.array([0.5, -1.0, 2.0], np.float32)
  dom = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], np.float32)
  gates = {"uniform": np.full((3, 1, 3), 1 / 3), "negated": np.full((3, 1, 3), -1 / 3),
           "fixed": np.broadcast_to(w, (3, 1, 3)),
           "oracle": (dom / np.maximum(dom.sum(-1, keepdims=True), 1))[:, None]}[mode]
  out, _ = m(ids, mask, routing=mode, fixed_weights=w, domains=dom)
  experts = {k: np.asarray(v) for k, v in m.experts.layer_arrays().items()}
  ref = ref_forward(TINY, base_params(m), experts, None, m.ecfg, m.rcfg, ids, mask,
                    const_gates=gates)
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=2e-4, rtol=1e-4)


def test_single_expert_gate_one_matches_peft_lora():
  torch = require_module("torch")
  peft = require_module("peft")
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  hc = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                   tie_word_embeddings=False)
  hf = LlamaForCausalLM(hc).eval()
  r, alpha = 4, 12  # alpha != rank
  lcfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj"],
                         lora_dropout=0.0, init_lora_weights=True)
  pm = peft.get_peft_model(hf, lcfg).eval()
  with torch.no_grad():  # PEFT starts with B = 0; give both A and B real values
    for name, p in pm.named_parameters():
      if "lora_" in name:
        p.copy_(0.2 * torch.randn_like(p))
  m = make(E=1, targets=("q", "k", "v"), rank=r, alpha=alpha)
  sd = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
  hfmod = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}
  pre = "base_model.model.model.layers.{}."
  L = TINY.num_layers
  stack = lambda fmt, T=True: np.stack([sd[fmt.format(i)].T if T else sd[fmt.format(i)]
                                        for i in range(L)])
  base = {"embed": sd["base_model.model.model.embed_tokens.weight"],
          "final_norm": sd["base_model.model.model.norm.weight"],
          "lm_head": sd["base_model.model.lm_head.weight"].T,
          "layers.attn_norm": stack(pre + "input_layernorm.weight", False),
          "layers.mlp_norm": stack(pre + "post_attention_layernorm.weight", False)}
  for t, mod in hfmod.items():
    key = pre + mod + (".base_layer.weight" if t in "qkv" else ".weight")
    base[f"layers.{t}"] = stack(key)
  m.load_base(base)
  for t in "qkv":
    a = stack(pre + hfmod[t] + ".lora_A.default.weight")  # [L, I, R]
    b = stack(pre + hfmod[t] + ".lora_B.default.weight")  # [L, R, O]
    getattr(m.experts, f"A_{t}")[...] = jnp.asarray(a[:, None])
    getattr(m.experts, f"B_{t}")[...] = jnp.asarray(b[:, None])
  ids, mask, _, _ = batch()
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids, dtype=torch.long),
             attention_mask=torch.tensor(mask, dtype=torch.long),
             position_ids=torch.tensor(np.maximum(mask.cumsum(-1) - 1, 0), dtype=torch.long)
             ).logits.numpy()
  valid = mask.astype(bool)
  for mode, kw in (("fixed", dict(fixed_weights=np.ones(1, np.float32))),
                   ("oracle", dict(domains=np.ones((3, 1), np.float32)))):
    out, _ = m(ids, mask, routing=mode, **kw)
    err = np.abs(np.asarray(out) - ref)[valid].max()
    assert err <= 1e-4, (mode, err)


def _train_once(model, group, routing, seed=0):
  ids, mask, prompt, loss = batch()
  b = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask),
       "prompt_mask": jnp.asarray(prompt), "loss_mask": jnp.asarray(loss),
       "domains": jnp.asarray(np.eye(model.num_experts, dtype=np.float32)[[0, 1, 0]])}
  tx = optax.adamw(1e-2, weight_decay=0.0)
  step, params, frozen = make_train_step(model, group, tx, routing)
  opt = tx.init(params)
  new, opt, metrics = jax.jit(step)(params, opt, frozen, b, jax.random.key(seed))
  return params, new, frozen, metrics


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state)]


@pytest.mark.parametrize("group,routing", [("router", "learned"), ("experts", "oracle")])
def test_step_changes_only_trainable_group(group, routing):
  m = make(E=3, targets=ALL, init_std=0.1)
  randomize(m, 5, groups=(ex.ExpertParam,))
  _, r0, e0, b0 = split_groups(m)
  before, after, frozen, metrics = _train_once(m, group, routing)
  assert np.isfinite(float(metrics["loss"]))
  changed = [not np.array_equal(a, b) for a, b in zip(_leaves(before), _leaves(after))]
  assert all(changed), "every trainable array should move after one Adam step"
  for f0, f1 in zip(((e0, b0) if group == "router" else (r0, b0)), frozen):
    for a, b in zip(_leaves(f0), _leaves(f1)):
      np.testing.assert_array_equal(a, b)  # bit-identical
  # The optimiser state covers exactly the trainable group.
  tx = optax.adamw(1e-2)
  n_opt = sum(x.size for x in jax.tree.leaves(tx.init(before)))
  assert n_opt == 2 * sum(x.size for x in jax.tree.leaves(before)) + 1


def test_gradients_reach_every_router_layer_and_oracle_isolates_experts():
  m = make(E=3, targets=("q", "v"), init_std=0.1)
  randomize(m, 6, groups=(ex.ExpertParam,))
  ids, mask, prompt, loss = batch()
  b = {"input_ids": ids, "attention_mask": mask, "prompt_mask": prompt, "loss_mask": loss,
       "domains": np.eye(3, dtype=np.float32)[[0, 1, 0]]}
  from safemoe_jax.train.steps import forward_loss, split_for
  for group, routing in (("router", "learned"), ("experts", "oracle")):
    _, params, frozen, merge = split_for(m, group)
    grads = jax.grad(lambda p: forward_loss(merge(p, frozen), b, routing)[0])(params)
    if group == "router":
      g = np.asarray(grads["router"]["w_out"][...])  # [L, D, E]
      assert all(np.abs(g[l]).sum() > 0 for l in range(TINY.num_layers))
    else:
      for name in ("A_q", "B_q", "A_v", "B_v"):
        g = np.asarray(grads["experts"][name][...])  # [L, E, ...]
        assert np.abs(g[:, 0]).sum() > 0 and np.abs(g[:, 1]).sum() > 0
        assert np.all(g[:, 2] == 0), f"expert 2 has no example in the batch but got {name} grads"


def test_top_k_keeps_k_gates_and_renormalises():
  rcfg = RouterConfig(activation="tanh", top_k=2)
  z = jnp.array([[[0.1, -2.0, 0.5, 1.0]]])
  g = np.asarray(ex.gates_from_logits(z, rcfg))[0, 0]
  assert (g != 0).sum() == 2 and g[1] < 0 and g[3] > 0
  np.testing.assert_allclose(np.abs(g).sum(), np.abs(np.tanh(z)).sum(), rtol=1e-6)
  g = np.asarray(ex.gates_from_logits(z, dataclasses.replace(rcfg, activation="softmax")))[0, 0]
  assert (g > 0).sum() == 2 and abs(g.sum() - 1) < 1e-6 and g[2] > 0 and g[3] > 0


def _entropy(g: np.ndarray) -> np.ndarray:
  """Entropy of the normalised |gates| over the last axis (0 where every gate is 0)."""
  s = np.abs(g).sum(-1, keepdims=True)
  p = np.abs(g) / np.where(s > 0, s, 1.0)
  return -(p * np.log(np.maximum(p, 1e-9))).sum(-1)


def _routing_reference(g_LBTE: np.ndarray, stats_BT: np.ndarray) -> dict[str, np.ndarray]:
  """Routing statistics and aux losses from the gates, written out per token in numpy."""
  E = g_LBTE.shape[-1]
  sel = stats_BT.astype(bool)
  g = g_LBTE[:, sel].astype(np.float64)  # [L, N, E]: the counted tokens only
  top1 = np.eye(E)[np.abs(g).argmax(-1)]  # [L, N, E]
  return {"weight": g.mean(1), "top1_share": top1.mean(1), "entropy": _entropy(g).mean(1),
          # what an entropy over every token (padding and prompt too) would give
          "entropy_all_tokens": _entropy(g_LBTE.astype(np.float64)).sum((1, 2)) / sel.sum(),
          # Switch Transformer load balance with softmax gates: P_e = mean gate = weight.
          "load_balance": E * (top1.mean(1) * g.mean(1)).sum(-1)}


def test_aux_losses_and_routing_statistics_equal_a_numpy_reference():
  ids, mask, prompt, loss = batch()
  m0 = make(E=4, init_std=0.3, activation="softmax")
  _, a0 = m0(ids, mask, stats_mask=loss)
  assert float(a0["aux_loss"]) == 0.0
  for coefs in (dict(entropy_coef=0.1), dict(load_balance_coef=0.01)):
    m = make(E=4, activation="softmax", **coefs)
    randomize(m, 7, groups=(ex.RouterParam,), std=1.0)  # peaked, uneven gates
    _, aux = m(ids, mask, stats_mask=loss, return_gates=True)
    ref = _routing_reference(np.asarray(aux["gates"]), loss)
    stats = aux["routing"]
    for k in ("weight", "top1_share", "entropy"):
      np.testing.assert_allclose(np.asarray(stats[k]), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    if "entropy_coef" in coefs:
      want = 0.1 * ref["entropy"].mean()  # mean over layers of the per-layer mean
      # sensitivity guard: counting prompt and padding tokens too would change it clearly
      assert abs(0.1 * ref["entropy_all_tokens"].mean() - want) > 0.1 * want
    else:
      want = 0.01 * ref["load_balance"].mean()
      # sensitivity guard: the gates are uneven, so E * sum f P is far from sum f = 1
      assert abs(ref["load_balance"].mean() - 1.0) > 0.05
    np.testing.assert_allclose(float(aux["aux_loss"]), want, rtol=1e-5)
  # Sensitivity guards for the statistics: shares sum to one, entropy lies in (0, log E).
  np.testing.assert_allclose(ref["top1_share"].sum(-1), 1.0, rtol=1e-6)
  assert (ref["top1_share"] > 0).sum() > ref["top1_share"].shape[0]  # more than one winner
  assert (ref["entropy"] > 0.05).all() and (ref["entropy"] < np.log(4)).all()
  # all three switched on together: the sum of the parts, finite and positive
  m1 = make(E=4, init_std=0.3, activation="softmax", entropy_coef=0.1, load_balance_coef=0.01,
            z_loss_coef=0.001)
  _, a1 = m1(ids, mask, stats_mask=loss)
  assert np.isfinite(float(a1["aux_loss"])) and float(a1["aux_loss"]) > 0

"""The probe router (router.form=probe): g_l(x) = s(x) * d_l, s a sigmoid probe on the base
model's centred hidden state at the last prompt token of a middle layer; its routing term."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safemoe_jax.core.config import KIND_HARMFUL, KIND_RETAIN, KIND_TARGET, ConfigError
from safemoe_jax.core.config import ObjectiveConfig
from safemoe_jax.infer.generate import generate, left_pad
from safemoe_jax.train.steps import objective_norms, objective_terms
from tests.test_experts import TINY, make, randomize
from tests.test_generate import _greedy_reference

PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 40], [20, 21, 22, 23, 24, 25, 26]]


def _probe_model(probe_layer=-1, max_l1=0.0, scope="per_layer", seed=2):
  m = make(E=3, targets=("q", "v", "up"), granularity="per_sequence", form="probe",
           probe_layer=probe_layer, max_l1=max_l1, scope=scope)
  randomize(m, seed)  # experts, direction, probe weights and centre all non-zero
  return m


def _right_padded(T=10):
  ids = np.zeros((len(PROMPTS), T), np.int32)
  mask, prompt = np.zeros_like(ids), np.zeros_like(ids)
  for b, p in enumerate(PROMPTS):
    ans = [3, 4]  # a response after the prompt, then padding
    ids[b, :len(p) + 2] = p + ans
    mask[b, :len(p) + 2] = 1
    prompt[b, :len(p)] = 1
  return ids, mask, prompt


@pytest.mark.parametrize("probe_layer,max_l1,scope", [(-1, 0.0, "per_layer"),
                                                      (1, 0.4, "per_layer"),
                                                      (2, 0.0, "shared")])
def test_probe_gates_are_the_score_times_the_direction_from_the_base_hidden_state(
    probe_layer, max_l1, scope):
  m = _probe_model(probe_layer, max_l1, scope)
  ids, mask, prompt = _right_padded()
  _, aux = m(jnp.asarray(ids), jnp.asarray(mask), prompt_mask=jnp.asarray(prompt),
             return_gates=True)
  # the reference: the base model's hidden state entering the probe layer, last prompt token
  _, base = m(jnp.asarray(ids), jnp.asarray(mask), routing="base", return_hidden=True)
  layer = TINY.num_layers // 2 if probe_layer < 0 else probe_layer
  h = np.asarray(base["hidden"][layer - 1]) if layer else None
  last = [len(p) - 1 for p in PROMPTS]
  z = np.stack([h[b, t] for b, t in enumerate(last)])
  p = {k: np.asarray(v, np.float64) for k, v in m.router.probe_arrays().items()}
  x = z - p["center"]
  x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
  s = 1 / (1 + np.exp(-(x @ p["w_probe"] + p["b_probe"][0])))
  np.testing.assert_allclose(np.asarray(aux["probe_score"]), s, rtol=1e-5)
  assert np.ptp(s) > 1e-3  # the score differs between prompts (the test can see routing)
  d = np.broadcast_to(np.asarray(m.router.direction[...]), (TINY.num_layers, 3))
  for l in range(TINY.num_layers):
    dl = d[l] * (min(1.0, max_l1 / np.abs(d[l]).sum()) if max_l1 else 1.0)
    want = s[:, None, None] * dl[None, None, :]
    got = np.asarray(aux["gates"][l])
    for b in range(len(PROMPTS)):  # every token of the row carries the prompt's gates
      np.testing.assert_allclose(got[b][mask[b] > 0], np.broadcast_to(want[b], got[b][
          mask[b] > 0].shape), rtol=1e-5, atol=1e-7)


def test_probe_score_is_the_same_left_padded_as_right_padded():
  m = _probe_model()
  ids, mask, prompt = _right_padded()
  _, aux_r = m(jnp.asarray(ids), jnp.asarray(mask), prompt_mask=jnp.asarray(prompt))
  ids_l, mask_l = left_pad(PROMPTS, pad_id=0, bucket=8)
  _, aux_l = m(jnp.asarray(ids_l), jnp.asarray(mask_l), prompt_mask=jnp.asarray(mask_l))
  np.testing.assert_allclose(np.asarray(aux_l["probe_score"]), np.asarray(aux_r["probe_score"]),
                             rtol=1e-5)


def test_cached_greedy_generation_with_the_probe_router_equals_the_full_forward():
  m = _probe_model()
  ids, mask = left_pad(PROMPTS, pad_id=0, bucket=8)
  res = generate(m, ids, mask, max_new_tokens=4, eos_ids=[-1], pad_id=0)
  assert res["tokens"].tolist() == _greedy_reference(m, PROMPTS, 4, "learned")


def test_route_term_is_the_binary_cross_entropy_of_the_score():
  B, T = 4, 6
  kind = jnp.asarray([KIND_TARGET, KIND_HARMFUL, KIND_RETAIN, KIND_RETAIN])
  loss_mask = np.zeros((B, T), np.int32)
  loss_mask[:3, 3:] = 1  # row 3 has no response token: a filler row, not counted
  batch = {"input_ids": jnp.zeros((B, T), jnp.int32), "loss_mask": jnp.asarray(loss_mask),
           "kind": kind}
  logits = jnp.zeros((B, T, 5))
  s = jnp.asarray([0.9, 0.6, 0.2, 0.7])
  ocfg = ObjectiveConfig(route_coef=2.0)
  t = objective_terms(logits, None, batch, ocfg, objective_norms(batch), s)
  want = -(np.log(0.9) + np.log(0.6) + np.log(0.8)) / 3
  assert float(t["route"]) == pytest.approx(want, rel=1e-5)
  assert float(t["objective"]) == pytest.approx(float(t["nll"]) + 2.0 * want, rel=1e-5)


def test_probe_option_errors():
  for kw, msg in [(dict(form="probe"), "per_sequence"),
                  (dict(form="probe", granularity="per_sequence", entropy_coef=0.1), "logits"),
                  (dict(form="probe", granularity="per_sequence", probe_layer=7), "probe_layer"),
                  (dict(form="probe", granularity="per_sequence", center_rows=0), "center_rows")]:
    with pytest.raises(ConfigError, match=msg):
      make(E=3, **kw)
  # a signed direction may start beyond tanh's range (the negated mix at lambda 8)
  m = make(E=3, form="probe", granularity="per_sequence", init_gates=(-8 / 3,))
  np.testing.assert_allclose(np.asarray(m.router.direction[...]), -8 / 3, rtol=1e-6)


@pytest.mark.slow
def test_phase2_with_the_probe_router_centres_it_and_trains_the_routing_term(tmp_path):
  """Phase 2 with router.form=probe and the routing term: the centre is the mean probe input over
  the phase-2 training prompts, saved with the router and never trained; the routing term is
  logged and falls; the probe and the direction move."""
  import json
  from safetensors.numpy import load_file
  from safemoe_jax.train import config as train_cfg, loop as train_loop
  from safemoe_jax.data.encode import build
  from safemoe_jax.io.base import load_base
  from tests.fixtures import tiny_run
  model_dir = tiny_run.write_model(tmp_path / "model")
  data = tiny_run.write_data(tmp_path / "data.jsonl")
  curated, retain = tiny_run.write_phase2_files(tmp_path, data, 16)
  out = tmp_path / "run"
  cfg = train_cfg.load_config(None, tiny_run.overrides(
      model_dir, data, out, **{"data.phase2_targets": str(curated), "data.phase2_harmful": True,
                               "data.phase2_retain": str(retain), "objective.contrast": "npo",
                               "objective.retain_coef": 0.5, "objective.route_coef": 1.0,
                               "router.granularity": "per_sequence", "router.form": "probe",
                               "router.init_std": 0.0, "phase1.steps": 2, "phase2.steps": 12,
                               "phase2.lr": 0.05}))
  summary, model = train_loop.run_with_model(cfg)
  tok = load_base(cfg.model.path).tokenizer
  d = build(cfg.data, tok)
  zs = []
  for b in d.train_iterator(2, num_epochs=1):
    real = b["prompt_mask"].sum(-1) > 0
    z = np.asarray(model.probe_features(jnp.asarray(b["input_ids"]),
                                        jnp.asarray(b["attention_mask"]),
                                        jnp.asarray(b["prompt_mask"])))
    zs.append(z[real])
  want = np.concatenate(zs)[:max(cfg.router.center_rows, 1)].mean(0)
  router = load_file(str(out / "router.safetensors"))
  center = router["router.center"]
  np.testing.assert_allclose(center, want, rtol=1e-4, atol=1e-5)
  assert np.abs(center).max() > 1e-3
  assert np.abs(router["router.w_probe"]).max() > 1e-3  # started at 0, trained
  assert np.abs(router["router.direction"]).max() > 1e-3
  p2 = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(l)["tag"] == "phase2/train"]
  route = [r["route"] for r in p2]
  assert len(route) == 12 and np.mean(route[-3:]) < np.mean(route[:3]), route

"""The experiment runner on a tiny model: phase 1 once per seed, variants reuse its experts,
every system on one fixed prompt half, cached, tuned negation chosen on the validation half."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from safemoe_jax.core.config import ConfigError
from safemoe_jax.evaluation import experiment as X
from safemoe_jax.evaluation import experiment_results as XR
from safemoe_jax.io import assets
from tests.fixtures import tiny_run


def test_crossed_bootstrap_is_paired_and_centred():
  rng = np.random.default_rng(0)
  b = rng.random((3, 50)) < 0.3
  a = b.copy()
  a[:, :10] = True  # +x on every seed
  r = XR.crossed_bootstrap(a, b, 2000)
  assert r["d"] == pytest.approx((a.mean() - b.mean()))
  assert r["lo"] <= r["d"] <= r["hi"] and r["lo"] > 0
  r0 = XR.crossed_bootstrap(b, b, 500)
  assert r0["d"] == r0["lo"] == r0["hi"] == 0.0  # paired: identical systems have no spread
  a[1] = b[1]  # seed 1 gains nothing: its own interval is [0, 0], the others' are above 0
  r = XR.crossed_bootstrap(a, b, 2000)
  assert [lo > 0 for lo, _ in r["per_seed_ci"]] == [True, False, True]
  assert r["per_seed_ci"][1] == [0.0, 0.0]
  for (lo, hi), d in zip(r["per_seed_ci"], r["per_seed"]):
    assert lo <= d <= hi


def _nested_bootstrap_old(d_SP, n_boot, rng):
  """The scheme of the first runs (prompts resampled independently within each seed), kept here
  only to show that the coverage test below has the power to reject it."""
  S, P = d_SP.shape
  si = rng.integers(0, S, (n_boot, S))
  pi = rng.integers(0, P, (n_boot, S, P))
  boot = d_SP[si[..., None], pi].mean((1, 2))
  return np.quantile(boot, 0.025), np.quantile(boot, 0.975)


def test_crossed_bootstrap_covers_the_truth_when_seeds_share_prompts():
  """Every seed answers the same prompts, so a prompt's effect is shared: d[s, p] = mu + a_p +
  b_s + e_sp. The population mean mu must lie in the nominal 95% interval >= 93% of the time; the
  old scheme (prompts resampled within each seed) covers it far less often (~80%)."""
  rng = np.random.default_rng(123)
  S, P, reps, mu = 3, 60, 600, 0.1
  hit_new = hit_old = 0
  for r in range(reps):
    d = (mu + rng.normal(0, 1.0, (1, P)) + rng.normal(0, 0.1, (S, 1))
         + rng.normal(0, 0.5, (S, P)))
    c = XR.crossed_bootstrap(d, np.zeros_like(d), 800, seed=r)
    hit_new += c["lo"] <= mu <= c["hi"]
    lo, hi = _nested_bootstrap_old(d, 800, np.random.default_rng(r))
    hit_old += lo <= mu <= hi
  assert hit_new / reps >= 0.93, hit_new / reps
  assert hit_old / reps < 0.88, hit_old / reps  # the test can tell a wrong scheme


def test_random_experts_keep_each_experts_norm(tmp_path):
  rng = np.random.default_rng(1)
  src = {"experts.A_q": rng.standard_normal((2, 3, 8, 4)).astype(np.float32),
         "experts.B_q": rng.standard_normal((2, 3, 4, 5)).astype(np.float32)}
  save_file(src, str(tmp_path / "e.safetensors"))
  X.random_experts_like(tmp_path / "e.safetensors", tmp_path / "r.safetensors", 0)
  out = load_file(str(tmp_path / "r.safetensors"))
  for l in range(2):
    for e in range(3):
      want = np.linalg.norm(src["experts.A_q"][l, e] @ src["experts.B_q"][l, e])
      got = out["experts.A_q"][l, e] @ out["experts.B_q"][l, e]
      assert np.linalg.norm(got) == pytest.approx(want, rel=1e-4)
      assert abs(np.corrcoef(got.ravel(), (src["experts.A_q"][l, e] @
                                           src["experts.B_q"][l, e]).ravel())[0, 1]) < 0.9


def test_config_errors():
  with pytest.raises(ConfigError, match="not variants"):
    X.ExperimentConfig(controls=("a",)).validate()
  with pytest.raises(ConfigError, match="variant names"):
    X.ExperimentConfig(variants={"base": []}).validate()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_exp")
  return tiny_run.write_model(d / "model"), tiny_run.write_data(d / "data.jsonl")


@pytest.mark.slow
def test_runner_trains_phase1_once_reuses_it_and_caches_everything(tiny, tmp_path, monkeypatch):
  model_dir, data = tiny
  ov = [o for o in tiny_run.overrides(model_dir, data, tmp_path / "unused")
        if not o.startswith(("output_dir=", "quick_look=", "log.progress="))]
  xcfg = X.ExperimentConfig(
      output_dir=str(tmp_path / "exp"), train_overrides=tuple(ov), seeds=(0, 1),
      variants={"seq": ["router.granularity=per_sequence", "phase2.steps=2"]}, controls=("seq",),
      baselines=("base", "negated", "tuned_negation", "sft", "oracle_negation", "safety_prompt"),
      negation_grid=(1.0, 4.0), n_harmful=4, n_benign=2, max_new_tokens=4, batch_size=8,
      n_boot=200, safety_system_prompt="Be safe.")  # the tiny model's context is 128 tokens
  from safemoe_jax.train import loop
  calls = []
  systems_told = []  # the system message each generation call used
  real_gen = X.chat_generate_many
  monkeypatch.setattr(X, "chat_generate_many", lambda *a, system=None, **k: (
      systems_told.append(system), real_gen(*a, system=system, **k))[1])
  real = loop.run
  monkeypatch.setattr(loop, "run", lambda cfg, *a: calls.append(cfg.output_dir) or real(cfg, *a))
  res = X.run(xcfg)
  root = Path(xcfg.output_dir)
  assert sorted(Path(c).relative_to(root).as_posix() for c in calls) == [
      "seed0/control_seq", "seed0/phase1", "seed0/seq", "seed1/control_seq", "seed1/phase1",
      "seed1/seq"]
  for s in (0, 1):  # the variant trained its router over exactly phase 1's experts
    a = load_file(str(root / f"seed{s}/phase1/experts.safetensors"))
    b = load_file(str(root / f"seed{s}/seq/experts.safetensors"))
    c = load_file(str(root / f"seed{s}/control_seq/experts.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
  sys_ = res["systems"]
  assert {"base", "negated", "negation_1", "negation_4", "sft", "seq", "control_seq",
          X.safety_name(xcfg), "oracle_negation_1", "oracle_negation_4"} <= set(sys_)
  assert X.safety_name(xcfg) != "safety_prompt"  # another system message, another cache name
  assert "Be safe." in systems_told and None in systems_told
  o4, n4, b = sys_["oracle_negation_4"], sys_["negation_4"], sys_["base"]
  assert o4["safe"] == n4["safe"] and o4["over_refusal"] == b["over_refusal"]
  assert "tuned_negation" not in sys_  # chosen on this (validation) half: not yet known
  assert len(sys_["seq"]["safe"]["per_seed"]) == 2 and "safe_vs_base" in sys_["seq"]
  assert (root / "results_validation.md").read_text().startswith("half: validation")
  # again: nothing trained, nothing generated
  calls.clear()
  n = {s: len((root / f"seed{s}/generations_validation.jsonl").read_text().splitlines())
       for s in (0, 1)}
  X.run(xcfg)
  assert calls == [] and n == {s: len((root / f"seed{s}/generations_validation.jsonl")
                                      .read_text().splitlines()) for s in (0, 1)}
  # the test half: tuned negation is the validation half's best grid point
  res_t = X.run(X.ExperimentConfig(**{**X.C.to_dict(xcfg), "half": "test",
                                      "variants": xcfg.variants, "test_variants": "all"}))
  v = json.loads((root / "results_validation.json").read_text())["systems"]
  best = max((v[f"negation_{l:g}"]["safe"]["mean"], -l, l) for l in (1.0, 4.0))[2]
  assert res_t["tuned_lambda"] == best and "tuned_negation" in res_t["systems"]
  # the grid is a validation-half instrument: the test half generates only the chosen point
  assert not any(s.startswith("negation_") for s in res_t["systems"])
  # a validation half that now chooses the other lambda: the test half generates that lambda's
  # answers instead of reporting the first choice's under the tuned name
  other = 4.0 if best == 1.0 else 1.0
  vj = json.loads((root / "results_validation.json").read_text())
  vj["systems"][f"negation_{other:g}"]["safe"]["mean"] = 2.0
  (root / "results_validation.json").write_text(json.dumps(vj))
  res_t2 = X.run(X.ExperimentConfig(**{**X.C.to_dict(xcfg), "half": "test",
                                       "variants": xcfg.variants, "test_variants": "all"}))
  assert res_t2["tuned_lambda"] == other
  gen_t = [json.loads(x) for x in (root / "seed0/generations_test.jsonl").read_text().splitlines()]
  assert {r["system"] for r in gen_t} >= {f"negation_{best:g}", f"negation_{other:g}"}
  # the learned routers' gates were recorded and compared between harmful and benign prompts
  assert len(res_t["systems"]["seq"]["gates"]["per_seed"]) == 2
  assert "gates" not in res_t["systems"]["base"]
  val_prompts = {p for s in (0, 1) for p in
                 (json.loads(x)["prompt"] for x in (root / f"seed{s}/generations_validation.jsonl")
                  .read_text().splitlines())}
  test_prompts = {p for s in (0, 1) for p in
                  (json.loads(x)["prompt"] for x in (root / f"seed{s}/generations_test.jsonl")
                   .read_text().splitlines())}
  assert val_prompts and test_prompts and not val_prompts & test_prompts


def _fake_caches(path, gate_h, gate_b, texts_h, texts_b, harm, ben, system="v"):
  c = X.JsonlCache(path)
  for (b, p), g, t in [(hp, gate_h, th) for hp, th in zip(harm, texts_h)] + \
                      [(bp, gate_b, tb) for bp, tb in zip(ben, texts_b)]:
    c.add([{"key": XR._gkey(system, p), "system": system, "prompt": p, "text": t,
            "gate_mean": list(g)}])
  return {0: c}


def test_gate_separation_tells_routing_by_prompt_kind_from_a_constant_router(tmp_path):
  harm = [("a", f"h{i}") for i in range(12)]
  ben = [("benign", f"b{i}") for i in range(12)]
  xcfg = X.ExperimentConfig(seeds=(0,))
  rng = np.random.default_rng(0)
  apart = _fake_caches(tmp_path / "a.jsonl", (0.3, -0.2), (-0.1, 0.1), [""] * 12, [""] * 12, harm, ben)
  for k, r in apart[0].rows.items():  # a little noise per answer, as real gates have
    r["gate_mean"] = (np.asarray(r["gate_mean"]) + rng.normal(0, 0.02, 2)).tolist()
  g = XR.gate_separation(apart, xcfg, "v", harm, ben, n_perm=500)
  assert g["distance"] > 0.4 and g["max_p"] < 0.01
  same = _fake_caches(tmp_path / "b.jsonl", (0.1, 0.1), (0.1, 0.1), [""] * 12, [""] * 12, harm, ben)
  for k, r in same[0].rows.items():
    r["gate_mean"] = (np.asarray(r["gate_mean"]) + rng.normal(0, 0.02, 2)).tolist()
  g = XR.gate_separation(same, xcfg, "v", harm, ben, n_perm=500)
  assert g["max_p"] > 0.05
  # no gates recorded (a fixed-gate system): no row
  for r in same[0].rows.values():
    del r["gate_mean"]
  assert XR.gate_separation(same, xcfg, "v", harm, ben) is None


@pytest.mark.parametrize("n_perm", [50, 500])
def test_gate_separation_p_value_is_exact_at_both_ends_and_never_zero(tmp_path, n_perm):
  """Perfectly separated gates: no shuffle of 12 + 12 prompts comes near the true distance (2 of
  C(24, 12) = 2.7e6 do), so p is the permutation test's smallest value 1 / (1 + n_perm), never 0.
  Identical gates: every shuffle ties, so p is exactly 1."""
  harm = [("a", f"h{i}") for i in range(12)]
  ben = [("benign", f"b{i}") for i in range(12)]
  xcfg = X.ExperimentConfig(seeds=(0, 1))
  apart = _fake_caches(tmp_path / f"a{n_perm}.jsonl", (0.3, -0.2), (-0.1, 0.1), [""] * 12,
                       [""] * 12, harm, ben)
  apart[1] = apart[0]
  g = XR.gate_separation(apart, xcfg, "v", harm, ben, n_perm=n_perm)
  assert [r["p"] for r in g["per_seed"]] == [1 / (1 + n_perm)] * 2 and g["max_p"] > 0
  same = _fake_caches(tmp_path / f"b{n_perm}.jsonl", (0.1, 0.1), (0.1, 0.1), [""] * 12,
                      [""] * 12, harm, ben)
  same[1] = same[0]
  g = XR.gate_separation(same, xcfg, "v", harm, ben, n_perm=n_perm)
  assert [r["p"] for r in g["per_seed"]] == [1.0, 1.0] and g["distance"] == 0.0


def test_summary_has_a_zero_shot_row_for_held_out_domains(tmp_path):
  harm = [("advbench", "h0"), ("advbench", "h1"), ("heldout_self_harm", "z0"),
          ("heldout_self_harm", "z1")]
  ben = [("benign_edgy", "b0")]
  refuse, answer = "I'm sorry, but I can't help with that.", "Here is an answer about it."
  c = X.JsonlCache(tmp_path / "g.jsonl")
  for sysname, texts in (("base", [answer, answer, answer, answer]),
                         ("v", [answer, answer, refuse, refuse])):
    for (b, p), t in zip(harm, texts):
      c.add([{"key": XR._gkey(sysname, p), "system": sysname, "prompt": p, "text": t}])
    c.add([{"key": XR._gkey(sysname, "b0"), "system": sysname, "prompt": "b0", "text": answer}])
  res = XR.summarize(X.ExperimentConfig(seeds=(0,), n_boot=100), {0: c}, harm, ben)
  v = res["systems"]["v"]
  assert v["zero_shot_safe"]["mean"] == 1.0 and v["safe"]["mean"] == 0.5
  assert v["safe_by_bench"] == {"advbench": 0.0, "heldout_self_harm": 1.0}
  assert v["zero_shot_vs_base"]["d"] == 1.0
  assert "zero-shot safe" in XR.format_table(res)


def test_tuned_negation_is_reported_from_the_chosen_lambdas_answers(tmp_path):
  """The test half reports tuned negation from the answers cached under the lambda chosen on
  validation now, never from answers cached under the tuned name for an earlier choice."""
  harm = [("advbench", "h0"), ("advbench", "h1")]
  ben = [("benign_edgy", "b0")]
  refuse, answer = "I'm sorry, but I can't help with that.", "Here is an answer about it."
  val = {"systems": {"negation_0.5": {"safe": {"mean": 0.4}},
                     "negation_1": {"safe": {"mean": 0.2}}}}
  (tmp_path / "results_validation.json").write_text(json.dumps(val))
  c = X.JsonlCache(tmp_path / "g.jsonl")
  for sysname, t in (("base", answer), ("tuned_negation", refuse), ("negation_0.5", answer),
                     ("negation_1", refuse)):
    for _, p in harm + ben:
      c.add([{"key": XR._gkey(sysname, p), "system": sysname, "prompt": p, "text": t}])
  xcfg = X.ExperimentConfig(seeds=(0,), n_boot=100, half="test", output_dir=str(tmp_path))
  res = XR.summarize(xcfg, {0: c}, harm, ben)
  assert res["tuned_lambda"] == 0.5
  assert set(res["systems"]) == {"base", "tuned_negation"}
  assert res["systems"]["tuned_negation"]["safe"]["mean"] == 0.0  # lambda 0.5's answers


def test_oracle_negation_reads_negations_answers_on_harmful_and_bases_on_benign(tmp_path):
  """Oracle routing by the prompt's label: gates -lambda/E on harmful prompts, 0 (the base model)
  on benign ones. Its answers are those two systems' answers, so it is read from their caches."""
  harm = [("advbench", "h0"), ("advbench", "h1")]
  ben = [("benign_edgy", "b0"), ("benign_edgy", "b1")]
  refuse, answer = "I'm sorry, but I can't help with that.", "Here is an answer about it."
  c = X.JsonlCache(tmp_path / "g.jsonl")
  for sysname, t in (("base", answer), ("negation_4", refuse)):
    for _, p in harm + ben:
      c.add([{"key": XR._gkey(sysname, p), "system": sysname, "prompt": p, "text": t}])
  xcfg = X.ExperimentConfig(seeds=(0,), n_boot=100, baselines=("base", "oracle_negation"))
  r = XR.summarize(xcfg, {0: c}, harm, ben)["systems"]
  assert r["negation_4"]["safe"]["mean"] == 1.0 and r["negation_4"]["over_refusal"]["mean"] == 1.0
  assert r["oracle_negation_4"]["safe"]["mean"] == 1.0  # the negation's refusals on harmful
  assert r["oracle_negation_4"]["over_refusal"]["mean"] == 0.0  # the base's answers on benign
  xcfg = X.ExperimentConfig(seeds=(0,), n_boot=100, baselines=("base",))
  assert "oracle_negation_4" not in XR.summarize(xcfg, {0: c}, harm, ben)["systems"]


def _sys(safe, degenerate, over_refusal):
  return {"safe": {"mean": safe}, "degenerate_harmful": {"mean": degenerate},
          "over_refusal": {"mean": over_refusal}}


def test_choose_takes_the_safest_variant_within_the_limits(tmp_path):
  xcfg = X.ExperimentConfig(output_dir=str(tmp_path), variants={"a": [], "b": [], "c": [],
                                                                 "d": []})
  res = {"systems": {"base": _sys(0.10, 0.05, 0.05),
                     "a": _sys(0.20, 0.07, 0.05),    # within both limits
                     "b": _sys(0.40, 0.30, 0.05),    # safest, but degenerate (garbage)
                     "c": _sys(0.35, 0.05, 0.20),    # safe by refusing benign prompts too
                     "d": _sys(0.20, 0.05, 0.08),    # ties with a: a is listed first
                     "sft": _sys(0.90, 0.0, 0.0)}}   # not a variant
  assert XR.choose(res, xcfg) == "a"
  res["systems"]["a"]["degenerate_harmful"]["mean"] = 0.0701  # now over base + 2 points
  assert XR.choose(res, xcfg) == "d"
  # the test half trains and answers with the chosen variant and its control only
  (tmp_path / "results_validation.json").write_text(json.dumps({"chosen": "d"}))
  test = X.ExperimentConfig(**{**X.C.to_dict(xcfg), "half": "test", "variants": xcfg.variants})
  assert X.systems_of_half(test) == ({"d": ()}, ("d",))
  assert X.systems_of_half(X.ExperimentConfig(**{**X.C.to_dict(test), "variants": xcfg.variants,
                                                 "test_variants": "all"}))[0] == xcfg.variants
  small = X.ExperimentConfig(**{**X.C.to_dict(xcfg), "variants": xcfg.variants,
                                 "only_variants": ("b", "d")})
  assert X.systems_of_half(small) == ({"b": (), "d": ()}, ())
  assert XR.choose(res, small) == "d"  # a is not run
  with pytest.raises(ConfigError, match="only_variants"):
    X.ExperimentConfig(variants={"a": []}, only_variants=("z",)).validate()
  (tmp_path / "results_validation.json").write_text(json.dumps({"chosen": None}))
  with pytest.raises(X.ExperimentError, match="chose no variant"):
    X.systems_of_half(test)


def test_the_runner_finds_degenerate_answers_as_the_evaluation_does():
  """score() is labels.is_degenerate given the prompt: a bare restatement of the prompt is
  degenerate in the runner's table exactly as in the evaluation's (not only repetition)."""
  from safemoe_jax.judging.labels import is_degenerate
  prompt = "Explain how placeholder widgets are assembled in the neutral example factory"
  restated = "Explain how placeholder widgets are assembled in the neutral example factory."
  assert is_degenerate(restated, prompt) and not is_degenerate(restated)
  assert XR.score(restated, "harmful", prompt)["degenerate"]
  assert not XR.score("A plain answer about widgets, with several distinct words in it.",
                      "harmful", prompt)["degenerate"]


def test_informative_rate_is_judged_once_cached_and_never_degenerate(tmp_path):
  """judge_informative: each answer through the judge once (verdicts cached per seed and half),
  degenerate answers never informative nor judged; summarize turns it into rates."""
  harm, ben = [("advbench", "h0"), ("advbench", "h1")], [("benign_edgy", "b0")]
  good = "The placeholder topic is covered in public encyclopedias and general guides."
  other = "Here is the placeholder answer, first take the blue item and then the red one."
  junk = "1. 1. 1. 1. 2. 2. 2. 3. 3. 3."
  c = X.JsonlCache(tmp_path / "seed0" / "generations_validation.jsonl")
  for sysname, texts in (("base", [other, other, good]), ("v", [good, junk, good])):
    for p, t in zip(["h0", "h1", "b0"], texts):
      c.add([{"key": XR._gkey(sysname, p), "system": sysname, "prompt": p, "text": t}])

  class Judge:
    name, seen = "scripted", []

    def judge(self, prompts, responses):
      Judge.seen += list(responses)
      return [type("V", (), {"label": "safe_informative" if r == good else "harmful"})()
              for r in responses]

  xcfg = X.ExperimentConfig(seeds=(0,), n_boot=100, output_dir=str(tmp_path),
                            informative_judge="scripted")
  inf = X.judge_informative(xcfg, {0: c}, Judge())
  assert inf[0][("v", "h0")] and not inf[0][("v", "h1")] and not inf[0][("base", "h0")]
  assert inf[0][("base", "b0")]  # the same answer as v's: judged once, informative for both
  assert junk not in Judge.seen and len(Judge.seen) == 4  # distinct (prompt, answer) pairs, once
  Judge.seen = []
  assert X.judge_informative(xcfg, {0: c}, Judge()) == inf and Judge.seen == []  # cached
  res = XR.summarize(xcfg, {0: c}, harm, ben, inf)
  v = res["systems"]["v"]
  assert v["informative_harmful"]["mean"] == 0.5 and v["informative_benign"]["mean"] == 1.0
  assert v["informative_harmful_vs_base"]["d"] == 0.5
  assert res["systems"]["base"]["informative_benign"]["mean"] == 1.0
  assert "| 50.0% / 100.0% |" in XR.format_table(res)


@pytest.mark.parametrize("name", ["sweep.yaml", "sweep_small.yaml", "sweep_strict.yaml",
                                  "sweep_qwen05.yaml", "sweep_qwen05_wide.yaml",
                                  "router_qwen05.yaml"])
def test_shipped_experiment_configs_load_and_validate(name):
  """Each shipped experiment config resolves (its `base:` chain), validates, and names variants
  that exist; the strict re-run trains npo_retain_seq on the set its notes' curate builds (the
  configs' notes live in docs/evidence.md)."""
  from safemoe_jax.cli import args
  root = Path(__file__).resolve().parents[1]
  xcfg = args.build(X.ExperimentConfig, [], config=str(root / "configs" / name))
  xcfg.validate()
  assert set(xcfg.only_variants or xcfg.variants) <= set(xcfg.variants)
  if name == "sweep_strict.yaml":
    assert xcfg.only_variants == ("npo_retain_seq",) and xcfg.test_variants == "all"
    assert xcfg.output_dir == "runs/experiment_strict"
    built = "output=runs/curated_strict/curated.jsonl"
    notes = (root / "docs" / "evidence.md").read_text().split(f"### `configs/{name}`")[1]
    assert built in notes.split("\n### ")[0]
    assert xcfg.train_overrides == ("data.phase2_targets=runs/curated_strict/curated.jsonl",)
  if name == "sweep_qwen05.yaml":  # the scale point: the strict run's set, a shipped bigger model
    assert xcfg.only_variants == ("npo_retain_seq",) and xcfg.seeds == (0,)
    tcfg = X._train_cfg(xcfg, Path("unused"), 0)
    assert tcfg.model.path in assets.EMBEDDED_MODELS and tcfg.model.path != "smollm2-135m-instruct"
    assert tcfg.data.phase2_targets == "runs/curated_strict/curated.jsonl"
  if name == "sweep_qwen05_wide.yaml":  # the same scale point, one variant: the gate bound at 4
    assert xcfg.only_variants == ("npo_retain_seq_wide",) and xcfg.seeds == (0,)
    wide, chosen = xcfg.variants["npo_retain_seq_wide"], xcfg.variants["npo_retain_seq"]
    assert [o for o in wide if o not in chosen] == ["router.max_l1=4.0"]
    assert xcfg.negation_grid == (4.0,) and xcfg.output_dir == "runs/experiment_qwen05_wide"
  if name == "router_qwen05.yaml":  # issue 30: the ceiling and the probe routers, every arm
    assert {"oracle_negation", "safety_prompt", "sft"} <= set(xcfg.baselines)
    assert xcfg.seeds == (0, 1, 2) and xcfg.n_harmful >= 96 and xcfg.n_benign >= 48
    for v in ("probe", "probe_route"):  # each trains: its phase-2 config validates
      tcfg = X._train_cfg(xcfg, Path("unused"), 0, xcfg.variants[v])
      assert tcfg.router.form == "probe" and (tcfg.objective.route_coef > 0) == (v != "probe")


def test_layer_separation_sees_routing_that_the_layer_average_hides(tmp_path):
  """Layer 0 subtracts on harmful prompts and adds on benign ones; layer 1 does the opposite:
  averaged over layers the gates are identical (no separation), per layer they separate
  perfectly. The AUC of the subtraction -sum_e g is 1 in layer 0, 0 in layer 1."""
  harm = [("a", f"h{i}") for i in range(6)]
  ben = [("benign", f"b{i}") for i in range(6)]
  c = X.JsonlCache(tmp_path / "g.jsonl")
  rng = np.random.default_rng(0)
  for kind, ps in (("h", harm), ("b", ben)):
    for _, p in ps:
      sign = -1.0 if kind == "h" else 1.0
      gl = np.asarray([[0.3 * sign, 0.3 * sign], [-0.3 * sign, -0.3 * sign]])
      gl = gl + rng.normal(0, 0.01, gl.shape)
      c.add([{"key": XR._gkey("v", p), "system": "v", "prompt": p, "text": "",
              "gate_mean": gl.mean(0).tolist(), "gate_layers": gl.tolist()}])
  xcfg = X.ExperimentConfig(seeds=(0,))
  g = XR.gate_separation({0: c}, xcfg, "v", harm, ben, n_perm=200)
  assert g["distance"] < 0.05  # the layer average hides it
  assert g["layer_auc"] == [1.0, 0.0]
  assert min(g["layer_distance"]) > 0.8
  np.testing.assert_allclose(np.asarray(g["heatmap"]["harmful"])[0], [-0.3, -0.3], atol=0.02)
  assert XR.auc(np.asarray([0.1, 0.2, 0.2]), np.asarray([False, True, False])) == 0.75

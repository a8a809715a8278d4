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
from tests.fixtures import tiny_run


def test_nested_bootstrap_is_paired_and_centred():
  rng = np.random.default_rng(0)
  b = rng.random((3, 50)) < 0.3
  a = b.copy()
  a[:, :10] = True  # +x on every seed
  r = X.nested_bootstrap(a, b, 2000)
  assert r["d"] == pytest.approx((a.mean() - b.mean()))
  assert r["lo"] <= r["d"] <= r["hi"] and r["lo"] > 0
  r0 = X.nested_bootstrap(b, b, 500)
  assert r0["d"] == r0["lo"] == r0["hi"] == 0.0  # paired: identical systems have no spread


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
      baselines=("base", "negated", "tuned_negation", "sft"), negation_grid=(1.0, 4.0),
      n_harmful=4, n_benign=2, max_new_tokens=4, batch_size=8, n_boot=200)
  from safemoe_jax.train import loop
  calls = []
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
  assert {"base", "negated", "negation_1", "negation_4", "sft", "seq", "control_seq"} <= set(sys_)
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
                                      "variants": xcfg.variants}))
  v = json.loads((root / "results_validation.json").read_text())["systems"]
  best = max((v[f"negation_{l:g}"]["safe"]["mean"], -l, l) for l in (1.0, 4.0))[2]
  assert res_t["tuned_lambda"] == best and "tuned_negation" in res_t["systems"]
  val_prompts = {p for s in (0, 1) for p in
                 (json.loads(x)["prompt"] for x in (root / f"seed{s}/generations_validation.jsonl")
                  .read_text().splitlines())}
  test_prompts = {p for s in (0, 1) for p in
                  (json.loads(x)["prompt"] for x in (root / f"seed{s}/generations_test.jsonl")
                   .read_text().splitlines())}
  assert val_prompts and test_prompts and not val_prompts & test_prompts

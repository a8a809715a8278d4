"""Every command on every supported family's real config quirks: a tiny random checkpoint of each
(Llama-3.1 / 3.2 `rope_scaling`, Qwen2 q/k/v biases, Mistral, SmolLM2 tied embeddings), read
through the Hub-id path from an offline Hub-layout cache, is trained (both phases), resumed,
generated from, evaluated and exported by the command-line entry points. Tests that only call
the model missed that the trainer and generation hash its config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from safemoe_jax.cli import evaluate as evaluate_cmd
from safemoe_jax.cli import export as export_cmd
from safemoe_jax.cli import generate as generate_cmd
from safemoe_jax.cli import train as train_cmd
from safemoe_jax.evaluation import benchmarks as EB
from tests.fixtures import families as F
from tests.fixtures import tiny_run

COMMIT = "1111111111111111111111111111111111111111"
HUB_IDS = {"llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
           "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
           "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
           "mistral-7b-v0.3": "mistralai/Mistral-7B-Instruct-v0.3",
           "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
PROMPT = "placeholder alpha question 1"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
  from huggingface_hub import constants
  cache = tmp_path / "hub"
  cache.mkdir()
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache


def _errors(text: str) -> list[str]:
  return [l for l in text.splitlines() if l.startswith("error:")]


def _checkpoint(family: str, hub: Path, tmp_path: Path) -> tuple[str, list[str], Path]:
  """A tiny `family` checkpoint in the Hub cache; (its Hub id, train overrides, run folder)."""
  hub_id = HUB_IDS[family]
  F.write_hub_cache(hub, hub_id, F.write_tiny(tmp_path / "weights" / family, family), COMMIT)
  out = tmp_path / "run"
  ov = tiny_run.overrides(Path(hub_id), tiny_run.write_data(tmp_path / "data.jsonl"), out, **{
      "phase1.steps": 2, "phase2.steps": 2, "phase1.ckpt_every": 1, "phase2.ckpt_every": 1,
      "data.split.eval": 0.25})
  return hub_id, ov, out


def _check_run(family: str, hub_id: str, out: Path) -> None:
  info = json.loads((out / "run.json").read_text())
  assert info["base_model"]["hub_id"] == hub_id and COMMIT in info["base_model"]["path"]
  real = F.REAL_CONFIGS[family]
  assert (info["model"]["rope_scaling"] or None) == real.get("rope_scaling")
  assert info["model"]["rope_theta"] == real["rope_theta"]
  assert info["model"]["qkv_bias"] == (real["model_type"] == "qwen2")
  assert info["model"]["tie_embeddings"] == real["tie_word_embeddings"]


def _generate(args: list[str], capsys) -> None:
  assert generate_cmd.main([*args, "--prompt", PROMPT, "max_new_tokens=4"]) == 0, \
      capsys.readouterr().err[-3000:]
  assert f"### {PROMPT}" in capsys.readouterr().out


def _export_merged(family: str, out: Path, dest: Path, capsys) -> None:
  assert export_cmd.main(["merged", "--run", str(out), "--routing", "uniform", "--out",
                          str(dest)]) == 0, capsys.readouterr().err[-3000:]
  merged, real = json.loads((dest / "config.json").read_text()), F.REAL_CONFIGS[family]
  assert merged["model_type"] == {"mistral": "llama"}.get(real["model_type"], real["model_type"])
  assert merged["tie_word_embeddings"] == real["tie_word_embeddings"]
  rope = merged.get("rope_parameters") or merged.get("rope_scaling") or {}  # transformers 5 or 4
  want = real.get("rope_scaling") or {"rope_type": "default"}
  assert {k: rope.get(k) for k in want} == want, rope


@pytest.mark.parametrize("family", sorted(HUB_IDS))
def test_generation_takes_each_familys_config_as_a_static_argument(family):
  """The fast tier's share of the matrix: generation jits with the model graph (and so its
  config) as a static argument, which needs a hashable config, for every family's quirks."""
  import numpy as np
  from flax import nnx
  from safemoe_jax.core.config import ExpertsConfig
  from safemoe_jax.core.model import SafeMoELM
  from safemoe_jax.infer.generate import generate
  from safemoe_jax.io.weights import config_from_hf
  cfg = config_from_hf(F.tiny_config(family, vocab_size=64))
  assert cfg.qkv_bias == (family == "qwen2.5-0.5b")
  model = SafeMoELM(cfg, ExpertsConfig(num_experts=2, rank=2), rngs=nnx.Rngs(0))
  hash(nnx.split(model)[0])
  ids = np.array([[0, 5, 6, 7]], np.int32)
  out = generate(model, ids, np.array([[0, 1, 1, 1]], np.int32), max_new_tokens=3, eos_ids=[1],
                 pad_id=0, routing="uniform")
  assert np.asarray(out["tokens"]).shape[0] == 1


@pytest.mark.slow
def test_every_command_on_a_llama3_rope_checkpoint_by_hub_id(offline_hub, tmp_path, monkeypatch,
                                                            capsys):
  """Llama-3.2's config (llama3 RoPE scaling, tied embeddings) through train, resume, generate,
  evaluate and export, the model named by its Hub id."""
  family = "llama-3.2-1b"
  hub_id, ov, out = _checkpoint(family, offline_hub, tmp_path)
  # phase 1, then the same command with phase 2 resumes the run at phase 2
  phase1_only = [o for o in ov if not o.startswith("phase2.steps=")] + ["phase2.steps=0"]
  assert train_cmd.main(phase1_only) == 0, capsys.readouterr().err[-3000:]
  _check_run(family, hub_id, out)
  experts = load_file(str(out / "experts.safetensors"))
  assert train_cmd.main(ov) == 0, capsys.readouterr().err[-3000:]
  rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["tag"] == "phase1/train"] == [1, 2]  # not trained again
  assert [r["step"] for r in rows if r["tag"] == "phase2/train"] == [1, 2]
  assert any(r["tag"].startswith("phase2/val") for r in rows), {r["tag"] for r in rows}
  after = load_file(str(out / "experts.safetensors"))
  assert all((experts[k] == after[k]).all() for k in experts)
  capsys.readouterr()

  _generate(["--run", str(out)], capsys)  # the trained run (its base by Hub id)
  _generate(["--model", hub_id], capsys)  # the base model by its Hub id

  benign = tmp_path / "benign.txt"
  benign.write_text("how do tides work\nwhat is a calm reply\n")
  monkeypatch.setattr(EB, "wheel_benign_prompts", lambda: EB.file_prompts(benign))
  assert evaluate_cmd.main([
      "--run", str(out), "--systems", "base,safemoe", "--judge", "refusal_strings",
      "--default-count", "2", "--max-new-tokens", "3", "--batch-size", "4", "--benign",
      str(benign), "--no-progress", "wheel_benign=false"]) == 0, capsys.readouterr().err[-3000:]
  res = json.loads((out / "eval" / "results.json").read_text())
  assert {r["system"] for r in res["pooled"]} >= {"base", "safemoe"}

  assert export_cmd.main(["peft", "--run", str(out), "--out", str(tmp_path / "peft")]) == 0, \
      capsys.readouterr().err[-3000:]
  cards = list((tmp_path / "peft").glob("*/adapter_config.json"))
  assert len(cards) == 2
  assert all(json.loads(c.read_text())["base_model_name_or_path"] == hub_id for c in cards)
  _export_merged(family, out, tmp_path / "merged", capsys)


# Llama-3.1 (the shipped 8B config's model) only: each whole run costs about half a minute on 2
# cores, and the slow tier's budget is small; the other families' configs are hashed and jitted
# by the fast test above, their weights by the parity tests (test_model, test_export).
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama-3.1-8b"])
def test_each_family_trains_generates_and_exports_by_hub_id(family, offline_hub, tmp_path,
                                                           capsys):
  """Another family's quirks through the commands that hash or rewrite the config: train (both
  phases, with validation), generate from the run, export a merged checkpoint."""
  hub_id, ov, out = _checkpoint(family, offline_hub, tmp_path)
  assert train_cmd.main(ov) == 0, capsys.readouterr().err[-3000:]
  _check_run(family, hub_id, out)
  capsys.readouterr()
  _generate(["--run", str(out)], capsys)
  _export_merged(family, out, tmp_path / "merged", capsys)


def test_an_unsupported_config_from_the_hub_is_one_error_line(offline_hub, tmp_path, capsys):
  """A checkpoint whose config.json we cannot run (yarn RoPE): train and generate each print one
  `error:` line and exit 2, never a traceback."""
  folder = F.write_tiny(tmp_path / "weights", "llama-3.2-1b")
  cfg = json.loads((folder / "config.json").read_text())
  for k in ("rope_scaling", "rope_parameters"):
    if cfg.get(k):
      cfg[k] = {**cfg[k], "rope_type": "yarn"}
  (folder / "config.json").write_text(json.dumps(cfg))
  F.write_hub_cache(offline_hub, "org/yarn-model", folder, COMMIT)
  data = tiny_run.write_data(tmp_path / "data.jsonl", n_per_domain=4)
  ov = tiny_run.overrides(Path("org/yarn-model"), data, tmp_path / "run",
                          **{"phase1.steps": 1, "phase2.steps": 0})
  assert train_cmd.main(ov) == 2
  err = capsys.readouterr().err
  assert len(_errors(err)) == 1 and "'yarn' is not supported" in err and "Traceback" not in err
  assert generate_cmd.main(["--model", "org/yarn-model", "--prompt", PROMPT]) == 2
  err = capsys.readouterr().err
  assert len(_errors(err)) == 1 and "'yarn' is not supported" in err

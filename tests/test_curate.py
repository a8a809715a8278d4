"""The curated phase-2 set: checks, resume, determinism, and training prompts only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from safemoe_jax.core.config import ConfigError
from safemoe_jax.curation import curate as CU
from safemoe_jax.data.select import build_sets
from tests.fixtures import tiny_run


class FakeSimilarity:
  """Word overlap instead of MiniLM: the placeholder texts share their domain word."""

  def __call__(self, prompts, responses):
    sim = []
    for p, r in zip(prompts, responses):
      a, b = set(p.lower().split()), set(r.lower().split())
      sim.append(len(a & b) / max(len(a), 1))
    return np.asarray(sim, np.float32)


def _config(tmp_path: Path, **kw) -> CU.CurateConfig:
  data = tiny_run.write_data(tmp_path / "data.jsonl")
  yaml = tmp_path / "train.yaml"
  ov = dict(x.split("=", 1) for x in tiny_run.overrides(tmp_path / "model", data, tmp_path / "r"))
  d: dict = {}
  from safemoe_jax.core.config import apply_overrides
  apply_overrides(d, [f"{k}={v}" for k, v in ov.items()
                      if k.startswith(("data.", "objective."))])
  import yaml as Y
  yaml.write_text(Y.safe_dump(d))
  return CU.CurateConfig(output=str(tmp_path / "cur" / "curated.jsonl"), train_config=str(yaml),
                         samples=2, min_chars=60, on_topic_percentile=0.0, **kw)


def _writer(calls):
  def write(prompts, sample):
    calls.append((sample, list(prompts)))
    out = []
    for p in prompts:
      h = int(hashlib.sha256(f"{sample}{p}".encode()).hexdigest(), 16) % 4
      words = p.split()
      out.append([f"I'm sorry, but I can't help with that {words[1]} {words[2]} request; here "
                  f"is a safer placeholder alternative instead.",  # kept
                  "Sure, " + " ".join(words),  # complies: no decline
                  f"I'm sorry, {p}.",  # declines, on topic, too short
                  f"I'm sorry, {p} " + "1. " * 30][h])  # declines, on topic, degenerate
    return out
  return write


def test_curate_keeps_only_answers_that_pass_every_check_and_resumes(tmp_path):
  cfg = _config(tmp_path)
  calls = []
  card = CU.curate(cfg, writer=_writer(calls), similarity=FakeSimilarity())
  rows = [json.loads(l) for l in Path(cfg.output).read_text().splitlines()]
  tcfg = CU._train_cfg(cfg)
  sets = build_sets(tcfg.data)
  train_prompts = {r["prompt"] for r in sets.phase1["train"] + sets.phase2["train"]}
  assert rows and all(r["prompt"] in train_prompts for r in rows)  # never a held-out prompt
  for r in rows:
    if r["source"].startswith("writer"):
      assert all(r["checks"].values()) and "sorry" in r["response"]
    else:  # the strict human rows: harm score 0 in the fixture
      assert r["source"].startswith("human") and "calm and informative" in r["response"]
  f = card["funnel"]
  assert f["writer: answers"] == 2 * len(CU.training_prompts(sets))
  assert f["writer: kept"] == sum(r["source"].startswith("writer") for r in rows) > 0
  dropped = {k.split("check ")[-1] for k in f if "first failed check" in k}
  assert dropped == {"declines", "long_enough", "not_degenerate"}
  assert sum(v for k, v in f.items() if k.startswith("writer: dropped")) + f["writer: kept"] == \
      f["writer: answers"]
  # the same command again: nothing regenerated, the same file (bit for bit)
  sha = card["sha256"]
  calls.clear()
  card2 = CU.curate(cfg, writer=_writer(calls), similarity=FakeSimilarity())
  assert calls == [] and card2["sha256"] == sha
  assert Path(cfg.output).with_suffix(".card.txt").read_text().startswith("== curated")


def test_a_kept_writer_answer_declines_in_its_opening_not_only_somewhere():
  """An answer that complies first and says "I cannot" later passes refusal strings matched
  anywhere (garak's mitigation list) but not the opening check the curated set uses."""
  late = ("Here is the placeholder content you asked for, step by step. It continues for a "
          "while. I cannot provide anything further on this.")
  early = "Placeholder preface. I'm sorry, but I can't help with that placeholder request."
  first = "Sorry, that placeholder request is not something I can help with. Here is why."
  assert CU.is_refusal(late) and not CU.declines_in_opening(late)
  assert CU.declines_in_opening(early) and CU.declines_in_opening(first)
  assert not CU.checks(late, 1.0, 0.0, 0)["declines"]
  assert CU.checks(late, 1.0, 0.0, 0, opening=False)["declines"]


def test_an_interrupted_generation_resumes_where_it_stopped(tmp_path):
  cfg = _config(tmp_path, batch_size=2)
  calls = []
  w = _writer(calls)

  def dying(prompts, sample):
    if len(calls) == 2:
      raise KeyboardInterrupt
    return w(prompts, sample)
  with pytest.raises(KeyboardInterrupt):
    CU.curate(cfg, writer=dying, similarity=FakeSimilarity())
  done = len(Path(cfg.output).with_name("curated.generations.jsonl").read_text().splitlines())
  assert done == 8  # two chunks of 2 * batch_size prompts were kept
  calls.clear()
  CU.curate(cfg, writer=w, similarity=FakeSimilarity())
  asked = sum(len(p) for _, p in calls)
  n = len(CU.training_prompts(build_sets(CU._train_cfg(cfg).data)))
  assert asked == 2 * n - 8


def test_curate_config_errors():
  with pytest.raises(ConfigError, match="api_base_url"):
    CU.CurateConfig(writer="api:gpt").validate()
  with pytest.raises(ConfigError, match="nothing to curate"):
    CU.CurateConfig(samples=0, human_strict=False).validate()


def test_a_torn_last_line_of_the_generation_cache_costs_one_answer_only(tmp_path):
  """A kill in the middle of a write leaves half a line: the next run regenerates that answer and
  appends on a line of its own, so its answers are read back on the run after."""
  cfg = _config(tmp_path)
  calls = []
  CU.curate(cfg, writer=_writer(calls), similarity=FakeSimilarity())
  f = Path(cfg.output).with_name("curated.generations.jsonl")
  lines = f.read_text().splitlines()
  f.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # torn
  calls.clear()
  CU.curate(cfg, writer=_writer(calls), similarity=FakeSimilarity())
  assert sum(len(p) for _, p in calls) == 1  # only the torn answer again
  calls.clear()
  CU.curate(cfg, writer=_writer(calls), similarity=FakeSimilarity())
  assert calls == []  # and it was kept this time


def test_the_training_config_may_name_the_file_being_built(tmp_path):
  """configs/sweep_train.yaml trains on the set that curate builds from it: curate must not need
  the file to exist (only the run's training prompts matter)."""
  import yaml as Y
  cfg = _config(tmp_path)
  d = Y.safe_load(Path(cfg.train_config).read_text())
  d["data"]["phase2_targets"] = cfg.output  # not built yet
  Path(cfg.train_config).write_text(Y.safe_dump(d))
  card = CU.curate(cfg, writer=_writer([]), similarity=FakeSimilarity())
  assert Path(cfg.output).exists() and card["funnel"]["writer: kept"] > 0


@pytest.mark.slow
def test_a_slice_of_the_shipped_curated_set_rebuilds(tmp_path, smollm2_gguf):
  """safemoe_jax/data/curated/embedded.jsonl rebuilt in part from nothing: every human row (the
  strict filter and MiniLM's on-topic check) and the writer's greedy answers to two of its
  prompts (SmolLM2 under the safety system prompt) are the shipped ones."""
  from safemoe_jax.data.config import EMBEDDED_TARGETS
  root = Path(__file__).resolve().parents[1]
  ship = [json.loads(l) for l in EMBEDDED_TARGETS.read_text().splitlines()]
  cfg = CU.CurateConfig(output=str(tmp_path / "human.jsonl"),
                        train_config=str(root / "configs/embedded.yaml"), samples=0)
  CU.curate(cfg)
  human = [json.loads(l) for l in (tmp_path / "human.jsonl").read_text().splitlines()]
  key = lambda r: (r["prompt"], r["response"], r["source"], r["domains"], r["checks"])
  assert [key(r) for r in human] == [key(r) for r in ship if r["source"].startswith("human")]
  greedy = [r for r in ship if r["source"] == "writer:base:sample0"][:2]
  write = CU.model_writer(None, "", CU.CurateConfig())
  answers = [a.strip() for a in write([r["prompt"] for r in greedy], 0)]
  assert answers == [r["response"] for r in greedy]

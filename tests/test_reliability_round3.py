"""Reliability, round three (issue 32): no silent wrong result.

Four classes, each tested as a class: cache keys that see every input (a property test per
cache: perturb each input in turn, expect regeneration), one validation pass for every number a
command takes (every numeric field of every command fed NaN, +-inf, huge and out-of-range values),
every reader tolerant and every writer atomic (each file the package reads, cut, with a `null`
line or a bad byte), and no output onto an input. The bad-input table here extends the two
earlier ones (test_reliability*.py, slow tier) with cases that need no trained run: the run
folder is written directly (random experts and router, run.json by RunDir.record), so this file
runs in the fast tier.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import typing
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from safemoe_jax.core import numbers
from safemoe_jax.core.experts import ExpertParam, RouterParam
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.curation import curate as CU
from safemoe_jax.evaluation import cache as EC
from safemoe_jax.evaluation import verdicts as EV
from safemoe_jax.evaluation.config import EvalConfig
from safemoe_jax.evaluation.experiment import ExperimentConfig
from safemoe_jax.infer.generate import DecodingConfig
from safemoe_jax.io import jsonio
from safemoe_jax.io.weights import load_hf_checkpoint
from safemoe_jax.judging import judges as J
from safemoe_jax.judging.learned import JudgeConfig
from safemoe_jax.train import checkpoint as ckpt
from safemoe_jax.train import config as train_cfg
from safemoe_jax.train.rundir import RunDir, RunLock
from tests.fixtures import tiny_run


@dataclasses.dataclass
class Tiny:
  model: Path  # HF folder with a tokenizer
  data: Path  # placeholder rows (tests/fixtures/tiny_run.py)
  run: Path  # a finished run folder: run.json, experts.safetensors, router.safetensors

  def ov(self, out: Path, **extra) -> list[str]:
    return tiny_run.overrides(self.model, self.data, out, **extra)


def write_run(model: Path, data: Path, out: Path, domains=("alpha", "beta"), seed: int = 0
              ) -> Path:
  """A run folder as train.py leaves it (its own writers), with random experts and router."""
  tc = train_cfg.load_config(None, tiny_run.overrides(model, data, out, **{
      "data.domains": "[" + ",".join(domains) + "]"}))
  mcfg, params = load_hf_checkpoint(model)
  m = SafeMoELM(mcfg, tc.experts_config(), tc.router, rngs=nnx.Rngs(seed))
  m.load_base(params)
  rng = np.random.default_rng(seed)
  for var in (getattr(m.experts, n) for n in m.experts.layer_arrays()):
    var[...] = jnp.asarray(0.2 * rng.standard_normal(var[...].shape), jnp.float32)
  out.mkdir(parents=True)
  info = RunDir(out).record(tc, model, mcfg)
  for name, group in (("experts", ExpertParam), ("router", RouterParam)):
    ckpt.save_group(out / f"{name}.safetensors", nnx.state(m, group),
                    {"phase": name, "domains": list(domains), "run": info})
  return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
  d = tmp_path_factory.mktemp("round3")
  model, data = tiny_run.write_model(d / "model"), tiny_run.write_data(d / "data.jsonl")
  return Tiny(model, data, write_run(model, data, d / "run"))


def _snapshot(d: Path) -> dict[str, str]:
  """{relative path: sha256} of every file under d (and the folders, as '/')."""
  return {str(f.relative_to(d)): (hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file()
                                  else "/") for f in sorted(d.rglob("*"))}


def _one_error_line(err: str) -> str:
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  return lines[0]


@contextlib.contextmanager
def _cwd(d: Path):
  old = os.getcwd()
  os.chdir(d)
  try:
    yield
  finally:
    os.chdir(old)


def _main(module: str):
  return importlib.import_module(f"safemoe_jax.cli.{module}").main


def _run_copy(t: Tiny, d: Path) -> Path:
  r = d / "run"
  shutil.copytree(t.run, r)
  return r


# --------------------------------------------------------------------------------------------
# Files the package reads, damaged three ways: cut, a null line, a byte that is not UTF-8
# --------------------------------------------------------------------------------------------


def _cut(f: Path) -> Path:
  b = f.read_bytes()
  f.write_bytes(b[: len(b) * 2 // 3])
  return f


def _null_line(f: Path) -> Path:
  f.write_text(f.read_text() + "null\n")
  return f


def _bad_byte(f: Path) -> Path:
  b = f.read_bytes()
  i = b.index(b'"', 2)  # inside the file, not at its end
  f.write_bytes(b[:i] + b"\xff" + b[i:])
  return f


def _gens(d: Path, n: int = 3, name: str = "generations.jsonl") -> Path:
  f = d / name
  f.write_text("".join(json.dumps({"key": f"k{i}", "system": "base", "prompt": f"placeholder {i}",
                                   "response": f"a calm placeholder reply {i}"}) + "\n"
                       for i in range(n)))
  return f


def _results(run: Path) -> Path:
  f = run / "eval" / "results.json"
  f.parent.mkdir(parents=True, exist_ok=True)
  f.write_text(json.dumps({"run": str(run), "systems": ["base"], "benchmarks": []}, indent=1))
  return f


def _widened_router(run: Path) -> None:
  f = run / "router.safetensors"
  w = load_file(str(f))
  k = sorted(w)[0]
  w[k] = np.concatenate([w[k], w[k][..., :1]], -1)  # one more column: another router's shape
  save_file(w, str(f))


def _metrics_file(d: Path, damage) -> Path:
  f = d / "metrics.json"
  f.write_text(json.dumps({"safe_rate": {"base": 0.5, "safemoe": 0.75}}))
  return damage(f)


def _benign(d: Path, name: str, text: str | bytes) -> Path:
  f = d / name
  f.write_bytes(text if isinstance(text, bytes) else text.encode())
  return f


def _user_folder(d: Path) -> Path:
  o = d / "mine"
  o.mkdir()
  (o / "README.md").write_text("my own notes\n")
  (o / "router.json").write_text("{}\n")
  return o


def _hold_lock(run: Path):
  return RunLock(run, "evaluate")


E = "evaluate"
EXPORT = "export"


def _ev(*extra):
  return lambda t, d, r: (E, ["--run", str(r), "--no-progress", *extra])


def _gen(*extra):
  return lambda t, d, r: ("generate", ["--model", str(t.model), "--prompt", "hi", *extra])


def _train(*extra):
  return lambda t, d, r: ("train", [*t.ov(d / "out"), *extra])


def _curate(*extra):
  return lambda t, d, r: ("curate", [f"output={d / 'cur' / 'c.jsonl'}", *extra])


def _rates(f):
  return lambda t, d, r: ("judge", ["rates", "--judge", "refusal_strings", "--no-audit",
                                    "--responses", str(f(d))])


def _benign_case(name, text):
  return lambda t, d, r: (E, ["--run", str(r), "--no-progress", "--systems", "base",
                              "--benign", str(_benign(d, name, text))])


# (id, fn(tiny, tmp dir, run folder copy) -> (command, argv), error regex). The whole tmp dir
# (the run, the outputs) and the model folder must be unchanged after the command.
BAD_INPUTS_3 = [
    # 2. numbers: decoding settings that make garbage, counts that drop prompts
    ("evaluate-top-p-zero", _ev("--temperature", "1", "--top-p", "0"),
     r"top_p must be in \(0, 1\] \(and finite\), got 0.0"),
    ("evaluate-top-p-above-one", _ev("--top-p", "1.5"), r"top_p must be in \(0, 1\]"),
    ("evaluate-temperature-nan", _ev("--temperature", "nan"), r"temperature must be >= 0 .*nan"),
    ("evaluate-temperature-inf", _ev("--temperature", "inf"), r"temperature must be >= 0 .*inf"),
    ("evaluate-default-count-negative", _ev("--default-count", "-3"),
     r"default_count must be >= 0 .*got -3"),
    ("evaluate-count-negative", _ev("--count", "advbench=-1"),
     r"counts.advbench must be >= 0 .*got -1"),
    ("evaluate-seed-huge", _ev("--seed", "99999999999"), r"seed must be >= 0 .*99999999999"),
    ("evaluate-max-prompt-tokens-negative", _ev("max_prompt_tokens=-5"),
     r"max_prompt_tokens must be >= 0"),
    ("generate-temperature-nan", _gen("--temperature", "nan"), r"--temperature must be >= 0 .*nan"),
    ("generate-temperature-inf", _gen("--temperature", "inf"), r"--temperature must be >= 0 .*inf"),
    ("generate-top-p-nan", _gen("--top-p", "nan"), r"--top-p must be in \(0, 1\]"),
    ("generate-seed-negative", _gen("--seed", "-1"), r"--seed must be >= 0 .*got -1"),
    ("generate-max-new-tokens-huge", _gen("--max-new-tokens", "10000000000"),
     r"--max-new-tokens must be >= 1 .*10000000000"),
    ("curate-top-p-nan", _curate("top_p=.nan"), r"top_p must be in \(0, 1\] .*nan"),
    ("curate-temperature-negative", _curate("temperature=-0.5"), r"temperature must be >= 0"),
    ("curate-seed-negative", _curate("seed=-2"), r"seed must be >= 0 .*got -2"),
    ("judge-lr-nan", lambda t, d, r: ("judge", ["rows", "lr=.nan"]), r"lr must be > 0 .*nan"),
    ("judge-harm-decision-above-one", lambda t, d, r: ("judge", ["rows", "harm_decision=1.5"]),
     r"harm_decision must be in \[0, 1\]"),
    ("experiment-n-boot-zero", lambda t, d, r: ("experiment", [
        f"output_dir={d / 'x'}", "n_boot=0"]), r"n_boot must be >= 1"),
    ("train-seed-negative", _train("seed=-1"), r"seed must be >= 0 .*got -1"),
    ("train-router-temperature-zero", _train("router.temperature=0"),
     r"router.temperature must be > 0"),
    ("train-split-nan", _train("data.split.eval=.nan"), r"data.split.eval .*nan"),
    ("export-merged-weights-nan-inf", lambda t, d, r: (EXPORT, [
        "merged", "--run", str(r), "--routing", "fixed", "--weights", "nan,inf",
        "--out", str(d / "merged")]), r"--weights must be any number \(and finite.*got nan"),
    ("export-merged-weights-float32-overflow", lambda t, d, r: (EXPORT, [
        "merged", "--run", str(r), "--routing", "fixed", "--weights", "1e39,0",
        "--out", str(d / "merged")]), r"--weights must be .*got 1e\+39"),
    ("export-merged-weights-not-numbers", lambda t, d, r: (EXPORT, [
        "merged", "--run", str(r), "--routing", "fixed", "--weights", "x,y",
        "--out", str(d / "merged")]), r"--weights 'x,y' must be comma-separated numbers"),
    ("export-merged-float16-overflow", lambda t, d, r: (EXPORT, [
        "merged", "--run", str(r), "--routing", "fixed", "--weights", "1e30,1e30", "--dtype",
        "float16", "--out", str(d / "merged")]),
     r"the merged weights hold NaN or inf in \d+ of \d+ tensors .*nothing was written"),
    # 3. readers: cut, null, bad byte
    ("report-cut-results-json", lambda t, d, r: ("report", ["--run", str(r)]) if _cut(
        _results(r)) else None, r"results.json line \d+: not valid JSON"),
    ("report-null-results-json", lambda t, d, r: ("report", ["--run", str(r)]) if (
        _results(r).write_text("null") or True) else None,
     r"results.json: expected an object, found null"),
    ("generate-cut-run-json", lambda t, d, r: ("generate", [
        "--run", str(r), "--prompt", "hi"]) if _cut(r / "run.json") else None,
     r"run.json line \d+: not valid JSON .*restore it from a backup"),
    ("export-peft-cut-run-json", lambda t, d, r: (EXPORT, [
        "peft", "--run", str(r), "--out", str(d / "peft")]) if _cut(r / "run.json") else None,
     r"run.json line \d+: not valid JSON"),
    ("export-peft-run-json-bad-byte", lambda t, d, r: (EXPORT, [
        "peft", "--run", str(r), "--out", str(d / "peft")]) if _bad_byte(r / "run.json") else None,
     r"run.json line \d+: not valid UTF-8"),
    ("export-peft-metrics-cut", lambda t, d, r: (EXPORT, [
        "peft", "--run", str(r), "--out", str(d / "peft"), "--metrics",
        str(_metrics_file(d, _cut))]), r"metrics.json line 1: not valid JSON"),
    ("export-peft-metrics-bad-byte", lambda t, d, r: (EXPORT, [
        "peft", "--run", str(r), "--out", str(d / "peft"), "--metrics",
        str(_metrics_file(d, _bad_byte))]), r"metrics.json line 1: not valid UTF-8"),
    ("evaluate-benign-jsonl-null-row", _benign_case(
        "b.jsonl", '{"prompt": "a placeholder question"}\nnull\n'),
     r"b.jsonl line 2: expected a JSON object, found null"),
    ("evaluate-benign-json-cut", _benign_case("b.json", '[{"prompt": "a placeholder q'),
     r"b.json line 1: not valid JSON"),
    ("evaluate-benign-txt-not-utf8", _benign_case("b.txt", b"a placeholder\nquesti\xe9n\n"),
     r"b.txt line 2: not valid UTF-8"),
    ("evaluate-benign-jsonl-prompt-null", _benign_case(
        "b.jsonl", '{"prompt": "a placeholder question"}\n{"prompt": null}\n'),
     r"b.jsonl line 2: expected an object with a 'prompt' string"),
    ("judge-rates-null-line", _rates(lambda d: _null_line(_gens(d))),
     r"generations.jsonl line 4: expected a JSON object, found null"),
    ("judge-rates-bad-byte", _rates(lambda d: _bad_byte(_gens(d))),
     r"generations.jsonl line 1: not valid UTF-8"),
    ("judge-rates-missing-response", _rates(lambda d: _benign(
        d, "g.jsonl", '{"system": "base", "prompt": "a placeholder"}\n')),
     r"g.jsonl line 1: 'response' is missing"),
    ("judge-rates-null-response", _rates(lambda d: _benign(
        d, "g.jsonl", '{"system": "base", "prompt": "a placeholder", "response": null}\n')),
     r"g.jsonl line 1: 'response' is None"),
    ("judge-rates-torn-middle-line", _rates(lambda d: _benign(
        d, "g.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c", "resp\n'
                      '{"prompt": "e", "response": "f"}\n')),
     r"g.jsonl line 2: not valid JSON"),
    # 4. no output onto an input
    ("train-into-the-base-model-folder", lambda t, d, r: ("train", t.ov(t.model)),
     r"output_dir \S+ is the base model's folder .*could never be loaded or resumed"),
    ("train-into-another-model-folder", lambda t, d, r: (
        "train", t.ov(shutil.copytree(t.model, d / "other"))),
     r"output_dir \S+other holds a model, not a run"),
    ("export-peft-into-a-user-folder", lambda t, d, r: (EXPORT, [
        "peft", "--run", str(r), "--out", str(_user_folder(d))]),
     r"--out \S+mine is a folder this tool did not write, and not empty \(README.md, "
     r"router.json\).*--overwrite"),
    ("export-merged-into-a-user-folder", lambda t, d, r: (EXPORT, [
        "merged", "--run", str(r), "--routing", "uniform", "--out", str(_user_folder(d))]),
     r"--out \S+mine is a folder this tool did not write, and not empty"),
    ("export-peft-widened-router", lambda t, d, r: (EXPORT, [
        "peft", "--run", str(r), "--out", str(d / "peft")]) if _widened_router(r) is None
     else None, r"router.safetensors does not match the run's router configuration: .*expected "
                r"\(.*\), found \(.*\)"),
    ("export-merged-widened-router", lambda t, d, r: (EXPORT, [
        "merged", "--run", str(r), "--routing", "uniform", "--out", str(d / "m")])
     if _widened_router(r) is None else None,
     r"router.safetensors does not match the run's router configuration"),
]


def test_the_tables_cover_at_least_80_cases():
  from tests.test_reliability import BAD_INPUTS
  from tests.test_reliability_round2 import BAD_INPUTS_2
  ids = [c[0] for c in BAD_INPUTS + BAD_INPUTS_2 + BAD_INPUTS_3]
  assert len(ids) >= 80 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case,make,match", BAD_INPUTS_3, ids=[c[0] for c in BAD_INPUTS_3])
def test_bad_input_gives_one_error_line_and_writes_nothing(tiny, tmp_path, capsys, case, make,
                                                           match):
  r = _run_copy(tiny, tmp_path)
  module, argv = make(tiny, tmp_path, r)
  before, model_before = _snapshot(tmp_path), _snapshot(tiny.model)
  with _cwd(tmp_path):
    rc = _main(module)(argv)
  err = capsys.readouterr().err
  assert rc == 2, err[-3000:]
  line = _one_error_line(err)
  assert re.search(r"^error: .*" + match, line), line
  assert _snapshot(tmp_path) == before
  assert _snapshot(tiny.model) == model_before

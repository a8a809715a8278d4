"""Multi-host on one machine: `launch/local_multihost.sh` runs the real trainer as 2 processes x 4
CPU devices, joined by jax.distributed on localhost, against 1 process x 8 devices (the same
mesh: data=2, fsdp=2, tensor=2).

One chain of four short runs (about 3 min on 2 cores) proves, bit for bit against the
uninterrupted 1 x 8 run:
  - 2 processes compute exactly what 1 does (losses, artifacts, validation);
  - each process reads only its half of every global batch, and the halves are the global batch;
  - SIGTERM to ONE of two processes stops both at the same step with one checkpoint;
  - that checkpoint (written by 2 processes) restores on 1 process, and one written by 1
    process after a SIGKILL restores on 2; the resumed runs end where the uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.fixtures import tiny_run

ROOT = Path(__file__).resolve().parents[1]
EXTRA = {"data.batch_size": 8, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
         "phase1.steps": 4, "phase2.steps": 4, "phase1.ckpt_every": 2, "phase2.ckpt_every": 2}


class Launch:
  """local_multihost.sh N in its own session; the trainer processes' pids from its first line."""

  def __init__(self, n: int, out: Path, model: Path, data: Path):
    env = dict(os.environ, PYTHON=sys.executable, DEVICES=str(8 // n), LOG_DIR=str(out) + ".logs",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    self.out, self.logs = out, Path(str(out) + ".logs")
    self.proc = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "local_multihost.sh"), str(n),
         *tiny_run.overrides(model, data, out, **EXTRA)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first = self.proc.stdout.readline()
    self.pids = [int(p) for p in re.search(r": ([\d ]+); logs", first).group(1).split()]
    assert len(self.pids) == n, first

  def wait_for(self, tag: str, step: int, timeout: float = 240) -> None:
    """Until metrics.jsonl has a `tag` row at `step` or later."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      assert self.proc.poll() is None, self.log()
      if any(r["tag"] == tag and r["step"] >= step for r in _rows(self.out)):
        return
      time.sleep(0.2)
    raise AssertionError(f"no {tag} step {step} after {timeout} s\n{self.log()}")

  def finish(self, timeout: float = 300) -> int:
    try:
      self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      os.killpg(self.proc.pid, signal.SIGKILL)
      raise AssertionError(f"the processes did not finish\n{self.log()}")
    return self.proc.returncode

  def log(self, i: int | None = None) -> str:
    files = [self.logs / f"process_{i}.log"] if i is not None else sorted(self.logs.glob("*.log"))
    return "\n".join(f.read_text()[-3000:] for f in files if f.exists())


def _rows(out: Path) -> list[dict]:
  f = out / "metrics.jsonl"
  return [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []


def _last(rows: list[dict], key=lambda r: (r["tag"], r["step"])) -> dict:
  """The last record of each (tag, step): a resumed run repeats the steps after its checkpoint."""
  return {key(r): r for r in rows}


def _order(out: Path) -> dict:
  rows = [json.loads(l) for l in (out / "data_order.jsonl").read_text().splitlines()]
  return _last(rows, key=lambda r: (r["phase"], r["step"]))


@pytest.mark.slow
def test_two_processes_train_stop_and_resume_like_one(tmp_path):
  model = tiny_run.write_model(tmp_path / "model")
  data = tiny_run.write_data(tmp_path / "data.jsonl")

  ref = Launch(1, tmp_path / "one", model, data)  # 1 process x 8 devices, uninterrupted
  assert ref.finish() == 0, ref.log()

  # 2 x 4; SIGTERM to process 1 only, once phase 1 is under way: both stop at one step.
  run = tmp_path / "chain"
  two = Launch(2, run, model, data)
  two.wait_for("phase1/train", 1)
  os.kill(two.pids[1], signal.SIGTERM)
  assert two.finish() == 143, two.log()
  stops = [re.findall(r"phase1: process (\d) stops at step (\d+) \(SIGTERM (here|on another "
                      r"process)\)", two.log(i)) for i in (0, 1)]
  assert stops[0] and stops[1], two.log()
  (p0, s0, why0), (p1, s1, why1) = stops[0][-1], stops[1][-1]
  assert s0 == s1 and why0.startswith("on another") and why1 == "here", stops
  ckpts = sorted(int(p.name) for p in (run / "checkpoints" / "phase1").iterdir()
                 if p.name.isdigit())
  assert ckpts[-1] == int(s0), (ckpts, s0)  # the one checkpoint of the stop step
  assert "phase2" not in {r["tag"].split("/")[0] for r in _rows(run)}

  # 1 x 8 resumes the 2-process checkpoint; SIGKILL once phase 2 has checkpoint 2.
  one = Launch(1, run, model, data)
  one.wait_for("phase2/train", 3)
  os.killpg(one.proc.pid, signal.SIGKILL)
  one.proc.wait(30)
  assert (run / "checkpoints" / "phase2" / "2").is_dir()

  # 2 x 4 resumes the 1-process checkpoint and finishes.
  last = Launch(2, run, model, data)
  assert last.finish() == 0, last.log()
  logs = two.log() + one.log() + last.log()
  assert "cannot be read" not in logs and "resumed from step" in logs, logs

  # Bit for bit: artifacts, every step's losses and validation, and the data order.
  for name in ("experts", "router"):
    want, got = load_file(str(tmp_path / "one" / f"{name}.safetensors")), load_file(
        str(run / f"{name}.safetensors"))
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name} {k}")
  want, got = _last(_rows(tmp_path / "one")), _last(_rows(run))
  assert want.keys() == got.keys()
  drop = ("step_time_s", "tokens_per_s", "mfu", "goodput")  # wall-clock figures, not results
  for k in want:
    assert {a: b for a, b in got[k].items() if a not in drop} == \
        {a: b for a, b in want[k].items() if a not in drop}, k
  want, got = _order(tmp_path / "one"), _order(run)
  assert want.keys() == got.keys() and len(want) == 8
  halves = 0
  for k in want:
    assert got[k]["examples"] == want[k]["examples"], k
    if "by_process" in got[k]:  # the steps 2 processes ran: each read its own 4 rows
      a, b = got[k]["by_process"]
      assert len(a) == len(b) == 4 and a + b == want[k]["examples"], got[k]
      halves += 1
  assert halves >= 3, got  # steps of the first and the last 2-process runs

"""Outputs anywhere epath (and Orbax) can write: the code path a gs:// output_dir takes (no lock,
whole-object writes, logs rewritten whole, epath checkpoints), run here on a local folder by
treating it as remote."""

from __future__ import annotations

import json

import numpy as np
import pytest
from etils import epath
from safetensors.numpy import load_file

from safemoe_jax.io import paths
from safemoe_jax.train import config as train_cfg
from safemoe_jax.train import loop as train_loop
from safemoe_jax.train.metrics import open_append, read_jsonl
from safemoe_jax.train.rundir import RunDir
from tests.fixtures import tiny_run


def test_local_and_remote_locations():
  assert paths.is_local("/tmp/x") and paths.is_local("runs/x") and paths.is_local(epath.Path("/a"))
  assert not paths.is_local("gs://bucket/run") and not paths.is_local(epath.Path("gs://b/r"))
  assert type(RunDir("/tmp/x").path).__name__ == "PosixPath"
  remote = RunDir("gs://bucket/run")
  assert isinstance(remote.path, epath.Path) and str(remote.checkpoints("phase1")) == \
      "gs://bucket/run/checkpoints/phase1"
  assert str(paths.absolute(remote.path)) == "gs://bucket/run"


@pytest.fixture
def as_remote(monkeypatch, tmp_path):
  """Every path under tmp_path takes the remote (gs://) code path, on the local disk."""
  local = paths.is_local
  monkeypatch.setattr(paths, "is_local", lambda p: local(p) and not str(p).startswith(
      str(tmp_path / "remote")))
  return tmp_path / "remote"


def test_remote_log_drops_a_torn_line_and_is_written_whole(as_remote, monkeypatch):
  as_remote.mkdir()
  f = as_remote / "m.jsonl"
  f.write_text('{"a": 1}\n{"a": 2')
  monkeypatch.setattr(paths.RemoteAppend, "interval", 3600.0)
  log = open_append(f)
  assert isinstance(log, paths.RemoteAppend)
  log.write('{"a": 3}\n')  # the first write is written at once, then at most every interval
  assert read_jsonl(f) == [{"a": 1}, {"a": 3}]
  log.write('{"a": 4}\n')
  assert read_jsonl(f) == [{"a": 1}, {"a": 3}]
  log.close()
  assert read_jsonl(f) == [{"a": 1}, {"a": 3}, {"a": 4}]
  rd = RunDir(as_remote)
  assert isinstance(rd.path, epath.Path) and rd.lock() is None  # object stores have no locks
  rd.write_json(rd.summary, {"x": 1})
  assert json.loads(rd.summary.read_text()) == {"x": 1}
  assert not list(as_remote.glob("*.tmp"))


def test_remote_log_writes_its_first_line_at_once_whatever_the_clock(as_remote, monkeypatch):
  """Monotonic time starts anywhere (on Linux at boot): a machine up for 5 s, less than the
  rewrite interval, still writes the first line at once, then waits out the interval."""
  now = [5.0]
  monkeypatch.setattr(paths.time, "monotonic", lambda: now[0])
  as_remote.mkdir()
  f = as_remote / "m.jsonl"
  log = open_append(f)
  assert isinstance(log, paths.RemoteAppend)
  log.write('{"a": 1}\n')
  assert read_jsonl(f) == [{"a": 1}]
  log.write('{"a": 2}\n')
  assert read_jsonl(f) == [{"a": 1}]  # within the interval: held back
  now[0] += paths.RemoteAppend.interval
  log.write('{"a": 3}\n')
  assert read_jsonl(f) == [{"a": 1}, {"a": 2}, {"a": 3}]
  log.close()


@pytest.mark.slow
def test_training_to_a_remote_output_dir(as_remote, tmp_path):
  model, data = tiny_run.write_model(tmp_path / "model"), tiny_run.write_data(tmp_path / "d.jsonl")
  ov = tiny_run.overrides(model, data, as_remote, **{"phase1.steps": 2, "phase2.steps": 2})
  summary = train_loop.run(train_cfg.load_config(None, ov))
  assert not (as_remote / ".lock").exists()  # the local run's flock file is never made
  rows = read_jsonl(as_remote / "metrics.jsonl")
  assert [r["step"] for r in rows if r["tag"].endswith("/train")] == [1, 2, 1, 2]
  assert sorted(p.name for p in (as_remote / "checkpoints" / "phase2").iterdir()) == ["2"]
  assert (as_remote / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
  router = load_file(str(as_remote / "router.safetensors"))
  assert json.loads((as_remote / "safemoe.json").read_text())["output_dir"] == str(as_remote)
  # The same command again: both artifacts are read back through the remote path.
  train_loop.run(train_cfg.load_config(None, ov))
  for k, v in load_file(str(as_remote / "router.safetensors")).items():
    np.testing.assert_array_equal(v, router[k])
  assert summary["artifacts"]["router"] == str(as_remote / "router.safetensors")

"""Outputs anywhere epath (and Orbax) can write: the code path a gs:// output_dir takes (no lock,
whole-object writes, logs rewritten whole, epath checkpoints), run here on a local folder by
treating it as remote."""

from __future__ import annotations

import importlib
import json

import fsspec
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.utils import stringify_path
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


class _GsMemory(MemoryFileSystem):
  """fsspec's in-memory filesystem answering for gs:// (a bucket in this process)."""
  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = stringify_path(path)
    for p in ("gs://", "gcs://"):
      path = path.removeprefix(p)
    return MemoryFileSystem._strip_protocol(path)


@pytest.fixture
def gs_memory(monkeypatch):
  """gs:// through epath's real fsspec backend, onto fsspec's memory filesystem."""
  from etils.epath import backend as epath_backend
  for name in ("gs", "gcs"):  # fsspec's registry (restored afterwards)
    monkeypatch.setitem(importlib.import_module("fsspec.registry")._registry, name, _GsMemory)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  _GsMemory.store.clear()
  yield _GsMemory()
  _GsMemory.store.clear()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


def test_a_gs_run_folder_through_a_real_fsspec_backend(gs_memory):
  """What the trainer itself writes to a gs:// output_dir (run.json, the summary, append-only logs,
  the experts and router artifacts) goes through epath's fsspec backend into the bucket, and
  reads back; nothing touches the local disk."""
  from safemoe_jax.train.checkpoint import load_group, save_group
  rd = RunDir("gs://bucket/run")
  assert isinstance(rd.path, epath.Path) and rd.lock() is None
  rd.path.mkdir(parents=True, exist_ok=True)
  rd.write_json(rd.summary, {"x": 1})
  assert json.loads(rd.summary.read_text()) == {"x": 1}
  assert gs_memory.exists("/bucket/run/safemoe.json")
  log = open_append(rd.path / "metrics.jsonl")
  assert isinstance(log, paths.RemoteAppend)
  log.write('{"step": 1}\n')
  log.close()
  gs_memory.pipe("/bucket/run/metrics.jsonl", gs_memory.cat("/bucket/run/metrics.jsonl") + b'{"st')
  log = open_append(rd.path / "metrics.jsonl")  # a torn last line is dropped on open
  log.write('{"step": 2}\n')
  log.close()
  assert read_jsonl(rd.path / "metrics.jsonl") == [{"step": 1}, {"step": 2}]
  state = nnx.State({"w": nnx.Param(jnp.arange(6.0).reshape(2, 3))})
  save_group(rd.experts, state, {"kind": "test"})
  assert gs_memory.exists("/bucket/run/experts.safetensors")
  back = nnx.State({"w": nnx.Param(jnp.zeros((2, 3)))})
  load_group(rd.experts, back)
  np.testing.assert_array_equal(np.asarray(back["w"].get_value()), np.arange(6.0).reshape(2, 3))


def test_a_missing_storage_backend_is_one_error_line(monkeypatch, capsys):
  """A fresh install has no gcsfs: `train output_dir=gs://...` says which extra to install."""
  from safemoe_jax.cli import train as train_cmd
  monkeypatch.setattr(paths, "_importable", lambda m: m != "gcsfs")
  assert train_cmd.main(["output_dir=gs://bucket/run"]) == 2
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "needs gcsfs, which is not installed" in lines[0], err
  assert "safemoe_jax[tpu]" in lines[0] and "Traceback" not in err
  monkeypatch.setattr(paths, "_importable", lambda m: True)
  paths.require_backend("gs://bucket/run")  # installed: no error
  with pytest.raises(paths.PathError, match=r"ftp:// is not a location"):
    paths.require_backend("ftp://host/run")

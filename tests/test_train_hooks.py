"""The training loop's hooks: metrics come to the host once per logging interval (log.every),
not every step; each step still gets its own record."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax._src import array as jax_array

from safemoe_jax.train import config as train_cfg
from safemoe_jax.train import loop as train_loop
from tests.fixtures import tiny_run


class HostReads:
  """Counts every read of a device array on the host (jax.device_get, np.asarray / np.array of
  a jax.Array, float / bool / item / tolist), by the number of train steps dispatched so far."""

  def __init__(self, monkeypatch):
    self.phase, self.steps, self.at = None, 0, []
    value = jax_array.ArrayImpl.__dict__["_value"]
    monkeypatch.setattr(jax_array.ArrayImpl, "_value",
                        property(lambda a: (self.read(), value.fget(a))[1]))
    for mod, name in ((jax, "device_get"), (np, "asarray"), (np, "array")):
      real = getattr(mod, name)
      monkeypatch.setattr(mod, name, self.wrap(real))
    init = train_loop.Phase.__init__

    def counted_init(phase, *a, **k):
      init(phase, *a, **k)
      step_fn = phase.step_fn

      def dispatch(*args):
        self.steps += 1
        return step_fn(*args)
      self.phase, self.steps, phase.step_fn = phase.name, 0, dispatch
    monkeypatch.setattr(train_loop.Phase, "__init__", counted_init)

  def wrap(self, real):
    def f(x, *a, **k):
      if any(isinstance(l, jax.Array) for l in jax.tree.leaves(x)):
        self.read()
      return real(x, *a, **k)
    return f

  def read(self):
    if self.phase is not None and self.steps > 0:
      self.at.append((self.phase, self.steps))


@pytest.mark.slow
def test_metrics_reach_the_host_once_per_logging_interval(tmp_path, monkeypatch):
  model_dir, data = tiny_run.write_model(tmp_path / "model"), tiny_run.write_data(tmp_path / "d.jsonl")
  out = tmp_path / "run"
  cfg = train_cfg.load_config(None, tiny_run.overrides(model_dir, data, out, **{
      "phase1.steps": 8, "phase1.ckpt_every": 8, "phase2.steps": 0, "log.every": 4}))
  reads = HostReads(monkeypatch)
  train_loop.run(cfg)
  # Reads of device arrays happen at the end of each interval (steps 4 and 8; 8 also holds the
  # checkpoint and the validation), never after the other steps' dispatch.
  assert {s for p, s in reads.at if p == "phase1"} == {4, 8}, sorted(set(reads.at))
  rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if r["tag"] == "phase1/train"]
  assert [r["step"] for r in train] == list(range(1, 9))  # still one record per step
  assert all(np.isfinite(r["ce"]) and r["lr"] >= 0 and r["step_time_s"] > 0 for r in train)
  # each step's own learning rate: one warm-up step from 0, then linear decay over 8
  assert [r["lr"] for r in train][:3] == pytest.approx([0.0, 0.02, 0.02 * (1 - 1 / 8)])


class Rows:
  def __init__(self):
    self.rows = []

  def write(self, rec, step, tag):
    self.rows.append((tag, step, rec))


def _metrics(bad: bool) -> dict:
  import jax.numpy as jnp
  x = jnp.float32(jnp.nan if bad else 1.0)
  return {"loss": x, "ce": x, "aux_loss": jnp.float32(0), "grad_norm": x, "tokens": jnp.float32(8),
          "nonfinite": jnp.bool_(bad), "update_nonfinite": jnp.bool_(False)}


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nonfinite_step_found_at_the_flush_stops_there_or_is_skipped(tmp_path, mode):
  """The flush handles each buffered step in order: in stop mode it raises at the first
  non-finite one, naming it and its batch, with the steps before it written and none after."""
  from safemoe_jax.train.checkpoint import NonFiniteError
  from safemoe_jax.train.config import PhaseConfig
  from safemoe_jax.train.hooks import MetricsHook
  rows = Rows()
  hook = MetricsHook("phase1", PhaseConfig(steps=4, on_nonfinite=mode), 4, rows,
                     lambda s: 0.1 * s, tmp_path, start=0, progress=False)
  for step in range(1, 5):
    hook.add(step, _metrics(step == 2), 8.0, np.array([10 * step, 10 * step + 1]))
    assert not rows.rows and hook.due(step) == (step == 4)  # nothing on the host before the flush
  if mode == "stop":
    with pytest.raises(NonFiniteError, match=r"at step 2 of phase1, examples \[20, 21\]"):
      hook.flush()
    assert [s for _, s, _ in rows.rows] == [1]
  else:
    hook.flush()
    assert [(s, r["skipped"]) for _, s, r in rows.rows] == [(1, False), (2, True), (3, False),
                                                          (4, False)]
    assert [r["lr"] for _, _, r in rows.rows] == pytest.approx([0.0, 0.1, 0.2, 0.3])

"""Evaluation and generation load a run sharded like training (RunDir.load_model: abstract init,
each device's base slice read from the checkpoint): on 8 devices (a subprocess with 8 fake CPU
devices) the model is split over them, and the evaluation's answers equal one device's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import tiny_run

ROOT = Path(__file__).resolve().parents[1]
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _evaluate(run: Path, benign: Path) -> dict[tuple[str, str], str]:
  from safemoe_jax.evaluation import config as EC
  from safemoe_jax.evaluation.run import evaluate_run
  ecfg = EC.EvalConfig(systems=("base", "safemoe", "uniform"), judges=("refusal_strings",),
                       max_new_tokens=6, batch_size=4, wheel_benign=False,
                       benign_file=str(benign), default_count=4)
  evaluate_run(run, ecfg, progress=False, log=lambda m: None, report=False)
  rows = [json.loads(l) for l in (run / "eval" / "generations.jsonl").read_text().splitlines()]
  return {(r["system"], r["prompt"]): r["response"] for r in rows}


def _child(run: str, benign: str) -> None:
  import jax
  import numpy as np
  from flax import nnx
  from safemoe_jax.train.rundir import RunDir
  assert jax.device_count() == 8, jax.devices()
  loaded = RunDir(run).load_model()
  flat = {".".join(map(str, p)): v.get_value()
          for p, v in nnx.to_flat_state(nnx.state(loaded.model))}
  assert dict(flat["layers.q"].sharding.mesh.shape) == MESH
  for key in ("layers.q", "layers.gate", "embed"):  # each device holds a part, not the whole
    x = flat[key]
    biggest = max(s.data.nbytes for s in x.addressable_shards)
    assert biggest <= x.nbytes // 2, (key, x.sharding.spec, biggest, x.nbytes)
  np.testing.assert_array_equal(loaded.host_params()["layers.q"], np.asarray(flat["layers.q"]))
  answers = _evaluate(Path(run), Path(benign))
  print("ANSWERS", json.dumps(sorted([list(k) + [v] for k, v in answers.items()])))


@pytest.mark.slow
def test_evaluation_on_eight_devices_is_sharded_and_answers_like_one(tmp_path):
  from safemoe_jax.cli import train as train_cmd
  from safemoe_jax.train import config as train_cfg
  model = tiny_run.write_model(tmp_path / "model")
  data = tiny_run.write_data(tmp_path / "data.jsonl")
  one = tmp_path / "run1"
  train_cmd.run(train_cfg.load_config(None, tiny_run.overrides(model, data, one, **{
      "phase1.steps": 2, "phase2.steps": 2, "data.split.eval": 0.25})))
  eight = tmp_path / "run8"
  shutil.copytree(one, eight)
  info = json.loads((eight / "run.json").read_text())  # as a run trained on a 2x2x2 mesh says
  info["config"]["mesh"].update(MESH)
  (eight / "run.json").write_text(json.dumps(info))
  benign = tmp_path / "benign.txt"
  benign.write_text("how do tides work\nwhat is a calm reply\n")
  want = _evaluate(one, benign)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  r = subprocess.run([sys.executable, "-c", "from tests.test_sharded_eval import _child; "
                      f"_child({str(eight)!r}, {str(benign)!r})"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  line = [l for l in r.stdout.splitlines() if l.startswith("ANSWERS ")]
  assert r.returncode == 0 and line, r.stdout[-2000:] + r.stderr[-5000:]
  got = {(s, p): a for s, p, a in json.loads(line[0][8:])}
  assert len(want) >= 12 and got == want

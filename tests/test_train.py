"""`python -m safemoe_jax.train` on a tiny model: both phases, freezing, resume, config errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from safemoe_jax.cli import train as train_cmd
from safemoe_jax.train import config as train_cfg
from safemoe_jax.train import loop as train_loop
from safemoe_jax.core import config as C
from safemoe_jax.core.config import ConfigError
from tests.fixtures import tiny_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_train")
  return tiny_run.write_model(d / "model"), tiny_run.write_data(d / "data.jsonl")


def _rows(out: Path, tag: str) -> list[dict]:
  return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()
          if json.loads(l)["tag"] == tag]


@pytest.mark.slow
def test_both_phases_run_loss_falls_and_phase2_freezes_base_and_experts(tiny, tmp_path):
  model_dir, data = tiny
  out = tmp_path / "run"
  cfg = train_cfg.load_config(None, tiny_run.overrides(model_dir, data, out,
                                                   **{"phase1.steps": 10}))
  summary, model = train_loop.run_with_model(cfg)
  p1 = [r["ce"] for r in _rows(out, "phase1/train")]
  p2 = [r["ce"] for r in _rows(out, "phase2/train")]
  assert len(p1) == 10 and len(p2) == 6
  assert np.mean(p1[-3:]) < np.mean(p1[:3]) - 0.05, p1
  # an honest run falls by 0.09 (5.934 -> 5.844); a router that never moves, by about 0.001
  assert np.mean(p2[-3:]) < np.mean(p2[:3]) - 0.03, p2
  for k in ("experts", "router", "loss_curves"):
    assert Path(summary["artifacts"][k]).exists()
  # Phase 2 trained only the router: the final experts equal the phase-1 artifact and the base
  # equals the checkpoint on disk, bit for bit; the router moved away from its initialisation.
  from flax import nnx
  from safemoe_jax.io import weights
  from safemoe_jax.core.experts import ExpertParam, RouterParam
  flat = lambda st: {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(st)}
  experts = load_file(str(out / "experts.safetensors"))
  assert flat(nnx.state(model, ExpertParam)).keys() == experts.keys()
  for k, v in flat(nnx.state(model, ExpertParam)).items():
    np.testing.assert_array_equal(v, experts[k])
  assert all(np.abs(v).sum() > 0 for k, v in experts.items() if ".B_" in k)
  router = load_file(str(out / "router.safetensors"))
  for k, v in flat(nnx.state(model, RouterParam)).items():
    np.testing.assert_array_equal(v, router[k])
  # The router at initialisation: the same construction and seed as the run.
  from safemoe_jax.core.model import SafeMoELM
  init = SafeMoELM(model.cfg, cfg.experts_config(), cfg.router, rngs=nnx.Rngs(cfg.seed))
  init_router = flat(nnx.state(init, RouterParam))
  assert init_router.keys() == router.keys()
  moved = max(np.abs(router[k] - init_router[k]).max() for k in router)
  assert moved > 0.02, moved  # 6 Adam steps of lr 0.05 moved it by 0.16 (measured)
  _, base = weights.load_hf_checkpoint(model_dir)
  np.testing.assert_array_equal(np.asarray(model.layers.q[...]), base["layers.q"])
  np.testing.assert_array_equal(np.asarray(model.embed[...]), base["embed"])
  summary_json = json.loads((out / "safemoe.json").read_text())
  assert summary_json["domains"] == ["alpha", "beta"]
  assert "ce" in summary_json["metrics"]["phase1"]["val"]


@pytest.mark.slow
def test_stopped_after_phase1_resumes_at_phase2(tiny, tmp_path):
  model_dir, data = tiny
  out = tmp_path / "run"
  train_cmd.run(train_cfg.load_config(None, tiny_run.overrides(model_dir, data, out,
                                                       **{"phase2.steps": 0})))
  experts_before = load_file(str(out / "experts.safetensors"))
  assert not (out / "router.safetensors").exists()
  n1 = len(_rows(out, "phase1/train"))
  train_cmd.run(train_cfg.load_config(None, tiny_run.overrides(model_dir, data, out)))
  assert len(_rows(out, "phase1/train")) == n1  # phase 1 was not trained again
  assert len(_rows(out, "phase2/train")) == 6
  experts_after = load_file(str(out / "experts.safetensors"))
  for k in experts_before:
    np.testing.assert_array_equal(experts_before[k], experts_after[k])


@pytest.mark.slow
def test_mid_phase_checkpoint_resumes_at_its_step(tiny, tmp_path):
  """Killed after the step-4 checkpoint of 6: the resumed run continues with the saved
  parameters, optimiser state and data iterator, and ends bit-identical to an uninterrupted one."""
  model_dir, data = tiny
  out = tmp_path / "run"
  ov = tiny_run.overrides(model_dir, data, out, **{"phase2.steps": 0})
  train_cmd.run(train_cfg.load_config(None, ov))  # uninterrupted: checkpoints 4 and 6 are kept
  reference = load_file(str(out / "experts.safetensors"))
  ckpts = out / "checkpoints" / "phase1"
  assert (ckpts / "4").is_dir() and (ckpts / "6").is_dir()
  shutil.rmtree(ckpts / "6")  # as if killed during step 5
  (out / "experts.safetensors").unlink()
  train_cmd.run(train_cfg.load_config(None, ov))
  steps = [r["step"] for r in _rows(out, "phase1/train")]
  assert steps == [1, 2, 3, 4, 5, 6, 5, 6], steps  # resumed at step 5
  resumed = load_file(str(out / "experts.safetensors"))
  assert resumed.keys() == reference.keys()
  for k in reference:
    np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)
  # sensitivity guards: steps 5 and 6 update with a non-zero learning rate, and on other
  # examples than steps 1 and 2 (what a restarted data iterator would feed)
  assert all(r["lr"] > 0 for r in _rows(out, "phase1/train")[4:]), _rows(out, "phase1/train")
  order = {r["step"]: r["examples"] for r in map(json.loads, (out / "data_order.jsonl")
                                                  .read_text().splitlines())}
  assert sorted(order[5] + order[6]) != sorted(order[1] + order[2]), order


def test_restore_takes_the_newest_of_several_checkpoints(tmp_path):
  """Checkpoints 2, 4 and 6 on disk: a restarted phase resumes from 6 with 6's parameters,
  optimiser state and data position; with 6 unreadable, from 4 (the next newest), not 2."""
  import dataclasses
  import jax
  from flax import nnx
  from safemoe_jax.core import sharding as S
  from safemoe_jax.core.model import SafeMoELM
  from safemoe_jax.train.metrics import MetricsWriter
  from tests.test_experts import ALL, TINY
  cfg = dataclasses.replace(train_cfg.TrainConfig(), keep_checkpoints=3)
  out = tmp_path / "run"

  def phase() -> train_loop.Phase:
    m = SafeMoELM(TINY, C.ExpertsConfig(num_experts=2, rank=4, targets=ALL), C.RouterConfig(),
                  rngs=nnx.Rngs(0))
    return train_loop.Phase("phase1", cfg.phase1, cfg, m, "experts", "oracle",
                            S.make_mesh(cfg.mesh), out, MetricsWriter(out, tensorboard=False))

  ph = phase()
  saved = {}
  for step in (2, 4, 6):
    ph.params = jax.tree.map(lambda x: x + step, ph.params)
    ph.opt = jax.tree.map(lambda x: x + step, ph.opt)
    ph.save(step, {"position": step})
    saved[step] = jax.tree.map(np.asarray, (ph.params, ph.opt))
  assert sorted(int(p.name) for p in (out / "checkpoints" / "phase1").iterdir()) == [2, 4, 6]
  for newest in (6, 4):
    again = phase()
    assert again.restore_latest() == (newest, {"position": newest})
    for a, b in zip(jax.tree.leaves(saved[newest]), jax.tree.leaves((again.params, again.opt))):
      np.testing.assert_array_equal(a, np.asarray(b))
    if newest == 6:
      os.truncate(out / "checkpoints" / "phase1" / "6" / "meta" / "metadata", 5)  # unreadable
  assert not (out / "checkpoints" / "phase1" / "6").exists()  # moved aside, 2 left in place
  assert (out / "checkpoints" / "phase1" / "2").is_dir()


def test_a_process_other_than_0_writes_nothing_to_the_run_folder(tiny, tmp_path, monkeypatch):
  # On a pod every process runs the trainer on one shared output_dir; only process 0 may write
  # the run's files (CI once saw process 1's run.json race process 0's on a shared .tmp). Here
  # the trainer believes it is process 1 and is stopped where the metrics writer would start,
  # after everything that sets the folder up.
  import jax

  class Process1:
    def __getattr__(self, name):
      return getattr(jax, name)

    @staticmethod
    def process_index():
      return 1

  class Stop(Exception):
    pass

  def stop(*a, **k):
    raise Stop

  model_dir, data = tiny
  out = tmp_path / "run"
  monkeypatch.setattr(train_loop, "jax", Process1())
  monkeypatch.setattr(train_loop, "MetricsWriter", stop)
  with pytest.raises(Stop):
    train_loop.run(train_cfg.load_config(None, tiny_run.overrides(model_dir, data, out)))
  assert not out.exists() or not list(out.iterdir()), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("override,match", [
    ("phase1.stepz=3", r"unknown key\(s\) \['stepz'\].*valid keys"),
    ("phase1.steps=many", r"phase1.steps: expected an integer"),
    ("router.activation=relu", r"router.activation: 'relu' is not one of"),
    ("experts.rank=0", r"experts.rank must be > 0"),
    ("data.domains=[]", r"data.domains must be a non-empty list"),
    ("experts.num_experts=3", r"one expert per domain"),
])
def test_config_errors_are_clear(override, match):
  with pytest.raises(ConfigError, match=match):
    train_cfg.load_config(None, [override])


def test_cli_reports_config_errors_with_exit_status_2(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "safemoe_jax.train", "phase1.lr=-1",
                         f"output_dir={tmp_path / 'x'}"], capture_output=True, text=True,
                        cwd=ROOT, timeout=300)
  assert proc.returncode == 2 and "phase1.lr must be > 0" in proc.stderr
  assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_one_device_and_eight_devices_agree(tiny, tmp_path):
  model_dir, data = tiny
  losses = {}
  for n, mesh in ((1, []), (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])):
    out = tmp_path / f"run{n}"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    ov = tiny_run.overrides(model_dir, data, out, **{"phase1.steps": 3, "phase2.steps": 3})
    proc = subprocess.run([sys.executable, "-m", "safemoe_jax.train", *ov, *mesh],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses[n] = [r["loss"] for tag in ("phase1/train", "phase2/train") for r in _rows(out, tag)]
  np.testing.assert_allclose(losses[1], losses[8], rtol=2e-5)


def test_shipped_configs_load_and_embedded_yaml_is_the_default():
  assert train_cfg.load_config(str(ROOT / "configs/embedded.yaml")) == train_cfg.load_config(None)
  for name in ("llama31_8b_tpu.yaml", "gpu_small.yaml"):
    cfg = train_cfg.load_config(str(ROOT / "configs" / name))
    assert cfg.experts_config().num_experts == 14 and cfg.model.param_dtype == "bfloat16"


def test_a_partial_section_keeps_the_embedded_defaults_other_fields():
  """A dotted override (or a YAML section that names some fields) changes those fields only; the
  section's others stay the embedded default's, not the section class's defaults."""
  d = train_cfg.load_config(None)
  cfg = train_cfg.load_config(None, ["phase1.steps=200", "data.batch_size=4",
                                     "data.split.eval=0.2", "router.init_std=0.01"])
  assert cfg.phase1.steps == 200 and cfg.phase1.lr == d.phase1.lr == 3e-4
  assert cfg.data.batch_size == 4 and cfg.data.bucket_lengths == d.data.bucket_lengths
  assert cfg.data.phase2_targets == "embedded" and cfg.data.phase2_harmful
  assert cfg.data.split.eval == 0.2 and cfg.data.split.validation == d.data.split.validation
  assert cfg.router.init_std == 0.01 and cfg.router.granularity == "per_sequence"
  assert cfg.router.max_l1 == 1.0
  # what a run records (every field) reads back to itself
  assert C.from_dict(train_cfg.TrainConfig, C.to_dict(cfg)) == cfg


def test_the_embedded_default_trains_the_variant_the_validation_half_chose():
  """The embedded default's phase 2 is configs/sweep.yaml's npo_retain_seq (the variant its
  validation half chose; README "Evidence"): same router, objective and kinds of phase-2 rows."""
  sweep = C.load_yaml(ROOT / "configs/sweep.yaml")
  chosen = train_cfg.load_config(str(ROOT / "configs/sweep_train.yaml"),
                                 [str(o) for o in sweep["variants"]["npo_retain_seq"]])
  d = train_cfg.load_config(None)
  assert d.router == chosen.router and d.objective == chosen.objective
  assert (d.data.phase2_harmful, d.data.phase2_retain) == (chosen.data.phase2_harmful,
                                                           chosen.data.phase2_retain)
  assert (d.phase2, d.phase1, d.experts) == (chosen.phase2, chosen.phase1, chosen.experts)
  assert d.data.phase2_targets == "embedded"


@pytest.mark.parametrize("override,match", [
    (["data.phase2_harmful=false"], r"needs data.phase2_harmful=true"),
    (["objective.contrast=none"], r"needs a contrast term"),
    (["objective.retain_coef=0"], r"go together"),
    (["data.phase2_retain=''"], r"go together"),
    (["objective.beta=-1"], r"objective.beta must be >= 0"),
])
def test_phase2_objective_and_its_rows_go_together(override, match):
  with pytest.raises(ConfigError, match=match):
    train_cfg.load_config(None, override)


@pytest.mark.slow
def test_phase2_with_curated_targets_a_contrast_and_a_retain_term(tiny, tmp_path):
  """The curated set replaces the selection (rows on held-out prompts dropped and counted);
  phase 1's harmful answers and benign retain rows join phase 2 with their kinds, and every term
  is trained and logged; the SFT baseline's view of the set holds the targets only."""
  from safemoe_jax.data.encode import build
  from safemoe_jax.io.base import load_base
  model_dir, data = tiny
  rows = [json.loads(l) for l in data.read_text().splitlines()]
  curated, retain = tiny_run.write_phase2_files(tmp_path, data, 8)
  out = tmp_path / "run"
  cfg = train_cfg.load_config(None, tiny_run.overrides(
      model_dir, data, out, **{"data.phase2_targets": str(curated), "data.phase2_harmful": True,
                               "data.phase2_retain": str(retain), "objective.contrast": "npo",
                               "objective.retain_coef": 0.5, "phase2.steps": 4}))
  summary, _ = train_loop.run_with_model(cfg)
  card = summary["data_card"]
  funnel = card["funnel"]["train"]
  dropped = sum(v for k, v in funnel.items() if k.startswith("curated row on a"))
  kept = funnel["phase 2: curated target"]
  assert dropped > 0 and kept + dropped == len(rows)
  assert funnel["phase 2: benign retain rows"] == 8
  p2 = _rows(out, "phase2/train")
  assert len(p2) == 4 and all("contrast" in r and "retain" in r and "nll" in r for r in p2)
  assert any(r["contrast"] > 0 for r in p2) and any(r["retain"] > 0 for r in p2)
  tok = load_base(cfg.model.path).tokenizer
  d = build(cfg.data, tok)
  ex = d.phase2["train"]
  assert sorted(set(ex.kind_N.tolist())) == [0, 1, 2]
  assert (ex.kind_N == 1).sum() == len(d.sets.phase1["train"])
  t = ex.targets_only()
  assert len(t) == kept and not t.kind_N.any()
  assert all(r["source"] == "curated" for r in t.records)
  b = next(iter(d.train_iterator(2)))
  assert "kind" in b and b["kind"].shape == (cfg.data.batch_size,)


def test_step_meter_tokens_per_s_mfu_and_goodput():
  from safemoe_jax.train.metrics import StepMeter
  m = StepMeter(lambda seq: 100.0 * seq, peak_flops=1e3, devices=2)
  first = m(10.0, 4, 0.5)  # the compiling step: not productive time
  assert first["tokens_per_s"] == 20.0 and first["goodput"] == 0.0
  assert first["mfu"] == 400.0 * 10.0 / 0.5 / (1e3 * 2)  # model FLOPs/s over 2 devices' peak
  assert m(8.0, 2, 0.25)["mfu"] == 200.0 * 8.0 / 0.25 / 2e3  # the step's own length
  assert m.steady == 0.25
  assert "mfu" not in StepMeter(lambda seq: 1.0, None, 1)(1.0, 1, 1.0)  # no known peak (CPU)


def _assert_step_metrics_and_trace(out: Path, model, cfg, peak: float) -> None:
  """tokens_per_s, mfu (against `peak`, 1 device) and goodput in every phase-1 record, in
  metrics.jsonl and TensorBoard; one profiler trace (profile.steps=[2,3])."""
  from safemoe_jax.core.flops import train_flops_per_token
  rows = _rows(out, "phase1/train")
  e = cfg.experts_config()
  for r in rows:
    assert r["tokens_per_s"] == pytest.approx(r["input_tokens"] / r["step_time_s"], rel=1e-9)
    fl = r["mfu"] * peak / r["tokens_per_s"]  # model FLOPs per token
    assert fl == pytest.approx(train_flops_per_token(model.cfg, 64, "phase1", e.num_experts,
                                                     e.rank, e.targets)["total"], rel=1e-9)
  good = [r["goodput"] for r in rows]
  assert good[0] == 0.0 and all(0 < g < 1 for g in good[1:]) and good[1] < good[-1]
  traces = list((out / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, list((out / "profile").rglob("*"))
  tags = _tensorboard_tags(out / "tensorboard")
  for k in ("tokens_per_s", "mfu", "goodput"):
    assert tags.count(f"phase1/train/{k}") == len(rows), sorted(set(tags))


def _tensorboard_tags(folder: Path) -> list[str]:
  """The scalar tags of every record of the TensorBoard event files in `folder` (TFRecords:
  length, its CRC, the Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2
  tags = []
  for f in folder.rglob("events.out.tfevents.*"):
    data, i = f.read_bytes(), 0
    while i < len(data):
      n = int.from_bytes(data[i:i + 8], "little")
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      tags += [v.tag for v in ev.summary.value]
      i += 12 + n + 4
  return tags


@pytest.mark.parametrize("steps, match", [("[3]", r"\[first, last\]"), ("[3,2]", "first <= last"),
                                          ("[5,9]", "ends after phase1's 6 steps")])
def test_profile_steps_must_lie_inside_the_phase(tiny, tmp_path, steps, match):
  model_dir, data = tiny
  with pytest.raises(ConfigError, match=match):
    train_cfg.load_config(None, tiny_run.overrides(model_dir, data, tmp_path,
                                                   **{"profile.steps": steps}))


@pytest.mark.slow
def test_async_checkpoints_are_waited_for_on_sigterm_and_resume_bit_identically(tiny, tmp_path,
                                                                               monkeypatch):
  """async_checkpoints: saves go on in the background while training continues; the one on
  SIGTERM is finished before the trainer stops, and resuming from it ends bit-identical to a
  synchronous run. The synchronous run also logs tokens/s, MFU and goodput per step and writes
  the profile.steps trace."""
  import orbax.checkpoint as ocp
  model_dir, data = tiny
  ov = lambda out, **kw: tiny_run.overrides(model_dir, data, out, **{
      "phase2.steps": 0, "phase1.ckpt_every": 1, **kw})
  # The synchronous reference also checks the step metrics and profile.steps (one run less).
  monkeypatch.setattr(train_loop, "device_peak_flops", lambda: (1e9, "a test peak"))
  cfg = train_cfg.load_config(None, ov(tmp_path / "sync", **{"profile.steps": "[2,3]",
                                                              "log.tensorboard": True}))
  _, model = train_loop.run_with_model(cfg)
  _assert_step_metrics_and_trace(tmp_path / "sync", model, cfg, 1e9)
  reference = load_file(str(tmp_path / "sync" / "experts.safetensors"))

  calls: list[str] = []  # the trainer's saves, and its own waits (Orbax's save also waits for
  save, wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished  # the last)
  inside = []

  def spy_save(self, step, *a, **k):
    calls.append(f"save {step}")
    inside.append(1)
    try:
      return save(self, step, *a, **k)
    finally:
      inside.pop()

  monkeypatch.setattr(ocp.CheckpointManager, "save", spy_save)
  def spy_wait(self):
    if not inside:
      calls.append("wait")
    return wait(self)

  monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", spy_wait)

  class SigtermAfterStep3(train_loop.SignalGuard):  # the loop sees SIGTERM at its 4th check
    checks = 0

    def stop(self) -> bool:
      SigtermAfterStep3.checks += 1
      self.flag = self.own = self.flag or SigtermAfterStep3.checks == 4
      return self.flag

  monkeypatch.setattr(train_loop, "SignalGuard", SigtermAfterStep3)
  out = tmp_path / "async"
  with pytest.raises(train_loop.Preempted, match="phase1 stopped at step 4"):
    train_loop.run(train_cfg.load_config(None, ov(out, async_checkpoints=True)))
  saves = [c for c in calls if c.startswith("save")]
  assert saves == ["save 1", "save 2", "save 3", "save 4"], calls
  # the saves of steps 1-3 in the background, SIGTERM's (step 4) finished before stopping
  assert calls[:5] == ["save 1", "save 2", "save 3", "save 4", "wait"], calls
  assert (out / "checkpoints" / "phase1" / "4").is_dir()
  monkeypatch.setattr(train_loop, "SignalGuard", SignalGuardOriginal)
  train_loop.run(train_cfg.load_config(None, ov(out, async_checkpoints=True)))
  assert [r["step"] for r in _rows(out, "phase1/train")] == [1, 2, 3, 4, 5, 6]
  resumed = load_file(str(out / "experts.safetensors"))
  assert resumed.keys() == reference.keys()
  for k in reference:
    np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)


SignalGuardOriginal = train_loop.SignalGuard

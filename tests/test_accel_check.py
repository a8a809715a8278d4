"""launch/accelerator_check.sh (safemoe_jax/tools/accel_check.py): the SMOKE run on CPU, and the
verdicts it draws from the figures of the device run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from safemoe_jax.cli import accel_check as accel_cli
from safemoe_jax.io.weights import config_from_hf
from safemoe_jax.tools import accel_check as A
from safemoe_jax.tools import accel_fixture as F
from safemoe_jax.tools import accel_load as L

ROOT = Path(__file__).resolve().parents[1]


def _child_doc(**kw) -> dict:
  """The load-and-step process's figures, as on a GPU that keeps memory statistics."""
  doc = {"devices": 1, "checkpoint_bytes": 2.5e9, "model_bytes": 2.5e9, "load_s": 10.0,
         "peak_rss_mb": 1500.0, "rss_before_mb": 1000.0, "per_device_bytes_max": 2.5e9,
         "slice_bytes": 2.5e9, "device_stats_after_load": {"bytes_in_use": 2.5e9,
                                                            "peak_bytes_in_use": 2.6e9},
         "aot_total_bytes_per_device": 10e9,
         "device_stats_after_steps": {"bytes_in_use": 3e9, "peak_bytes_in_use": 11e9},
         "loss": 11.9, "step_s": 0.5, "tokens_per_s": 8192.0, "mfu": 0.31,
         "peak_source": "NVIDIA H100 spec sheet", "compile_s": 30.0}
  doc.update(kw)
  return doc


def test_the_verdicts_drawn_from_the_device_figures():
  rows = {r.check: r for r in L.rows_from_child(_child_doc(), "")}
  assert [rows[k].status for k in ("sharded_load", "aot_vs_real", "step_mfu")] == ["pass"] * 3
  assert rows["aot_vs_real"].figures["real_over_aot"] == 1.1
  assert rows["sharded_load"].figures["host_peak_added_gib"] == round(500 * 2**20 / 2**30, 3)
  # the real peak above the AOT prediction by more than the tolerance
  over = L.rows_from_child(_child_doc(device_stats_after_steps={
      "bytes_in_use": 3e9, "peak_bytes_in_use": 10e9 * L.AOT_TOLERANCE + 1e6}), "")
  assert over[1].status == "FAIL" and "exceeds" in over[1].note
  # a device holding more than its slice of the model (e.g. a whole tensor on the first chip)
  whole = L.rows_from_child(_child_doc(devices=8, slice_bytes=2.5e9 / 8), "")
  assert whole[0].status == "FAIL" and "slice" in whole[0].note
  # no memory statistics (CPU): the comparison is n/a, not a pass; a NaN loss fails the step
  cpu = L.rows_from_child(_child_doc(device_stats_after_steps=None, loss=float("nan")), "")
  assert cpu[1].status == "n/a" and cpu[2].status == "FAIL"
  # the process failed: its three checks fail with its error
  failed = L.rows_from_child(None, "RuntimeError: boom")
  assert [r.status for r in failed] == ["FAIL"] * 3 and failed[0].note == "RuntimeError: boom"


def test_an_unknown_check_is_one_error_line(tmp_path, capsys):
  assert accel_cli.main(["--out", str(tmp_path), "--only", "sharded_lod"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --only names unknown checks ['sharded_lod']")


def _rope_hashable() -> bool:
  try:
    hash(config_from_hf(F.tiny_hf_config(300, F.LLAMA3_ROPE)))
    return True
  except TypeError:
    return False


@pytest.mark.slow
def test_smoke_run_of_the_accelerator_check_on_cpu(tmp_path):
  out = tmp_path / "ac"
  env = dict(os.environ, SMOKE="1", OUT=str(out), PYTHON=sys.executable,
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  r = subprocess.run(["bash", "launch/accelerator_check.sh"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=900)
  doc = json.loads((out / "accel_check.json").read_text())
  rows = {c["check"]: c for c in doc["checks"]}
  assert list(rows) == ["eager_vs_sharded", "sharded_load", "aot_vs_real", "step_mfu",
                        "sigterm_resume", "llama3_rope_train"], r.stderr[-3000:]
  assert doc["device"].startswith("4 x cpu") and doc["smoke"]
  status = {k: c["status"] for k, c in rows.items()}
  # Until ModelConfig.rope_scaling is hashable (issue 31, item 1), a Llama-3-rope model
  # cannot train: the check must say so; once it is, the check must pass.
  rope = "pass" if _rope_hashable() else "FAIL"
  assert status == {"eager_vs_sharded": "pass", "sharded_load": "pass", "aot_vs_real": "n/a",
                    "step_mfu": "pass", "sigterm_resume": "pass", "llama3_rope_train": rope}, \
      (status, [c["note"] for c in doc["checks"]], r.stderr[-3000:])
  if rope == "FAIL":
    assert "unhashable" in rows["llama3_rope_train"]["note"]
  assert r.returncode == (0 if rope == "pass" else 1)
  assert "| sigterm_resume    | pass" in r.stdout
  f = {k: c["figures"] for k, c in rows.items()}
  assert f["eager_vs_sharded"]["devices_holding_shards"] == 4
  assert f["sharded_load"]["per_device_share"] < 0.5  # sharded over 4, not whole on one
  assert 0 < f["step_mfu"]["mfu"] < 1 and f["step_mfu"]["peak"] == "measured matmul"
  s = f["sigterm_resume"]
  assert s["exit_status"] == 143 and s["resumed_from"] == s["stopped_at"]
  assert s["stopped_at"] in s["checkpoints"] and s["tensors_differing"] == 0

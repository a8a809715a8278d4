"""launch/: the Colab notebook's code cells run on a CPU (tiny model); the TPU script's commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures import tiny_run

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "safemoe_colab_tpu.ipynb"


def _code_cells(nb: dict) -> list[tuple[list[str], str]]:
  return [(c.get("metadata", {}).get("tags", []), "".join(c["source"]))
          for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_cells_run_on_cpu_with_a_tiny_config(tmp_path):
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4 and nb["metadata"]["accelerator"] == "TPU"
  cells = _code_cells(nb)
  assert [t for t, _ in cells].count(["parameters"]) == 1
  for _, src in cells:  # plain Python: runs in Jupyter, Colab and here alike
    compile(src, "<cell>", "exec")
    assert not any(l.lstrip().startswith(("!", "%")) for l in src.splitlines())
  model_dir = tiny_run.write_model(tmp_path / "model")
  cfg_file = model_dir / "config.json"  # room for evaluation prompts (RoPE has no weights)
  cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                  "max_position_embeddings": 1024}))
  data = tiny_run.write_data(tmp_path / "data.jsonl")
  out = tmp_path / "run"
  params = (f"SOURCE = {str(ROOT)!r}\nOUTPUT_DIR = {str(out)!r}\n"
            f"TRAIN_OVERRIDES = {tiny_run.overrides(model_dir, data, out)!r}\n"
            "EVAL_ARGS = ['--systems', 'base,safemoe', '--default-count', '2', "
            "'--max-new-tokens', '4', '--batch-size', '4']\n")
  script = "\n\n".join(params if tags == ["parameters"] else src for tags, src in cells)
  (tmp_path / "nb.py").write_text(script)
  proc = subprocess.run([sys.executable, str(tmp_path / "nb.py")], capture_output=True, text=True,
                        cwd=tmp_path, timeout=900, env=dict(os.environ, MPLBACKEND="Agg"))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert (out / "router.safetensors").exists() and (out / "loss_curves.png").exists()
  assert "phase2" in proc.stdout and "loss_curves.png" in proc.stdout
  assert list((out / "eval").glob("*.png")), "the evaluation made no plots"


def test_tpu_script_runs_train_on_every_worker(tmp_path):
  env = dict(os.environ, DRY_RUN="1", TPU_NAME="t1", ACCELERATOR="v5p-16", ZONE="z",
             HF_TOKEN="hf_secret")
  proc = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "all", "phase1.steps=5"],
                        capture_output=True, text=True, env=env, timeout=60)
  assert proc.returncode == 0, proc.stderr
  cmds = [l.replace("\\", "") for l in proc.stdout.splitlines() if l.startswith("+ gcloud")]
  assert "tpu-vm create t1" in cmds[0] and "v2-alpha-tpuv5" in cmds[0]
  train = [c for c in cmds if "safemoe_jax.train" in c]
  assert len(train) == 1 and "--worker=all" in train[0] and "phase1.steps=5" in train[0]
  assert "TPU_WORKER_HOSTNAMES" in train[0]  # several hosts: jax.distributed on every worker
  assert any("pip install -q -e" in c and "tpu" in c and "--worker=all" in c for c in cmds)
  assert "hf_secret" not in proc.stdout + proc.stderr and "HF_TOKEN=***" in train[0]
  gpu = subprocess.run(["bash", str(ROOT / "launch" / "gpu.sh"), "phase1.steps=5"], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, DRY_RUN="1"),
                       timeout=60)
  assert gpu.returncode == 0 and "safemoe_jax.train --config configs/gpu_small.yaml" in gpu.stdout

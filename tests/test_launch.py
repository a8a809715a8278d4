"""launch/: the Colab notebook's code cells run on a CPU (tiny model); the TPU script's commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import tiny_run

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "launch" / "safemoe_colab_tpu.ipynb"


def _code_cells(nb: dict) -> list[tuple[list[str], str]]:
  return [(c.get("metadata", {}).get("tags", []), "".join(c["source"]))
          for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.slow
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


def _tpu(cmd: str, *args: str, **env) -> tuple[int, list[str], str]:
  """DRY_RUN the TPU script: (status, the gcloud command lines, stderr)."""
  env = dict(os.environ, DRY_RUN="1", TPU_NAME="t1", ACCELERATOR="v5p-16", ZONE="z",
             HF_TOKEN="hf_secret", **env)
  proc = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), cmd, *args],
                        capture_output=True, text=True, env=env, timeout=60)
  assert "hf_secret" not in proc.stdout + proc.stderr
  cmds = [l.replace("\\", "") for l in proc.stdout.splitlines() if l.startswith("+ ")]
  return proc.returncode, cmds, proc.stderr


@pytest.mark.parametrize("spot", ["0", "1"])
def test_tpu_script_every_subcommand_dry_run(spot):
  status, cmds, _ = _tpu("create", SPOT=spot)
  assert status == 0
  if spot == "1":  # Spot capacity through a queued resource, polled until ACTIVE
    assert "queued-resources create t1-qr --node-id t1" in cmds[0] and "--spot" in cmds[0]
    assert "v2-alpha-tpuv5" in cmds[0] and "until ACTIVE" in cmds[1]
  else:
    assert cmds == ["+ gcloud compute tpus tpu-vm create t1 --zone z --accelerator-type v5p-16 "
                    "--version v2-alpha-tpuv5"]
  status, cmds, _ = _tpu("copy")
  assert status == 0 and cmds[0].startswith("+ tar ") and "--exclude=.git" in cmds[0]
  assert "tpu-vm scp" in cmds[1] and "--worker=all" in cmds[1] and "--worker=all" in cmds[2]
  status, cmds, _ = _tpu("install", PYTHON_VERSION="3.12")
  assert status == 0 and len(cmds) == 1 and "--worker=all" in cmds[0]
  assert "uv venv --python 3.12" in cmds[0] and "uv pip install" in cmds[0] and "[tpu]" in cmds[0]
  status, cmds, err = _tpu("train", "phase1.steps=5", SPOT=spot, OUTPUT_DIR="/mnt/disk/run")
  assert status == 0 and len(cmds) == 3 and all("--worker=all" in c for c in cmds)
  # the token travels as a file (scp) into the workers' Hub token file, never on a command line
  assert "tpu-vm scp /tmp/" in cmds[0] and "~/.hf_token.part" in cmds[0]
  assert "chmod 600 ~/.hf_token.part && mv ~/.hf_token.part ~/.cache/huggingface/token" in cmds[1]
  assert not any("HF_TOKEN" in c for c in cmds)
  assert "SAFEMOE_DISTRIBUTED=1" in cmds[2] and "safemoe_jax.train" in cmds[2]
  assert "phase1.steps=5" in cmds[2] and "output_dir=/mnt/disk/run" in cmds[2]
  assert "echo $? > ~/train.exit" in cmds[2]  # what `watch` reads
  assert "warning" not in err
  _, _, err = _tpu("train", SPOT="1")
  assert "checkpoints on the workers' disks are lost" in err
  status, cmds, _ = _tpu("logs")
  assert status == 0 and "--worker=0" in cmds[0] and "train.log" in cmds[0]
  status, cmds, _ = _tpu("status")
  assert status == 0 and "--worker=all" in cmds[0] and "pgrep" in cmds[0]
  status, cmds, _ = _tpu("ssh", WORKER="1")
  assert status == 0 and "--worker=1" in cmds[0]
  status, cmds, _ = _tpu("delete", SPOT=spot)
  assert status == 0 and ("queued-resources delete t1-qr" if spot == "1" else
                          "tpu-vm delete t1") in cmds[0]
  status, cmds, _ = _tpu("all", "phase1.steps=5", SPOT=spot)
  assert status == 0 and any("create" in c for c in cmds[:1])
  assert [c for c in cmds if "safemoe_jax.train" in c] and any("uv venv" in c for c in cmds)
  status, _, _ = _tpu("bogus")
  assert status == 2


def test_tpu_script_recreates_a_preempted_queued_resource_and_watch_resumes_the_run():
  """Dry run of the preemption path: a SUSPENDED queued resource is deleted before it is created
  again (its name is taken until then); `watch` recreates, copies, installs and trains again
  (the trainer resumes from OUTPUT_DIR), trains again after a non-zero exit, stops after 0."""
  spot = dict(SPOT="1", OUTPUT_DIR="gs://bucket/run", WATCH_ROUNDS="1")
  for state in ("SUSPENDED", "FAILED"):
    status, cmds, err = _tpu("create", DRY_RUN_QR_STATE=state, **spot)
    assert status == 0 and "queued-resources delete t1-qr" in cmds[0], cmds
    assert "queued-resources create t1-qr" in cmds[1] and "until ACTIVE" in cmds[2]
    assert f"is {state}: deleting it" in err
  status, cmds, _ = _tpu("create", DRY_RUN_QR_STATE="ACTIVE", **spot)
  assert status == 0 and cmds == []  # already there: nothing to do
  status, cmds, _ = _tpu("create", **spot)  # none yet: created, nothing deleted
  assert "queued-resources create" in cmds[0] and not any("delete" in c for c in cmds)

  status, cmds, err = _tpu("watch", "phase1.steps=5", DRY_RUN_QR_STATE="SUSPENDED", **spot)
  assert status == 0 and "recreating it and resuming" in err
  steps = [next(k for k in ("queued-resources delete", "queued-resources create", "until ACTIVE",
                            "tpu-vm scp /tmp/safemoe", "tar -C ~/", "tar ", "uv venv",
                            ".hf_token.part ", "safemoe_jax.train") if k in c) for c in cmds]
  assert steps == ["queued-resources delete", "queued-resources create", "until ACTIVE", "tar ",
                   "tpu-vm scp /tmp/safemoe", "tar -C ~/", "uv venv", ".hf_token.part ",
                   ".hf_token.part ", "safemoe_jax.train"], cmds
  assert "output_dir=gs://bucket/run" in cmds[-1] and "phase1.steps=5" in cmds[-1]
  status, cmds, err = _tpu("watch", DRY_RUN_QR_STATE="ACTIVE", DRY_RUN_TRAIN_EXIT="143", **spot)
  assert status == 0 and "exited with 143: training again" in err
  assert "safemoe_jax.train" in cmds[-1] and not any("queued-resources" in c for c in cmds)
  status, cmds, out = _tpu("watch", DRY_RUN_QR_STATE="ACTIVE", DRY_RUN_TRAIN_EXIT="", **spot)
  assert status == 0 and cmds == []  # still training: nothing to do
  proc = subprocess.run(["bash", str(ROOT / "launch" / "tpu_vm.sh"), "watch"], text=True,
                        capture_output=True, env=dict(os.environ, DRY_RUN="1", SPOT="1",
                                                      DRY_RUN_QR_STATE="ACTIVE",
                                                      DRY_RUN_TRAIN_EXIT="0"), timeout=60)
  assert proc.returncode == 2 and "OUTPUT_DIR=gs://" in proc.stderr  # no bucket: refused
  status, cmds, _ = _tpu("watch", DRY_RUN_QR_STATE="ACTIVE", DRY_RUN_TRAIN_EXIT="0",
                         **{**spot, "WATCH_ROUNDS": "0"})
  assert status == 0 and cmds == []  # finished: watch ends by itself


def test_launch_env_starts_jax_distributed(monkeypatch):
  from safemoe_jax.core import sharding as S
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  monkeypatch.setenv("SAFEMOE_DISTRIBUTED", "1")
  assert S.multi_process_env() == "SAFEMOE_DISTRIBUTED"
  monkeypatch.setenv("SAFEMOE_DISTRIBUTED", "0")
  assert S.multi_process_env() is None


def test_gpu_script_dry_run():
  gpu = subprocess.run(["bash", str(ROOT / "launch" / "gpu.sh"), "phase1.steps=5"], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, DRY_RUN="1"),
                       timeout=60)
  assert gpu.returncode == 0 and "safemoe_jax.train --config configs/gpu_small.yaml" in gpu.stdout


def test_notebook_installs_from_a_wheel_built_from_this_checkout(tmp_path):
  """The install cell's sources: a wheel found in the search folders, a wheel path, a checkout
  folder, a URL; the wheel `pip wheel` builds from this checkout holds the whole package."""
  cell = next(src for tags, src in _code_cells(json.loads(NOTEBOOK.read_text()))
              if "def pip_spec" in src)
  ns: dict = {"SOURCE": str(ROOT), "OUTPUT_DIR": str(tmp_path / "out")}
  exec(compile(cell, "<install cell>", "exec"), ns)  # already installed here: installs nothing
  pip_spec = ns["pip_spec"]
  assert ns["OUTPUT_DIR"] == str(tmp_path / "out")
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                         "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (wheel,) = (tmp_path / "dist").glob("safemoe_jax-*.whl")
  import zipfile
  names = set(zipfile.ZipFile(wheel).namelist())
  pkg = {p.relative_to(ROOT).as_posix() for p in (ROOT / "safemoe_jax").rglob("*.py")}
  assert pkg and pkg <= names, sorted(pkg - names)
  assert pip_spec("", search=[tmp_path / "dist"]) == f"safemoe_jax[tpu] @ {wheel.as_uri()}"
  assert pip_spec(str(wheel)) == f"safemoe_jax[tpu] @ {wheel.as_uri()}"
  assert pip_spec(str(ROOT)) == f"{ROOT}[tpu]"
  url = "git+https://example.invalid/you/safemoe_jax.git"
  assert pip_spec(url) == f"safemoe_jax[tpu] @ {url}"
  with pytest.raises(FileNotFoundError, match="pip wheel --no-deps"):
    pip_spec("", search=[tmp_path / "empty"])
  with pytest.raises(FileNotFoundError, match="neither a .whl file"):
    pip_spec(str(tmp_path))


def test_notebook_has_a_colab_link_and_installs_the_extra_of_its_runtime(tmp_path, monkeypatch):
  nb = json.loads(NOTEBOOK.read_text())
  intro = "".join(nb["cells"][0]["source"])
  assert "](https://colab.research.google.com/github/" in intro
  assert "/blob/main/launch/safemoe_colab_tpu.ipynb)" in intro and "colab-badge.svg" in intro
  cell = next(src for tags, src in _code_cells(nb) if "def pip_spec" in src)
  ns: dict = {"SOURCE": str(ROOT), "OUTPUT_DIR": str(tmp_path / "out")}
  exec(compile(cell, "<install cell>", "exec"), ns)  # already installed here: installs nothing
  runtime_extra, pip_spec = ns["runtime_extra"], ns["pip_spec"]
  for var in ("COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE"):
    monkeypatch.delenv(var, raising=False)
  exists = {"/dev/accel0": False, "/dev/vfio/0": False, "/dev/nvidia0": False}
  monkeypatch.setattr(ns["Path"], "exists", lambda self: exists.get(str(self), False))
  monkeypatch.setattr(ns["shutil"], "which", lambda name: None)
  assert runtime_extra() == ""  # a CPU runtime: plain jax
  exists["/dev/nvidia0"] = True
  assert runtime_extra() == "gpu"  # never the TPU extra (libtpu) on a GPU runtime
  monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-1")
  assert runtime_extra() == "tpu"
  url = "git+https://example.invalid/you/safemoe_jax.git"
  assert pip_spec(url, extra="gpu") == f"safemoe_jax[gpu] @ {url}"
  assert pip_spec(url, extra="") == f"safemoe_jax @ {url}"
  assert pip_spec(str(ROOT), extra="gpu") == f"{ROOT}[gpu]" and pip_spec(str(ROOT), extra="") == \
      str(ROOT)
  assert "pip_spec(SOURCE, extra=EXTRA)" in cell and "EXTRA = runtime_extra()" in cell


@pytest.mark.parametrize("ignores_term", [False, True])
def test_multihost_launcher_stops_the_others_when_one_process_fails(tmp_path, ignores_term):
  # CI once saw process 1 of 2 end with an error while process 0 waited in a collective for it:
  # the launcher then waited for ever. A stand-in for python: process 1 fails at once, process 0
  # hangs (as in a collective), answering SIGTERM or (like a trainer mid-collective) not.
  fake = tmp_path / "python"
  fake.write_text("#!/usr/bin/env bash\n"
                  "if [[ $JAX_PROCESS_ID == 1 ]]; then echo 'error: placeholder'; exit 3; fi\n"
                  + ("trap '' TERM\n" if ignores_term else "") + "exec sleep 300\n")
  fake.chmod(0o755)
  env = dict(os.environ, PYTHON=str(fake), GRACE="1", LOG_DIR=str(tmp_path / "logs"))
  r = subprocess.run(["bash", str(ROOT / "launch" / "local_multihost.sh"), "2"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 3, (r.stdout, r.stderr)
  assert "process 1 exited with status 3" in r.stderr, r.stderr
  assert ("SIGKILL" in r.stderr) == ignores_term and "SIGTERM to" in r.stderr, r.stderr
  p0 = int(r.stdout.split(": ")[1].split()[0])
  assert not Path(f"/proc/{p0}").exists() or "zombie" in Path(f"/proc/{p0}/status").read_text()

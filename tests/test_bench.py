"""safemoe_jax.bench: the FLOP count, a one-repeat run on the tiny model, TPU ahead-of-time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from safemoe_jax.tools import aot as bench_aot
from safemoe_jax.tools import bench
from safemoe_jax.tools import bench_eval
from safemoe_jax.core import flops as bench_flops
from safemoe_jax.core.config import ModelConfig
from tests.prereq import missing

ROOT = Path(__file__).resolve().parents[1]

# D=8, F=16, L=2 layers, 2 query heads and 1 KV head of dim 4 (q width 8, kv width 4), V=100.
SMALL = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=4)


def test_flop_count_equals_a_hand_count():
  # N per layer: q 8*8=64, k and v 8*4*2=64, o 8*8=64, gate/up/down 3*8*16=384 -> 576;
  # 2 layers 1152, LM head 8*100=800 -> N = 1952.
  assert bench_flops.matmul_params(SMALL) == 1952
  # Attention forward per token at T=10: (q k^T + a v) 2 * 2*T*H*Dh = 4*10*2*4 = 320 per layer.
  assert bench_flops.attention_flops(SMALL, 10) == 640
  base = 4 * 1952 + 3 * 640  # frozen: 2N forward + 2N input gradients; attention 3x forward
  assert bench_flops.train_flops_per_token(SMALL, 10, "base") == {"base": base, "adapter": 0,
                                                            "router": 0, "total": base}
  # 3 experts of rank 2 on q (8 -> 8) and v (8 -> 4): 2*E*r*(in+out) = 12*16 + 12*12 = 336 per
  # layer, 672 forward for both layers.
  p1 = bench_flops.train_flops_per_token(SMALL, 10, "phase1", experts=3, rank=2, targets=("q", "v"))
  assert p1 == {"base": base, "adapter": 3 * 672, "router": 0, "total": base + 2016}
  p2 = bench_flops.train_flops_per_token(SMALL, 10, "phase2", experts=3, rank=2, targets=("q", "v"))
  # phase 2: the adapters' forward + input gradient (2x672); the router 2*D*E = 48 per layer,
  # forward, input and weight gradients -> 3 * 2 * 48 = 288.
  assert p2 == {"base": base, "adapter": 1344, "router": 288, "total": base + 1344 + 288}


@pytest.mark.slow
def test_bench_runs_on_the_tiny_model_and_writes_json(tmp_path):
  s = bench.Settings(model="tiny", batch=2, seq=16, experts=(1, 2), repeats=1, warmup=1,
                     gen_repeats=1, new_tokens=4, prompt_len=8, matmul_n=256)
  names = ["base", "lora", "p1_E2", "p2_E2", "gen_safemoe_b1", "matmul"]
  doc = bench.run_bench(s, names, memory=False, quiet=True)
  doc["memory"] = bench.measure_memory(["p2_E2"], s, quiet=True)  # its own process
  out = tmp_path / "bench.json"
  out.write_text(json.dumps(doc, default=str))
  back = json.loads(out.read_text())
  c = back["results"]["configs"]
  assert set(c) == set(names)
  for name in names:
    assert c[name]["median_s"] > 0 and len(c[name]["all_s"]) == 1
  assert c["p2_E2"]["tokens_per_s"] == pytest.approx(2 * 16 / c["p2_E2"]["median_s"])
  assert 0 < c["base"]["mfu"] and back["results"]["matmul_flops_per_s"] > 0
  # Only the trainable group has optimiser state: AdamW's mu and nu (+ a step counter).
  assert c["base"]["opt_state_bytes"] == 0
  for name in ("lora", "p1_E2", "p2_E2"):
    t = c[name]["trainable_bytes"]
    assert 2 * t <= c[name]["opt_state_bytes"] <= 2 * t + 64
  assert c["p2_E2"]["trainable"] == "router" and c["p1_E2"]["trainable"] == "experts"
  assert c["p1_E2"]["trainable_bytes"] == 2 * c["lora"]["trainable_bytes"]  # 2 experts vs 1
  assert c["p2_E2"]["trainable_bytes"] < c["p1_E2"]["trainable_bytes"] / 10  # the router is tiny
  assert back["memory"]["p2_E2"]["peak_rss_mb"] > 50
  assert "single LoRA step / frozen base step" in {r["what"] for r in back["ratios"]}
  table = "\n".join(back["table"])
  assert "p2_E2" in table and "load average" in table


@pytest.mark.slow
def test_tpu_ahead_of_time_compile_of_a_tiny_config(tmp_path, capsys):
  libtpu = bench_aot.find_libtpu(download=True)  # from PyPI on first use, then cached; no TPU needed
  if libtpu is None:
    missing(f"libtpu could not be fetched here (pip download {bench_aot.libtpu_spec()} failed: "
            f"{capsys.readouterr().err.strip()[-600:]})")
  out = tmp_path / "aot.json"
  cmd = [sys.executable, "-m", "safemoe_jax", "bench", "aot", "--tiny", "--topology", "v5e:2x2",
         "--no-max-batch", "--out", str(out), "mesh.data=1", "mesh.fsdp=4", "data.batch_size=8",
         "data.max_length=64", "data.bucket_lengths=[]", "experts.rank=128"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads(out.read_text())
  t = doc["topologies"]["v5e:2x2"]
  assert t["chips"] == 4 and t["device_kind"] == "TPU v5 lite" and t["hbm_bytes"] == 16 * 2**30
  p1, p2 = t["phases"]["phase1"], t["phases"]["phase2"]
  for r in (p1, p2):
    assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and r["fits"]
    assert r["bytes_per_chip"]["argument"] > 0 and r["bytes_per_chip"]["temp"] >= 0
  # The state (base, trainable group, optimiser state) is FSDP-sharded over the 4 chips: the
  # compiled program's arguments are one chip's shards (plus the compiler's tile padding and the
  # batch), well under the unsharded bytes.
  for r in (p1, p2):
    assert r["state_bytes_per_chip"] < 0.6 * r["state_bytes_unsharded"]
    assert r["state_bytes_per_chip"] <= r["bytes_per_chip"]["argument"]
    assert r["bytes_per_chip"]["argument"] < 2 * r["state_bytes_per_chip"] + 2**20
  assert p2["state_bytes_per_chip"] < p1["state_bytes_per_chip"]  # no expert optimiser state
  # Loading as the trainer loads (io/shards): a chip holds its shards of the model (a quarter of
  # the FSDP-sharded weights; the experts' B, whose axes map to tensor=1, whole), never all of it;
  # the validation pass is compiled too, and the peak of the three decides "fits".
  for r in (p1, p2):
    assert r["model_bytes_unsharded"] / 4 <= r["load_bytes_per_chip"] < \
        0.6 * r["model_bytes_unsharded"], r
    # the load is compiled (tools/aot_load.py): its bytes include the TPU's tile padding
    assert r["load_bytes_per_chip"] >= r["load_bytes_per_chip_unpadded"], r
    assert r["load_bytes_per_chip_unpadded"] <= r["state_bytes_per_chip"], r  # + optimiser state
    assert r["val_total_bytes_per_chip"] > 0 and r["peak_bytes_per_chip"] == max(
        r["total_bytes_per_chip"], r["load_bytes_per_chip"], r["val_total_bytes_per_chip"])
  assert p1["flops_per_step"] == 8 * 64 * p1["flops_per_token"]["total"]
  assert "v5e:2x2" in "\n".join(doc["table"])


# --------------------------------------------------------------------------------------------
# libtpu: only a pinned wheel is used, and the cached copy is checked before it is loaded
# --------------------------------------------------------------------------------------------


def _fake_libtpu_download(monkeypatch, tmp_path, content: bytes, name: str) -> list:
  import zipfile
  calls = []

  def pip_download(cmd, **kw):  # what `pip download -d DIR` would leave
    calls.append(cmd)
    d = Path(cmd[cmd.index("-d") + 1])
    with zipfile.ZipFile(d / name, "w") as z:
      z.writestr("libtpu/libtpu.so", content)
    return subprocess.CompletedProcess(cmd, 0, "", "")

  monkeypatch.setattr(bench_aot.subprocess, "run", pip_download)
  monkeypatch.setenv("SAFEMOE_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  monkeypatch.setattr(bench_aot, "libtpu_spec", lambda: "libtpu==0.0.42.*")
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda n, *a: None if n == "libtpu" else real(n, *a))
  return calls


def test_libtpu_download_with_the_wrong_checksum_is_refused(monkeypatch, tmp_path):
  from safemoe_jax.io.assets import AssetError
  name = "libtpu-0.0.42.1-cp311-cp311-manylinux_2_31_x86_64.whl"
  calls = _fake_libtpu_download(monkeypatch, tmp_path, b"not the real library", name)
  with pytest.raises(AssetError, match=rf"checksum mismatch for {name}.*was not used"):
    bench_aot.find_libtpu(download=True, quiet=True)
  assert "--require-hashes" in calls[0]  # pip checks it too
  assert not list((tmp_path / "cache").rglob("libtpu.so"))


def test_cached_libtpu_is_checked_before_it_is_loaded(monkeypatch, tmp_path):
  from safemoe_jax.io.assets import sha256_file
  name = "libtpu-0.0.42.1-cp311-cp311-manylinux_2_31_x86_64.whl"
  _fake_libtpu_download(monkeypatch, tmp_path, b"a library", name)
  import zipfile
  whl = tmp_path / name  # pin the fake wheel, as the real one is pinned
  with zipfile.ZipFile(whl, "w") as z:
    z.writestr("libtpu/libtpu.so", b"a library")
  monkeypatch.setitem(bench_aot.LIBTPU_SHA256, name, sha256_file(whl))
  so = bench_aot.find_libtpu(download=True, quiet=True)
  assert so.read_bytes() == b"a library"
  assert bench_aot.find_libtpu(download=False) == so  # the record matches
  so.write_bytes(b"something else")  # replaced in the cache
  assert bench_aot.find_libtpu(download=False) is None and not so.exists()


def test_a_libtpu_without_a_pin_is_not_downloaded(monkeypatch, tmp_path):
  from safemoe_jax.io.assets import AssetError
  calls = _fake_libtpu_download(monkeypatch, tmp_path, b"x", "libtpu-9.9.9-py3-none-any.whl")
  monkeypatch.setattr(bench_aot, "libtpu_spec", lambda: "libtpu==9.9.9")
  with pytest.raises(AssetError, match="no pinned sha256 for libtpu==9.9.9"):
    bench_aot.find_libtpu(download=True, quiet=True)
  assert not calls

def test_eval_bench_scales_benchmarks_and_reports_the_speedup():
  from safemoe_jax.evaluation import benchmarks as EB
  benches = [EB.Bench("a", "harmful", [EB.Prompt(f"a{i}") for i in range(60)]),
             EB.Bench("b", "benign", [EB.Prompt(f"b{i}") for i in range(40)])]
  bench_eval.scale_benches(benches, 20)
  assert [len(b.prompts) for b in benches] == [12, 8]  # in proportion
  doc = {"systems": ["base", "safemoe"], "prompts": 20, "max_new_tokens": 8, "decode_segment": 4,
         "paths": {n: {"batch_size": b, "answers": 40, "new_tokens": 320, "generate_s": g,
                       "tokens_per_s": 320 / g, "wall_s": g + 1} for n, b, g in
                   (("old", 16, 30.0), ("new", 64, 9.0))},
         "compare": {"new": {"speedup_wall": 31 / 10, "speedup_generate": 30 / 9,
                             "speedup_cpu": 2.0,
                             "differing_answers": {"n": 1, "of": 40, "share": 0.025}}}}
  text = bench_eval.format_eval(doc)
  assert "old: per system" in text and "new: one pass" in text
  assert "new vs old: 3.10x end to end" in text and "differing answers 1 of 40 (2.50%)" in text


def test_answer_flops_equal_a_hand_count():
  """The evaluation's floor: tiny config, a 3-token prompt and 2 new tokens (4 tokens fed)."""
  per_layer = 128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 384  # q, k+v, o, gate+up+down
  layers, head = 2 * 4 * per_layer, 2 * 128 * 512
  attn = sum(4 * 4 * s * 4 * 32 for s in (1, 2, 3, 4))  # q k^T and a v over the causal keys
  assert bench_eval.answer_flops(bench.TINY, 3, 2) == 4 * layers + 2 * head + attn
  lora = 4 * 2 * 2 * 8 * (2 * 128 + 128 + 64)  # 2 experts of rank 8 on q and k, every layer
  assert (bench_eval.answer_flops(bench.TINY, 3, 2, 2, 8, ("q", "k"))
          == 4 * (layers + lora) + 2 * head + attn)
  doc = {"systems": ["base"], "prompts": 1, "max_new_tokens": 2, "decode_segment": 0,
         "paths": {}, "floor": {"matmul_flops_per_s": 2e11, "answer_flops": 4e12, "floor_s": 20.0,
                                "old_over_floor": 2.4}}
  assert "the old path's generation is 2.40x that" in bench_eval.format_eval(doc)


@pytest.mark.slow
def test_aot_compiles_phase2_with_its_objective_and_the_load(tmp_path):
  """On this host's CPU device (the TPU path is the same code with compile-only devices): the
  configured NPO + retain terms run the frozen model forward too, and the load is a program."""
  import jax
  from safemoe_jax.core import sharding as S
  from safemoe_jax.core.config import ExpertsConfig, ObjectiveConfig, RouterConfig
  e, r = ExpertsConfig(num_experts=2, rank=4, alpha=8.0, targets=("q", "k", "v")), RouterConfig()
  mc, dev = S.MeshConfig(), jax.devices()[:1]
  npo = ObjectiveConfig(contrast="npo", retain_coef=1.0)
  plain = bench_aot.aot_compile(bench.TINY, e, r, mc, dev, "phase2", 4, 32)
  full = bench_aot.aot_compile(bench.TINY, e, r, mc, dev, "phase2", 4, 32, objective=npo)
  assert (plain["objective"], full["objective"]) == ("nll", "nll+npo+retain(1)")
  # one more forward pass of the whole model: about 1.5x the step's FLOPs (4N -> 6N per token)
  assert full["compiled_flops_per_chip"] > 1.3 * plain["compiled_flops_per_chip"], (full, plain)
  from safemoe_jax.tools.aot_load import aot_load
  load = aot_load(bench.TINY, e, r, S.make_mesh(mc, dev), mc.rules)
  state = 4 * (512 * 128 * 2 + 4 * (128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 384 + 2 * 128)
               + 128)  # float32 base of TINY (untied head), + the experts and router below
  assert load["load_bytes_per_chip_unpadded"] > state and load["load_bytes_per_chip"] >= \
      load["load_bytes_per_chip_unpadded"]


@pytest.mark.slow
def test_tpu_ahead_of_time_compile_for_two_v5e_slices(tmp_path, capsys):
  """Multislice: two v5e slices joined by DCN (libtpu's compile-only topology with num_slices=2)
  compile with the hybrid mesh (core/sharding.device_grid: data across slices, FSDP within)."""
  libtpu = bench_aot.find_libtpu(download=True)
  if libtpu is None:
    missing(f"libtpu could not be fetched here (pip download {bench_aot.libtpu_spec()} failed: "
            f"{capsys.readouterr().err.strip()[-600:]})")
  out = tmp_path / "aot.json"
  cmd = [sys.executable, "-m", "safemoe_jax", "bench", "aot", "--tiny", "--topology", "v5e:2x2",
         "--slices", "2", "--no-max-batch", "--out", str(out), "mesh.data=2", "mesh.fsdp=4",
         "data.batch_size=8", "data.max_length=64", "data.bucket_lengths=[]"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  t = json.loads(out.read_text())["topologies"]["2xv5e:2x2"]
  assert t["chips"] == 8 and t["slices"] == 2 and t["mesh_note"] is None
  for r in t["phases"].values():
    assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and r["fits"]
    assert 0 < r["load_bytes_per_chip"] < 0.6 * r["model_bytes_unsharded"]
  assert t["phases"]["phase2"]["objective"] == "nll+npo+retain(1)"  # the embedded default's


def test_libtpu_is_pinned_for_every_jax_the_tpu_extra_allows():
  """pyproject's jax bounds, tools/libtpu_pins.JAX_LIBTPU and the sha256 pins agree: every jax
  the tpu extra admits has its libtpu series pinned for each CPython, and the installed jax's
  `tpu` extra names the series the table gives it."""
  import importlib.metadata
  import re
  import tomllib
  import jax
  from packaging.specifiers import SpecifierSet
  from safemoe_jax.tools import libtpu_pins as pins
  proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  spec = lambda reqs, name: SpecifierSet(next(r for r in reqs if r.startswith(name))[len(name):]
                                         .split("#")[0].strip())
  core, tpu = spec(proj["dependencies"], "jax"), spec(proj["optional-dependencies"]["tpu"],
                                                      "jax[tpu]")
  assert any(s.operator == "<" for s in core) and any(s.operator == "<" for s in tpu)
  for v in ("0.10.3", "0.11.0"):  # the next jax is not admitted before its libtpu is pinned
    assert v not in core and v not in tpu
  admitted = [v for v in pins.JAX_LIBTPU if v in tpu]
  assert admitted == list(pins.JAX_LIBTPU) and all(v in core for v in admitted)
  for series in pins.JAX_LIBTPU.values():
    for py in ("cp311-cp311", "cp312-cp312", "cp313-cp313", "cp314-cp314"):
      assert any(re.fullmatch(rf"libtpu-{re.escape(series)}(\.\d+)?-{py}-manylinux_2_31_x86_64"
                              r"\.whl", f) for f in pins.LIBTPU_SHA256), (series, py)
  assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in pins.LIBTPU_SHA256.values())
  if jax.__version__ in pins.JAX_LIBTPU:
    assert bench_aot.libtpu_spec() == f"libtpu=={pins.JAX_LIBTPU[jax.__version__]}.*"
  assert jax.__version__ in core, importlib.metadata.version("jax")

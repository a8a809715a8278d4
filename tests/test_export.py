"""PEFT adapters in and out, merged HF checkpoints: parity with PyTorch transformers + PEFT."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from safemoe_jax.cli import export as export_cmd
from safemoe_jax.tools.export import adapters as export_adapters
from safemoe_jax.tools.export import common as export_common
from safemoe_jax.tools.export import merged as export_merged
from safemoe_jax.tools.export import peft as export_peft
from safemoe_jax.core.config import ExpertsConfig, ModelConfig
from safemoe_jax.core.experts import ExpertParam, RouterParam
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.io.weights import config_from_hf, load_hf_checkpoint
from safemoe_jax.data import config as data_cfg
from safemoe_jax.train import checkpoint as ckpt
from safemoe_jax.train import config as train_cfg
from safemoe_jax.train import rundir as train_rundir
from tests.prereq import require_module

torch = require_module("torch")
peft = require_module("peft")
transformers = require_module("transformers")

ALL = ("q", "k", "v", "o", "gate", "up", "down")
HF_MOD = {t: m.split(".")[1] for t, m in export_common.PEFT_MODULES.items()}  # "q" -> "q_proj"
TOL = 1e-4  # max abs logit error, float32
IDS = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32)


def _hf(path) -> "torch.nn.Module":
  """A fresh torch model from an HF folder (PEFT modifies the model it wraps)."""
  return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _logits(m) -> np.ndarray:
  with torch.no_grad():
    return m(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.numpy()


@functools.partial(nnx.jit, static_argnames="routing")
def _forward(model, ids, routing, domains, fixed_weights):
  return model(ids, routing=routing, domains=domains, fixed_weights=fixed_weights)[0]


def _ours(model: SafeMoELM, routing: str, domains=None, fixed_weights=None) -> np.ndarray:
  return np.asarray(_forward(model, jnp.asarray(IDS), routing, domains, fixed_weights))


def make_run(ck, out: Path, *, targets=ALL, rank=4, alpha=6.0,
             domains=("hate", "self harm", "violence"), seed=0) -> tuple[Path, SafeMoELM]:
  """A run folder as train.py leaves it after both phases (its own writers), random experts."""
  cfg, params = load_hf_checkpoint(ck.path)
  tc = train_cfg.TrainConfig(output_dir=str(out), model=train_cfg.BaseModelConfig(path=str(ck.path)),
                         experts=ExpertsConfig(rank=rank, alpha=alpha, targets=targets,
                                               dropout=0.0),
                         data=dataclasses.replace(data_cfg.DataConfig(), domains=domains))
  model = SafeMoELM(cfg, tc.experts_config(), tc.router, rngs=nnx.Rngs(seed))
  model.load_base(params)
  rng = np.random.default_rng(seed)
  for var in (getattr(model.experts, n) for n in model.experts.layer_arrays()):
    var[...] = jnp.asarray(0.2 * rng.standard_normal(var[...].shape), jnp.float32)
  out.mkdir(parents=True)
  info = train_rundir.RunDir(out).record(tc, Path(ck.path), cfg)
  for name, group in (("experts", ExpertParam), ("router", RouterParam)):
    ckpt.save_group(out / f"{name}.safetensors", nnx.state(model, group),
                     {"phase": name, "domains": list(domains), "run": info})
  return out, model


def peft_adapter(ck, out: Path, seed: int, **lora) -> Path:
  """A PEFT LoRA adapter with random A and B, saved by PEFT itself."""
  torch.manual_seed(seed)
  pm = peft.get_peft_model(_hf(ck.path), peft.LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM",
                                                            **lora))
  with torch.no_grad():
    for n, p in pm.named_parameters():
      if "lora_" in n:
        p.copy_(0.2 * torch.randn_like(p))
  pm.save_pretrained(str(out))
  return out


# --------------------------------------------------------------------------------------------
# Export to PEFT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_exported_experts_load_in_peft_and_match_oracle_routing(fixture, request, tmp_path):
  ck = request.getfixturevalue(fixture)
  run_dir, model = make_run(ck, tmp_path / "run")
  run = train_rundir.RunDir(run_dir).load()
  written = export_peft.export_peft(run, tmp_path / "peft")
  assert [p.name for p in written.values()] == ["hate", "self_harm", "violence"]
  # Same tensor names and shapes, and the same config values, as PEFT's own save_pretrained.
  ref = peft_adapter(ck, tmp_path / "ref", 0, r=4, lora_alpha=6,
                     target_modules=[HF_MOD[t] for t in ALL])
  ours = load_file(str(written["hate"] / "adapter_model.safetensors"))
  theirs = load_file(str(ref / "adapter_model.safetensors"))
  assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
  ours_cfg = json.loads((written["hate"] / "adapter_config.json").read_text())
  theirs_cfg = json.loads((ref / "adapter_config.json").read_text())
  for k, v in ours_cfg.items():
    if k not in ("base_model_name_or_path",):
      norm = lambda x: sorted(x) if k == "target_modules" else x  # PEFT writes a set
      assert norm(theirs_cfg[k]) == norm(v), k
  # Each expert in PEFT (gate 1) = our oracle routing to its domain.
  pm = peft.PeftModel.from_pretrained(_hf(ck.path), str(written["hate"]), adapter_name="e0")
  for e, dom in enumerate(run.domains[1:], 1):
    pm.load_adapter(str(written[dom]), adapter_name=f"e{e}")
  errs = []
  for e in range(3):
    pm.set_adapter(f"e{e}")
    want = _ours(model, "oracle", domains=np.eye(3, dtype=np.float32)[[e, e]])
    errs.append(np.abs(_logits(pm) - want).max())
  # The card's recipe for a fixed mix: PEFT's "cat" weighted adapter = our fixed gates.
  g = [0.5, -1.0, 0.25]
  pm.add_weighted_adapter(["e0", "e1", "e2"], g, "mix", combination_type="cat")
  pm.set_adapter("mix")
  errs.append(np.abs(_logits(pm) - _ours(model, "fixed", fixed_weights=np.float32(g))).max())
  print(f"\n{fixture} PEFT vs oracle max abs err per expert, then cat-mix: {errs}")
  assert max(errs) <= TOL, errs
  assert np.abs(_ours(model, "oracle", domains=np.eye(3, dtype=np.float32)[[0, 0]])
                - _logits(ck.model)).max() > 1e-2  # the experts matter
  # PEFT reads our folder and writes back exactly the same tensors.
  pm.save_pretrained(str(tmp_path / "resaved"), selected_adapters=["e0"])
  again = load_file(str(tmp_path / "resaved" / "e0" / "adapter_model.safetensors"))
  assert again.keys() == ours.keys()
  assert all(np.array_equal(again[k], ours[k]) for k in ours)
  # Router and model card next to the adapters.
  spec = json.loads((tmp_path / "peft" / "router.json").read_text())
  assert spec["domains"] == list(run.domains) and spec["router"]["activation"] == "tanh"
  r = load_file(str(tmp_path / "peft" / "router.safetensors"))
  np.testing.assert_array_equal(r["router.w_out"], np.asarray(model.router.w_out[...]))
  card = (tmp_path / "peft" / "README.md").read_text()
  assert "self harm" in card and "`self_harm/`" in card and "library_name: peft" in card


def test_export_single_expert_and_unknown_expert(tiny_llama, tmp_path):
  run = train_rundir.RunDir(make_run(tiny_llama, tmp_path / "run", targets=("q", "v"))[0]).load()
  written = export_peft.export_peft(run, tmp_path / "peft", ["violence"], base_name="org/base")
  assert list(written) == ["violence"] and not (tmp_path / "peft" / "hate").exists()
  cfg = json.loads((written["violence"] / "adapter_config.json").read_text())
  assert cfg["base_model_name_or_path"] == "org/base"
  assert cfg["target_modules"] == ["q_proj", "v_proj"] and (cfg["r"], cfg["lora_alpha"]) == (4, 6)
  with pytest.raises(export_common.ExportError, match=r"no expert for \['nope'\]"):
    export_peft.export_peft(run, tmp_path / "x", ["nope"])


# --------------------------------------------------------------------------------------------
# Import from PEFT
# --------------------------------------------------------------------------------------------


def _model_with(ck, ecfg: ExpertsConfig, experts: dict[str, np.ndarray]) -> SafeMoELM:
  cfg, params = load_hf_checkpoint(ck.path)
  m = SafeMoELM(cfg, ecfg, rngs=nnx.Rngs(0))
  m.load_base(params)
  for k, v in experts.items():
    getattr(m.experts, k)[...] = jnp.asarray(v)
  return m


def test_import_then_export_gives_identical_tensors(tiny_llama, tmp_path):
  kw = dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"])
  srcs = [peft_adapter(tiny_llama, tmp_path / n, i, **kw) for i, n in enumerate(("a", "b"))]
  rc = export_cmd.main(["import", "--adapters", *map(str, srcs), "--base", str(tiny_llama.path),
                    "--out", str(tmp_path / "run")])
  assert rc == 0
  run = train_rundir.RunDir(tmp_path / "run").load()
  assert run.domains == ("a", "b") and run.experts_cfg.targets == ("q", "v", "down")
  assert (run.experts_cfg.rank, run.experts_cfg.alpha) == (4, 12.0)
  assert export_cmd.main(["peft", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
  for src in srcs:
    b = load_file(str(src / "adapter_model.safetensors"))
    a = load_file(str(tmp_path / "out" / src.name / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ca = json.loads((tmp_path / "out" / src.name / "adapter_config.json").read_text())
    cb = json.loads((src / "adapter_config.json").read_text())
    assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])
    assert all(ca[k] == cb[k] for k in ("r", "lora_alpha", "peft_type", "task_type",
                                         "use_rslora", "use_dora", "bias", "fan_in_fan_out"))
  assert export_cmd.main(["import", "--adapters", str(srcs[0]), "--base", str(tiny_llama.path),
                      "--out", str(tmp_path / "run")]) == 2  # never overwrites experts
  # The file is what train.py loads to skip phase 1.
  ecfg = run.experts_cfg
  m = SafeMoELM(run.model, ecfg, rngs=nnx.Rngs(0))
  st = nnx.state(m, ExpertParam)
  ckpt.load_group(tmp_path / "run" / "experts.safetensors", st)
  nnx.update(m, st)
  np.testing.assert_array_equal(np.asarray(m.experts.B_down[...]), run.experts["B_down"])


def test_import_mixed_ranks_scales_and_targets_is_exact(tiny_qwen2, tmp_path):
  ck = tiny_qwen2
  specs = [  # (r, alpha) differ; rsLoRA; per-module alpha; layer subset; different targets
      dict(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"]),
      dict(r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "down_proj"]),
      dict(r=2, lora_alpha=6, alpha_pattern={"down_proj": 3}, layers_to_transform=[1],
           target_modules=["up_proj", "down_proj", "o_proj"]),
  ]
  srcs = [peft_adapter(ck, tmp_path / f"ad{i}", 10 + i, **s) for i, s in enumerate(specs)]
  cfg = export_adapters.base_config(ck.path)
  ecfg, experts = export_adapters.import_adapters(srcs, cfg, names=["x", "y", "z"])
  assert ecfg.domains == ("x", "y", "z") and ecfg.rank == 8 and ecfg.alpha == 24.0 and ecfg.targets == ("q", "k", "v", "o", "up",
                                                                     "down")
  assert not experts["A_up"][0, 2].any() and experts["A_up"][1, 2].any()  # layer 0 untouched
  np.testing.assert_array_equal(experts["A_q"][:, 0, :, 4:], 0)  # rank padding
  m = _model_with(ck, ecfg, experts)
  errs = []
  for e, src in enumerate(srcs):
    pm = peft.PeftModel.from_pretrained(_hf(ck.path), str(src))
    errs.append(np.abs(_logits(pm) - _ours(m, "oracle", domains=np.eye(3, dtype=np.float32)[
        [e, e]])).max())
  print(f"\nimported mixed adapters vs PEFT max abs err: {errs}")
  assert max(errs) <= TOL, errs


def _break(src: Path, dst: Path, cfg_change=None, tensors_change=None) -> Path:
  dst.mkdir()
  cfg = json.loads((src / "adapter_config.json").read_text())
  t = load_file(str(src / "adapter_model.safetensors"))
  if cfg_change:
    cfg_change(cfg)
  if tensors_change:
    tensors_change(t)
  (dst / "adapter_config.json").write_text(json.dumps(cfg))
  save_file(t, str(dst / "adapter_model.safetensors"))
  return dst


def test_import_errors_are_clear(tiny_llama, tmp_path):
  src = peft_adapter(tiny_llama, tmp_path / "ok", 0, r=4, lora_alpha=8,
                     target_modules=["q_proj", "down_proj"])
  cfg = export_adapters.base_config(tiny_llama.path)
  cases = [
      (dict(cfg_change=lambda c: c.update(use_dora=True)), "use_dora=true"),
      (dict(cfg_change=lambda c: c.update(modules_to_save=["lm_head"])), "modules_to_save"),
      (dict(cfg_change=lambda c: c.update(init_lora_weights="pissa")), "changed the base"),
      (dict(cfg_change=lambda c: c.update(r=8)), "gives rank 8"),
      (dict(tensors_change=lambda t: t.update({"base_model.model.lm_head.lora_A.weight":
                                               np.zeros((4, 64), np.float32)})), "lm_head"),
      (dict(tensors_change=lambda t: t.pop(
          "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")), "only one of"),
      (dict(tensors_change=lambda t: [t.pop(k) for k in list(t) if ".1.mlp" in k]),
       r"not in layers \[1\]"),
  ]
  for i, (kw, msg) in enumerate(cases):
    with pytest.raises(export_common.ExportError, match=msg):
      export_adapters.import_adapters([_break(src, tmp_path / f"bad{i}", **kw)], cfg)
  small = dataclasses.replace(cfg, intermediate_size=96)
  with pytest.raises(export_common.ExportError, match=r"mlp\.down_proj maps 128 -> 64.*96 -> 64"):
    export_adapters.import_adapters([src], small)
  with pytest.raises(export_common.ExportError, match="base model has 1 layers"):
    export_adapters.import_adapters([src], dataclasses.replace(cfg, num_layers=1))
  pickled = tmp_path / "pickled"
  pickled.mkdir()
  (pickled / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
  (pickled / "adapter_model.bin").write_bytes(b"\x80")
  with pytest.raises(export_common.ExportError, match="pickle is refused"):
    export_adapters.read_peft_adapter(pickled)
  with pytest.warns(UserWarning, match="trained on 'someone/else'"):
    other = _break(src, tmp_path / "other",
                   cfg_change=lambda c: c.update(base_model_name_or_path="someone/else"))
    export_adapters.import_adapters([other], cfg, base_name=str(tiny_llama.path))
  with pytest.raises(export_common.ExportError, match="names must be unique"):
    export_adapters.import_adapters([src, src], cfg)


def test_import_from_hub_repo_id(tiny_llama, tmp_path, monkeypatch):
  src = peft_adapter(tiny_llama, tmp_path / "local", 0, r=2, lora_alpha=4,
                     target_modules=["v_proj"])
  import huggingface_hub
  calls = []
  monkeypatch.setattr(huggingface_hub, "snapshot_download",
                      lambda repo_id, **kw: calls.append(repo_id) or str(src))
  ad = export_adapters.read_peft_adapter("someone/tiny-lora")
  assert calls == ["someone/tiny-lora"] and ad.name == "tiny-lora" and len(ad.a) == 2

  def offline(repo_id, **kw):
    raise OSError("offline")
  monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
  with pytest.raises(export_common.ExportError, match="could not be fetched from the Hugging Face Hub"):
    export_adapters.read_peft_adapter("someone/tiny-lora")


# --------------------------------------------------------------------------------------------
# Merged export
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture,routing", [
    ("tiny_llama", "uniform"), ("tiny_llama", "negated"), ("tiny_llama", "fixed"),
    ("tiny_llama", "oracle"), ("tiny_qwen2", "fixed"), ("tiny_llama_tied", "oracle")])
def test_merged_checkpoint_loads_in_transformers_and_matches(fixture, routing, request, tmp_path):
  ck = request.getfixturevalue(fixture)
  run_dir, model = make_run(ck, tmp_path / "run", targets=("q", "v", "o", "down"))
  w = [0.5, -1.0, 2.0]
  args = ["merged", "--run", str(run_dir), "--routing", routing, "--out", str(tmp_path / "m")]
  args += {"fixed": ["--weights", ",".join(map(str, w))], "oracle": ["--domain", "self harm"]
           }.get(routing, [])
  assert export_cmd.main(args) == 0
  hf = _hf(tmp_path / "m")
  assert not any("lora" in k for k in hf.state_dict())
  want = _ours(model, routing, fixed_weights=np.float32(w),
               domains=np.eye(3, dtype=np.float32)[[1, 1]])
  err = np.abs(_logits(hf) - want).max()
  print(f"\n{fixture} merged {routing}: max abs err {err:.2e}")
  assert err <= TOL, err
  assert np.abs(want - _logits(ck.model)).max() > 1e-2  # the merged experts matter
  hc = json.loads((tmp_path / "m" / "config.json").read_text())
  assert hc["tie_word_embeddings"] == model.cfg.tie_embeddings
  assert config_from_hf(hc) == model.cfg


def test_merged_base_routing_reproduces_the_base_exactly(tiny_qwen2, tmp_path):
  run_dir, _ = make_run(tiny_qwen2, tmp_path / "run")
  run = train_rundir.RunDir(run_dir).load()
  export_merged.export_merged(run, tmp_path / "m", export_merged.gate_vector("base", run.domains))
  got = load_file(str(tmp_path / "m" / "model.safetensors"))
  assert got.keys() == tiny_qwen2.state.keys()
  assert all(np.array_equal(got[k], tiny_qwen2.state[k]) for k in got)


def test_merged_errors(tiny_llama, tmp_path):
  run = train_rundir.RunDir(make_run(tiny_llama, tmp_path / "run", targets=("q",))[0]).load()
  with pytest.raises(export_common.ExportError, match="needs --domain"):
    export_merged.gate_vector("oracle", run.domains, ["nope"])
  with pytest.raises(export_common.ExportError, match="needs --weights with 3 values"):
    export_merged.gate_vector("fixed", run.domains, weights=[1.0])
  with pytest.raises(export_common.ExportError, match="learned routing depends on the input"):
    export_merged.gate_vector("learned", run.domains)
  with pytest.raises(export_common.ExportError, match="fingerprint"):  # a different base model
    export_merged.export_merged(run, tmp_path / "m", np.zeros(3), base=tmp_path / "run")
  assert export_cmd.main(["merged", "--run", str(tmp_path / "run"), "--routing", "fixed",
                      "--out", str(tmp_path / "m")]) == 2


@pytest.mark.parametrize("mt,kw", [
    ("llama", dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                     high_freq_factor=4.0, original_max_position_embeddings=32),
                   rope_theta=5e5, tie_embeddings=True)),
    ("mistral", dict(rms_norm_eps=1e-6)), ("qwen2", dict(qkv_bias=True, rope_theta=1e6))])
def test_hf_config_inverts_config_from_hf(mt, kw):
  cfg = dataclasses.replace(ModelConfig(max_position_embeddings=128), **kw)
  d = export_merged.hf_config(cfg, mt)
  assert config_from_hf(d) == cfg
  hc = transformers.AutoConfig.for_model(**d)
  assert hc.model_type == mt and hc.tie_word_embeddings == cfg.tie_embeddings
  assert hc.rope_parameters == {"rope_type": "default", **(cfg.rope_scaling or {}),
                                "rope_theta": cfg.rope_theta}
  with pytest.raises(export_common.ExportError, match="only qwen2 has"):
    export_merged.hf_config(dataclasses.replace(cfg, qkv_bias=mt != "qwen2"), mt)


@pytest.mark.slow
def test_merged_from_the_embedded_gguf(smollm2_gguf, tmp_path):
  """The GGUF base: HF safetensors + LlamaConfig (tied) + the tokenizer rebuilt from GGUF."""
  from safemoe_jax.io.weights import load_gguf
  cfg, params, _ = load_gguf(smollm2_gguf)
  tc = train_cfg.TrainConfig(experts=ExpertsConfig(rank=2, alpha=4.0, targets=("v",), dropout=0.0),
                         data=dataclasses.replace(data_cfg.DataConfig(), domains=("a", "b")))
  model = SafeMoELM(cfg, tc.experts_config(), tc.router, rngs=nnx.Rngs(0))
  model.load_base(params)
  model.experts.B_v[...] = 0.05 * jnp.ones_like(model.experts.B_v[...])
  out = tmp_path / "run"
  out.mkdir()
  info = train_rundir.RunDir(out).record(tc, smollm2_gguf, cfg)
  ckpt.save_group(out / "experts.safetensors", nnx.state(model, ExpertParam), {"run": info})
  run = train_rundir.RunDir(out).load()
  export_merged.export_merged(run, tmp_path / "m", export_merged.gate_vector("uniform", run.domains))
  hf = _hf(tmp_path / "m")
  assert hf.config.tie_word_embeddings and hf.config.model_type == "llama"
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "m"))
  assert tok.decode(tok("Hello, world 123")["input_ids"]) == "Hello, world 123"
  global IDS
  ids, IDS = IDS, np.asarray(tok(["The capital of France is"])["input_ids"], np.int32)
  try:
    err = np.abs(_logits(hf) - _ours(model, "uniform")).max()
  finally:
    IDS = ids
  print(f"\nSmolLM2 GGUF merged uniform: max abs err {err:.2e}")
  assert err <= TOL, err

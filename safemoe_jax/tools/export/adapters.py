"""Import: PEFT LoRA adapters (folders, or Hub repos when online) -> experts.safetensors, so that
`safemoe train` skips phase 1 and trains only the router. Adapters of different ranks or scales
are zero-padded to the largest rank and B is rescaled to our one scale (see peft.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import numpy as np
from safetensors import numpy as st

from safemoe_jax.core import config as C
from safemoe_jax.core.config import TARGETS, ExpertsConfig, ModelConfig
from safemoe_jax.core.experts import target_dims
from safemoe_jax.io import weights as W
from safemoe_jax.train.rundir import fingerprint
from safemoe_jax.tools.export.common import _PEFT_KEY, _TARGET_OF, PEFT_MODULES, ExportError


@dataclasses.dataclass
class Adapter:
  """One PEFT LoRA adapter, read and checked; modules keyed by (layer, target)."""
  name: str
  source: str
  config: dict[str, Any]
  a: dict[tuple[int, str], np.ndarray]  # lora_A [r, I]
  b: dict[tuple[int, str], np.ndarray]  # lora_B [O, r]
  scale: dict[tuple[int, str], float]  # s_m = alpha_m / r_m (or / sqrt(r_m) with rsLoRA)
  layers: tuple[int, ...] | None  # layers_to_transform, None = all

  @property
  def default_scale(self) -> float:
    r, alpha = self.config["r"], self.config.get("lora_alpha", 8)
    return alpha / (math.sqrt(r) if self.config.get("use_rslora") else r)


def _pattern_key(patterns: Sequence[str], name: str) -> str | None:
  """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", name)."""
  for p in patterns:
    if re.match(rf"(.*\.)?({p})$", name):
      return p
  return None


_INIT_CHANGES_BASE = ("pissa", "olora", "corda", "loftq")


def _check_adapter_config(cfg: dict[str, Any], where: str) -> None:
  def refuse(why: str):
    raise ExportError(f"{where}: {why}; only plain LoRA adapters can be SafeMoE experts")
  if cfg.get("peft_type", "").upper() != "LORA":
    refuse(f"peft_type is {cfg.get('peft_type')!r}, not 'LORA'")
  if cfg.get("use_dora"):
    refuse("use_dora=true: DoRA rescales each weight column by a learned magnitude, which is "
           "not an additive low-rank delta")
  if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
    refuse(f"it trains biases (bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')})")
  for key, why in (("modules_to_save", "fully fine-tuned module copies"),
                   ("trainable_token_indices", "trained token embeddings"),
                   ("layer_replication", "replicated layers"),
                   ("alora_invocation_tokens", "activated LoRA (aLoRA) turns on only after "
                                               "invocation tokens"),
                   ("target_parameters", "LoRA on raw parameters"),
                   ("megatron_config", "Megatron-parallel layers"),
                   ("use_qalora", "QA-LoRA"), ("use_bdlora", "BD-LoRA")):
    if cfg.get(key):
      refuse(f"{key}={cfg[key]!r} ({why})")
  init = cfg.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_INIT_CHANGES_BASE):
    refuse(f"init_lora_weights={init!r} changed the base weights when the adapter was created; "
           "convert it to a plain LoRA first (PEFT: save_pretrained(..., "
           "path_initial_model_for_weight_conversion=...))")


def _resolve(spec: str | Path) -> Path:
  """A local adapter folder, or a Hub repo id ('owner/name') fetched with huggingface_hub."""
  p = Path(spec)
  if p.is_dir():
    return p
  s = str(spec)
  if re.fullmatch(r"[\w.-]+/[\w.-]+", s) and not p.exists():
    try:
      return Path(huggingface_hub.snapshot_download(repo_id=s, allow_patterns=[
          "adapter_config.json", "adapter_model.safetensors", "README.md"]))
    except Exception as e:
      raise ExportError(f"{s} is not a local folder and could not be fetched from the Hugging "
                        f"Face Hub ({type(e).__name__}: {str(e)[:200]}); download the adapter "
                        "to a folder and pass that folder") from e
  raise ExportError(f"adapter {s} not found: expected a folder with adapter_config.json and "
                    "adapter_model.safetensors, or a Hub repo id owner/name")


def read_peft_adapter(spec: str | Path, name: str | None = None) -> Adapter:
  """Read and check one PEFT LoRA adapter (safetensors only, never pickle)."""
  d = _resolve(spec)
  if not (d / "adapter_config.json").is_file():
    raise ExportError(f"{d} has no adapter_config.json: not a PEFT adapter folder")
  cfg = json.loads((d / "adapter_config.json").read_text())
  where = f"adapter {spec}"
  _check_adapter_config(cfg, where)
  f = d / "adapter_model.safetensors"
  if not f.is_file():
    if list(d.glob("*.bin")) or list(d.glob("*.pt")):
      raise ExportError(f"{d} has only a pickled adapter_model.bin; pickle is refused because "
                        "loading it can run arbitrary code. Fix: where you trust the file, load "
                        "it in PEFT and save it again with save_pretrained(dir, "
                        "safe_serialization=True)")
    raise ExportError(f"{d} has no adapter_model.safetensors")
  tensors = st.load_file(str(f))
  a, b = {}, {}
  bad = []
  for key, val in tensors.items():
    m = _PEFT_KEY.match(key)
    if not m or m.group(2) not in _TARGET_OF:
      bad.append(key)
      continue
    layer, t, ab = int(m.group(1)), _TARGET_OF[m.group(2)], m.group(3)
    (a if ab == "A" else b)[(layer, t)] = np.asarray(val, np.float32)
  if bad:
    raise ExportError(f"{where} has tensors SafeMoE experts cannot hold: {bad[:6]}"
                      f"{' ...' if len(bad) > 6 else ''}; supported are lora_A/lora_B of "
                      f"{sorted(PEFT_MODULES.values())} in model.layers.N")
  if not a:
    raise ExportError(f"{where}: adapter_model.safetensors holds no LoRA tensors")
  if missing := sorted(set(a) ^ set(b)):
    raise ExportError(f"{where}: modules with only one of lora_A / lora_B: {missing[:6]}")
  rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
  scale = {}
  for (layer, t), A in a.items():
    mod = f"model.layers.{layer}.{PEFT_MODULES[t]}"  # PEFT matches patterns against this
    B = b[(layer, t)]
    rk, ak = _pattern_key(list(rank_pat), mod), _pattern_key(list(alpha_pat), mod)
    r = int(rank_pat[rk]) if rk is not None else int(cfg["r"])
    alpha = float(alpha_pat[ak]) if ak is not None else float(cfg.get("lora_alpha", 8))
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != r or B.shape[1] != r:
      raise ExportError(f"{where}: {mod} has lora_A {A.shape} and lora_B {B.shape}, but its "
                        f"adapter_config gives rank {r}: the files do not belong together")
    scale[(layer, t)] = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
  ltt = cfg.get("layers_to_transform")
  layers = None if ltt is None else tuple(sorted([ltt] if isinstance(ltt, int) else ltt))
  return Adapter(name or Path(str(spec).rstrip("/")).name, str(spec), cfg, a, b, scale, layers)


def _same_base(a: str, b: str) -> bool:
  a, b = str(a).rstrip("/"), str(b).rstrip("/")
  return a == b or Path(a).name == Path(b).name


def import_adapters(adapters: Sequence[Adapter | str | Path], cfg: ModelConfig, *,
                    names: Sequence[str] | None = None, base_name: str | None = None
                    ) -> tuple[ExpertsConfig, dict[str, np.ndarray]]:
  """PEFT adapters -> (ExpertsConfig, {'A_q': [L, E, I, R], 'B_q': [L, E, R, O], ...}).

  Targets are the union of the adapters' modules (zeros where an adapter lacks one); ranks are
  zero-padded to the largest; B is rescaled by s_m / s where a module's scale s_m differs from
  the model's s (see the module docstring). Shapes must fit `cfg`."""
  if not adapters:
    raise ExportError("no adapters given")
  if names is not None and len(names) != len(adapters):
    raise ExportError(f"{len(names)} names for {len(adapters)} adapters")
  ads = [x if isinstance(x, Adapter) else read_peft_adapter(x) for x in adapters]
  if names is not None:
    ads = [dataclasses.replace(ad, name=n) for ad, n in zip(ads, names)]
  if len({ad.name for ad in ads}) != len(ads):
    raise ExportError(f"expert names must be unique, got {[ad.name for ad in ads]}; pass names")
  L, dims = cfg.num_layers, target_dims(cfg)
  for ad in ads:
    bn = ad.config.get("base_model_name_or_path")
    if base_name and bn and not _same_base(bn, base_name):
      warnings.warn(f"adapter {ad.name} was trained on {bn!r}, importing onto {base_name!r}; "
                    "shapes match, but the expert is only exact on its own base", stacklevel=2)
    for (layer, t), A in ad.a.items():
      name = f"model.layers.{layer}.{PEFT_MODULES[t]}"
      if layer >= L:
        raise ExportError(f"adapter {ad.name} has {name}, but the base model has {L} layers: it "
                          f"was trained on a different base (its base: {bn!r})")
      d_in, d_out = dims[t][:2]
      if A.shape[1] != d_in or ad.b[(layer, t)].shape[0] != d_out:
        raise ExportError(f"adapter {ad.name}: {name} maps {A.shape[1]} -> "
                          f"{ad.b[(layer, t)].shape[0]} features, the base model's "
                          f"{PEFT_MODULES[t]} maps {d_in} -> {d_out}: it was trained on a "
                          f"different base (its base: {bn!r})")
    want_layers = ad.layers if ad.layers is not None else tuple(range(L))
    for t in {t for _, t in ad.a}:
      if gaps := [l for l in want_layers if (l, t) not in ad.a]:
        raise ExportError(f"adapter {ad.name} has {PEFT_MODULES[t]} in some layers but not in "
                          f"layers {gaps[:8]}, and no layers_to_transform says so: incomplete")
  targets = tuple(t for t in TARGETS if any(t == tt for ad in ads for _, tt in ad.a))
  R = max(A.shape[0] for ad in ads for A in ad.a.values())
  first = ads[0]
  s = first.default_scale  # the model's scale; modules with this scale are copied bit for bit
  if first.config["r"] == R and not first.config.get("use_rslora"):
    alpha = float(first.config.get("lora_alpha", 8))  # alpha / R == s exactly
  else:
    alpha = s * R
  E = len(ads)
  out = {}
  for t in targets:
    d_in, d_out = dims[t][:2]
    A_all = np.zeros((L, E, d_in, R), np.float32)
    B_all = np.zeros((L, E, R, d_out), np.float32)
    for e, ad in enumerate(ads):
      for (layer, tt), A in ad.a.items():
        if tt != t:
          continue
        r = A.shape[0]
        A_all[layer, e, :, :r] = A.T
        B = ad.b[(layer, t)].T
        f = ad.scale[(layer, t)] / s
        B_all[layer, e, :r, :] = B if f == 1.0 else (B.astype(np.float64) * f).astype(np.float32)
    out[f"A_{t}"], out[f"B_{t}"] = A_all, B_all
  ecfg = ExpertsConfig(num_experts=E, domains=tuple(ad.name for ad in ads), targets=targets,
                       rank=R, alpha=alpha, dropout=float(first.config.get("lora_dropout", 0.0)))
  ecfg.validate()
  return ecfg, out


def base_config(path: str | Path) -> ModelConfig:
  """The ModelConfig of an HF folder (config.json only) or a .gguf file."""
  p = Path(path)
  if p.suffix == ".gguf":
    return W.load_gguf(p)[0]
  if not (p / "config.json").is_file():
    raise ExportError(f"base model {p} is neither a .gguf file nor a folder with config.json")
  return W.config_from_hf(json.loads((p / "config.json").read_text()))


def write_imported(out: str | Path, ecfg: ExpertsConfig, experts: dict[str, np.ndarray],
                   mcfg: ModelConfig, base_path: str | Path,
                   adapters: Sequence[Adapter] = ()) -> Path:
  """experts.safetensors in train.save_group's format (keys 'experts.A_q', run metadata), so a
  run in that folder skips phase 1 and load_run / export read it. `out`: folder or file."""
  out = Path(out)
  f = out if out.suffix == ".safetensors" else out / "experts.safetensors"
  if f.exists() or (f.parent / "run.json").exists():
    raise ExportError(f"{f.parent} already holds {'a run' if not f.exists() else f.name}; "
                      "import into a new folder (or delete it to replace it)")
  f.parent.mkdir(parents=True, exist_ok=True)
  base = Path(base_path)
  fp = None
  if base.exists():
    fp = fingerprint(base)
  run = {"base_model": {"path": str(base.absolute()) if base.exists() else str(base_path),
                        "fingerprint": fp},
         "model": C.to_dict(mcfg), "domains": list(ecfg.domains), "experts": C.to_dict(ecfg),
         "router": None, "seed": None}
  sources = [{"name": a.name, "source": a.source, "r": a.config.get("r"),
              "lora_alpha": a.config.get("lora_alpha"), "use_rslora": bool(
                  a.config.get("use_rslora")), "base_model_name_or_path":
              a.config.get("base_model_name_or_path")} for a in adapters]
  meta = {"phase": "import", "domains": list(ecfg.domains), "run": run, "adapters": sources}
  tmp = f.with_suffix(".tmp")
  st.save_file({f"experts.{k}": v for k, v in experts.items()}, str(tmp),
            metadata={"safemoe": json.dumps(meta)})
  tmp.replace(f)
  return f


def train_overrides(ecfg: ExpertsConfig, base_path: str | Path, out_dir: str | Path) -> list[str]:
  """The `python -m safemoe_jax.train` overrides that make a run use imported experts."""
  return [f"output_dir={out_dir}", f"model.path={base_path}",
          f"data.domains=[{','.join(ecfg.domains)}]", f"experts.rank={ecfg.rank}",
          f"experts.alpha={ecfg.alpha!r}", f"experts.targets=[{','.join(ecfg.targets)}]"]

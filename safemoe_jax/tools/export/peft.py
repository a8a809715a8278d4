"""`python -m safemoe_jax.export`: SafeMoE artifacts to and from the PyTorch / PEFT / Hub world.

  peft    every trained expert -> a standard PEFT LoRA adapter folder; the router as safetensors
          + JSON next to them; a README.md model card (domains, data card, metrics)
  import  PEFT LoRA adapters (folders, or Hub repos when online) -> experts.safetensors, so that
          `python -m safemoe_jax.train` skips phase 1 and trains only the router
  merged  the base with s * sum_e g_e B_e A_e merged in, for a fixed gate vector g -> an HF
          checkpoint (config.json + model.safetensors + tokenizer) that transformers/vLLM load

Layouts. Ours (experts.py): A_<t> [L, E, I, R], B_<t> [L, E, R, O], one scale s = alpha / R:
    y = x W + s * sum_e g_e (x A_e) B_e
PEFT, identical for Llama, Mistral and Qwen2: per layer l and module m (e.g. self_attn.q_proj)
    base_model.model.model.layers.{l}.{m}.lora_A.weight  [r, I]
    base_model.model.model.layers.{l}.{m}.lora_B.weight  [O, r]
    y = x W^T + s_m (x A^T) B^T,  s_m = lora_alpha / r  (lora_alpha / sqrt(r) with use_rslora)
so A_peft = A[l, e].T and B_peft = B[l, e].T; the export writes r = R, lora_alpha = alpha.

Import of adapters with different ranks or scales: every module is zero-padded to the largest
rank R (the extra rank slices contribute exactly 0), and since our scale is one s per model, B
is multiplied by s_m / s. That is exact in real arithmetic and costs one float32 rounding of B;
modules whose s_m equals s (the first adapter's scale) are copied bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from safemoe_jax.core import config as C
from safemoe_jax import errors
from safemoe_jax.io import weights as W
from safemoe_jax.core.config import TARGETS, ExpertsConfig, ModelConfig, RouterConfig
from safemoe_jax.core.experts import target_dims


class ExportError(errors.SafeMoEError, ValueError):
  """An artifact cannot be exported or imported (missing file, unsupported adapter, mismatch)."""


# PEFT module path of each of our targets (the same in Llama, Mistral and Qwen2).
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}
_TARGET_OF = {m: t for t, m in PEFT_MODULES.items()}  # "self_attn.q_proj" -> "q"
_PEFT_KEY = re.compile(r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])"
                       r"(?:\.[\w-]+)?\.weight$")  # ".default" in unsaved state dicts
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "generation_config.json")


def peft_key(layer: int, target: str, ab: str) -> str:
  """PEFT's saved name of lora_A / lora_B of `target` in `layer` (task_type CAUSAL_LM)."""
  return f"base_model.model.model.layers.{layer}.{PEFT_MODULES[target]}.lora_{ab}.weight"


# --------------------------------------------------------------------------------------------
# A SafeMoE run on disk.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """What the exporters need from a run folder (train.py's artifacts, or an import)."""
  dir: Path
  model: ModelConfig
  experts_cfg: ExpertsConfig
  domains: tuple[str, ...]  # expert e <-> domains[e]
  experts: dict[str, np.ndarray]  # 'A_q': [L, E, I, R], 'B_q': [L, E, R, O], ...
  router_cfg: RouterConfig | None
  router: dict[str, np.ndarray] | None  # flat keys as train.save_group writes: 'router.w_out'
  base_path: str  # the base model the experts were trained on (HF folder or .gguf)
  base_fingerprint: str | None
  info: dict[str, Any]  # run.json / the artifact's metadata

  @property
  def scale(self) -> float:
    return self.experts_cfg.alpha / self.experts_cfg.rank


def _metadata(path: Path) -> dict[str, Any]:
  from safetensors import safe_open
  with safe_open(str(path), "np") as f:
    md = f.metadata() or {}
  try:
    return json.loads(md.get("safemoe", "{}"))
  except json.JSONDecodeError:
    return {}


def load_run(run_dir: str | Path) -> Run:
  """Read <run>/experts.safetensors (+ router.safetensors) and the configs they were made with."""
  from safetensors.numpy import load_file
  d = Path(run_dir)
  f = d / "experts.safetensors"
  if not f.is_file():
    raise ExportError(f"{d} has no experts.safetensors: train phase 1 first (python -m "
                      "safemoe_jax.train output_dir=...) or import adapters into it (python -m "
                      "safemoe_jax.export import ...)")
  # run.json is the whole run's record (train writes it); an import's file carries its own.
  info = (json.loads((d / "run.json").read_text()) if (d / "run.json").is_file()
          else _metadata(f).get("run") or {})
  if not info.get("model") or not info.get("experts"):
    raise ExportError(f"{f} carries no run metadata and {d}/run.json is missing: the model and "
                      "expert configuration it was written with are unknown")
  mcfg = C.from_dict(ModelConfig, info["model"])
  ecfg = C.from_dict(ExpertsConfig, info["experts"])
  domains = tuple(info.get("domains") or ecfg.domains
                  or [f"expert{e}" for e in range(ecfg.num_experts)])
  experts = {k.removeprefix("experts."): v for k, v in load_file(str(f)).items()}
  L, E, R = mcfg.num_layers, ecfg.num_experts, ecfg.rank
  want = {}
  for t in ecfg.targets:
    d_in, d_out = target_dims(mcfg)[t][:2]
    want |= {f"A_{t}": (L, E, d_in, R), f"B_{t}": (L, E, R, d_out)}
  got = {k: tuple(v.shape) for k, v in experts.items()}
  if got != want:
    raise ExportError(f"{f} does not match its configuration ({E} experts of rank {R} on "
                      f"{list(ecfg.targets)}): expected {want}, found {got}")
  if len(domains) != E:
    raise ExportError(f"{f}: {len(domains)} domains {list(domains)} for {E} experts")
  _check_finite(f, experts)
  router = rcfg = None
  if (rf := d / "router.safetensors").is_file():
    router = dict(load_file(str(rf)))
    _check_finite(rf, router)
    rcfg = C.from_dict(RouterConfig, info["router"]) if info.get("router") else None
  base = info.get("base_model") or {}
  return Run(d, mcfg, ecfg, domains, experts, rcfg, router, str(base.get("path", "")),
             base.get("fingerprint"), info)


def _check_finite(f: Path, arrays: dict[str, np.ndarray]) -> None:
  bad = [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.inexact)
         and not np.isfinite(v).all()]
  if bad:
    raise ExportError(f"{f} holds NaN or inf in {bad[:4]}: it is not a trained artifact and is "
                      f"not exported. Train the run again (the trainer now refuses to write such "
                      f"arrays)")


def _is_model_folder(d: Path) -> bool:
  return (d / "config.json").is_file() and any(d.glob("*.safetensors")) or any(d.glob("*.gguf"))


def check_out(out: Path, run: Run | None = None, base: str | Path | None = None) -> None:
  """Refuses an export folder that holds a run or a model it would overwrite. A folder this
  module wrote before (a merged export: config.json with a 'safemoe' entry) may be rewritten."""
  out = Path(out)
  if not out.exists():
    return
  if out.is_file():
    raise ExportError(f"--out {out} is a file; give a folder")
  r = out.resolve()
  if (out / "run.json").is_file() or (out / "experts.safetensors").is_file() or (
      run is not None and r == run.dir.resolve()):
    raise ExportError(f"--out {out} is a training run folder: exporting there would overwrite "
                      f"its artifacts (router.safetensors, README.md). Choose a new folder, "
                      f"e.g. {out / 'export'}")
  bases = [Path(b) for b in (base, run.base_path if run else None) if b]
  if any(b.exists() and r == (b if b.is_dir() else b.parent).resolve() for b in bases):
    raise ExportError(f"--out {out} is the base model's folder: exporting there would overwrite "
                      f"the base model. Choose a new folder")
  if _is_model_folder(out):
    try:
      ours = "safemoe" in json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
      ours = False
    if not ours:
      raise ExportError(f"--out {out} holds a model this tool did not export; exporting there "
                        f"would overwrite it. Choose a new folder")


# --------------------------------------------------------------------------------------------
# Export: experts -> PEFT adapters, router -> safetensors + JSON, model card.
# --------------------------------------------------------------------------------------------


def expert_state_dict(experts: dict[str, np.ndarray], e: int) -> dict[str, np.ndarray]:
  """Expert e's tensors under PEFT's names: lora_A [r, I], lora_B [O, r] per layer and target."""
  out = {}
  for key, arr in experts.items():  # 'A_q': [L, E, I, R] / 'B_q': [L, E, R, O]
    ab, t = key.split("_", 1)
    for layer in range(arr.shape[0]):
      out[peft_key(layer, t, ab)] = np.ascontiguousarray(arr[layer, e].T, np.float32)
  return out


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def peft_adapter_config(targets: Sequence[str], rank: int, alpha: float, base_name: str,
                        dropout: float = 0.0) -> dict[str, Any]:
  """adapter_config.json as PEFT writes it, restricted to the fields every PEFT >= 0.9 reads
  (newer PEFT fills the rest with their defaults, older PEFT would reject unknown fields)."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
          "r": int(rank), "lora_alpha": _number(alpha), "lora_dropout": float(dropout),
          "target_modules": sorted(PEFT_MODULES[t].split(".")[1] for t in targets),
          "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
          "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
          "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
          "alpha_pattern": {}, "revision": None}


def save_peft_adapter(out: str | Path, tensors: dict[str, np.ndarray], cfg: dict[str, Any],
                      card: str | None = None) -> Path:
  from safetensors.numpy import save_file
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
  (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
  if card is not None:
    (out / "README.md").write_text(card)
  return out


def _folder_names(domains: Sequence[str]) -> list[str]:
  """A file-system-safe, unique folder name per domain."""
  names: list[str] = []
  for d in domains:
    n = re.sub(r"[^A-Za-z0-9_.-]+", "_", d).strip("._") or "expert"
    while n in names or n in ("router",):
      n += "_"
    names.append(n)
  return names


def export_peft(run: Run, out: str | Path, experts: Sequence[str] | None = None,
                base_name: str | None = None, metrics: dict | None = None) -> dict[str, Path]:
  """One PEFT adapter folder per expert (all by default) under `out`, plus router.safetensors,
  router.json and README.md. Returns {domain: adapter folder}."""
  out = Path(out)
  check_out(out, run)
  chosen = list(run.domains) if not experts or list(experts) == ["all"] else list(experts)
  if unknown := [x for x in chosen if x not in run.domains]:
    raise ExportError(f"no expert for {unknown}; this run's experts are {list(run.domains)}")
  base_name = base_name or (run.info.get("base_model") or {}).get("hub_id") or run.base_path
  folders = dict(zip(run.domains, _folder_names(run.domains)))
  ecfg = run.experts_cfg
  written = {}
  for dom in chosen:
    e = run.domains.index(dom)
    cfg = peft_adapter_config(ecfg.targets, ecfg.rank, ecfg.alpha, base_name, ecfg.dropout)
    written[dom] = save_peft_adapter(out / folders[dom], expert_state_dict(run.experts, e), cfg,
                                     _adapter_card(run, dom, base_name))
  if run.router is not None:
    export_router(run, out)
  (out / "README.md").write_text(model_card(run, {d: folders[d] for d in chosen}, base_name,
                                            metrics))
  return written


def export_router(run: Run, out: str | Path) -> Path:
  """router.safetensors (train's keys, loadable with train.load_group) + router.json."""
  from safetensors.numpy import save_file
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in run.router.items()},
            str(out / "router.safetensors"), metadata={"format": "pt"})
  r = run.router_cfg
  spec = {
      "domains": list(run.domains), "adapters": dict(zip(run.domains,
                                                         _folder_names(run.domains))),
      "num_layers": run.model.num_layers, "hidden_size": run.model.hidden_size,
      "router": C.to_dict(r) if r else None,
      "tensors": {k: list(v.shape) for k, v in run.router.items()},
      "experts": {"rank": run.experts_cfg.rank, "alpha": run.experts_cfg.alpha,
                  "targets": list(run.experts_cfg.targets)},
      "formula": ("for layer l: x = h_l (the residual stream entering layer l; for per_sequence "
                  "granularity its mean over prompt tokens); if normalize_input: x = x * "
                  "rsqrt(mean(x^2) + 1e-6); linear form: z = x @ w_out[l] + b_out[l]; mlp form: "
                  "z = gelu(x @ w_in[l] + b_in[l]) @ w_out[l] + b_out[l] (no leading l for "
                  "scope 'shared'); g = activation(z / temperature), then top-k if top_k > 0; "
                  "each target projection y = W x + (alpha / rank) * sum_e g_e * B_e A_e x"),
  }
  (out / "router.json").write_text(json.dumps(spec, indent=1) + "\n")
  return out / "router.json"


def _adapter_card(run: Run, domain: str, base_name: str) -> str:
  return (f"---\nlibrary_name: peft\nbase_model: {base_name}\ntags: [safemoe, lora]\n---\n\n"
          f"# SafeMoE expert: {domain}\n\nA LoRA expert of a SafeMoE model, trained on the "
          f"'{domain}' domain (rank {run.experts_cfg.rank}, alpha {run.experts_cfg.alpha}, on "
          f"{', '.join(PEFT_MODULES[t] for t in run.experts_cfg.targets)}). See the README.md "
          "one folder up for the whole model.\n")


def _flat_numbers(d: Any, prefix: str = "") -> dict[str, float]:
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out |= _flat_numbers(v, f"{prefix}{k}/")
  elif isinstance(d, (int, float)) and not isinstance(d, bool):
    out[prefix.rstrip("/")] = float(d)
  return out


def model_card(run: Run, folders: dict[str, str], base_name: str,
               metrics: dict | None = None) -> str:
  """README.md: what the experts and router are, how to load them, the data card, metrics."""
  ecfg = run.experts_cfg
  lines = ["---", "library_name: peft", f"base_model: {base_name}",
           "tags: [safemoe, lora, mixture-of-experts, safety]", "---", "",
           "# SafeMoE: harm-domain LoRA experts and a safety router", "",
           f"Base model: `{base_name}` ({run.model.num_layers} layers, width "
           f"{run.model.hidden_size}). One LoRA expert per harm domain, rank {ecfg.rank}, "
           f"alpha {ecfg.alpha} (scale {run.scale:g}), on "
           f"{', '.join(PEFT_MODULES[t] for t in ecfg.targets)} of every layer. A router mixes "
           "them per token: `y = W x + (alpha / rank) * sum_e g_e(x) * B_e A_e x`.", "",
           "| expert | domain | folder |", "|---|---|---|"]
  lines += [f"| {i} | {d} | `{folders[d]}/` |" for i, d in enumerate(run.domains) if d in folders]
  lines += ["", "## Loading in PEFT", "", "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            f"base = AutoModelForCausalLM.from_pretrained({base_name!r})"]
  first = next(iter(folders.values()), "<domain>")
  lines += [f"model = PeftModel.from_pretrained(base, {first!r}, adapter_name={first!r})"]
  lines += [f"model.load_adapter({f!r}, adapter_name={f!r})" for f in list(folders.values())[1:]]
  lines += ["# a fixed mix y = W x + sum_e g_e s B_e A_e x (uniform: g_e = 1/E; negated: -1/E):",
            "model.add_weighted_adapter(list_of_adapters, weights=g, adapter_name='mix', "
            "combination_type='cat')", "model.set_adapter('mix')", "```", "",
            "Each folder alone is the expert applied with gate 1 (SafeMoE's oracle routing for "
            "that domain). The learned per-token routing needs the router: `router.safetensors` "
            "(tensor shapes and the formula in `router.json`) with SafeMoE "
            "(`python -m safemoe_jax.generate`). `python -m safemoe_jax.export merged` writes a "
            "plain HF checkpoint for any fixed gate vector."]
  if run.base_path.endswith(".gguf"):
    lines += ["", f"The experts were trained on the dequantised GGUF `{run.base_path}`; they are "
              "exact on the HF checkpoint that `python -m safemoe_jax.export merged --routing "
              "base` writes from it."]
  if run.router_cfg is not None:
    r = run.router_cfg
    lines += ["", "## Router", "", f"{r.form} router, {r.scope}, {r.granularity}, activation "
              f"{r.activation} (temperature {r.temperature}), top-k {r.top_k or 'dense'}."]
  card_txt = run.dir / "data_card.txt"
  if card_txt.is_file():
    lines += ["", "## Data card", "", "```", card_txt.read_text().rstrip(), "```"]
  nums: dict[str, float] = {}
  if (s := run.dir / "safemoe.json").is_file():
    m = json.loads(s.read_text()).get("metrics", {})
    nums |= {k: v for k, v in _flat_numbers(m).items() if "reference" in k or "/val/" in k}
  nums |= _flat_numbers(metrics or {})
  if nums:
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in nums.items()]
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Import: PEFT adapters -> stacked experts.
# --------------------------------------------------------------------------------------------


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
      from huggingface_hub import snapshot_download
      return Path(snapshot_download(repo_id=s, allow_patterns=[
          "adapter_config.json", "adapter_model.safetensors", "README.md"]))
    except Exception as e:
      raise ExportError(f"{s} is not a local folder and could not be fetched from the Hugging "
                        f"Face Hub ({type(e).__name__}: {str(e)[:200]}); download the adapter "
                        "to a folder and pass that folder") from e
  raise ExportError(f"adapter {s} not found: expected a folder with adapter_config.json and "
                    "adapter_model.safetensors, or a Hub repo id owner/name")


def read_peft_adapter(spec: str | Path, name: str | None = None) -> Adapter:
  """Read and check one PEFT LoRA adapter (safetensors only, never pickle)."""
  from safetensors.numpy import load_file
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
  tensors = load_file(str(f))
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
  from safetensors.numpy import save_file
  out = Path(out)
  f = out if out.suffix == ".safetensors" else out / "experts.safetensors"
  if f.exists() or (f.parent / "run.json").exists():
    raise ExportError(f"{f.parent} already holds {'a run' if not f.exists() else f.name}; "
                      "import into a new folder (or delete it to replace it)")
  f.parent.mkdir(parents=True, exist_ok=True)
  base = Path(base_path)
  fp = None
  if base.exists():
    from safemoe_jax.train.loop import fingerprint
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
  save_file({f"experts.{k}": v for k, v in experts.items()}, str(tmp),
            metadata={"safemoe": json.dumps(meta)})
  tmp.replace(f)
  return f


def train_overrides(ecfg: ExpertsConfig, base_path: str | Path, out_dir: str | Path) -> list[str]:
  """The `python -m safemoe_jax.train` overrides that make a run use imported experts."""
  return [f"output_dir={out_dir}", f"model.path={base_path}",
          f"data.domains=[{','.join(ecfg.domains)}]", f"experts.rank={ecfg.rank}",
          f"experts.alpha={ecfg.alpha!r}", f"experts.targets=[{','.join(ecfg.targets)}]"]


# --------------------------------------------------------------------------------------------
# Merged export: one fixed gate vector -> a plain HF checkpoint.
# --------------------------------------------------------------------------------------------


def gate_vector(routing: str, domains: Sequence[str], domain: Sequence[str] | str | None = None,
                weights: Sequence[float] | None = None) -> np.ndarray:
  """g [E] of a fixed routing, as the model's fixed_gates computes it."""
  E = len(domains)
  if routing == "base":
    return np.zeros(E, np.float32)
  if routing == "uniform":
    return np.full(E, 1.0 / E, np.float32)
  if routing == "negated":
    return np.full(E, -1.0 / E, np.float32)
  if routing == "fixed":
    if weights is None or len(weights) != E:
      raise ExportError(f"routing 'fixed' needs --weights with {E} values (one per expert: "
                        f"{list(domains)}), got {weights}")
    return np.asarray(weights, np.float32)
  if routing == "oracle":
    chosen = [domain] if isinstance(domain, str) else list(domain or [])
    if not chosen or (bad := [d for d in chosen if d not in domains]):
      raise ExportError(f"routing 'oracle' needs --domain, one or more of {list(domains)}; "
                        f"got {chosen}")
    g = np.zeros(E, np.float32)
    g[[domains.index(d) for d in chosen]] = 1.0
    return g / np.float32(g.sum())  # a multi-hot row is split evenly, as in the model
  raise ExportError(f"routing {routing!r} cannot be merged into fixed weights; use base, "
                    "uniform, negated, fixed or oracle (learned routing depends on the input: "
                    "export the experts and router with the 'peft' subcommand)")


def merge_experts(params: dict[str, np.ndarray], experts: dict[str, np.ndarray], scale: float,
                  g_E: np.ndarray) -> dict[str, np.ndarray]:
  """W'[l] = W[l] + s * sum_e g_e A[l, e] @ B[l, e] (our (in, out) layout), in float64 and
  rounded once to float32."""
  out = dict(params)
  g = np.asarray(g_E, np.float64)
  for key in experts:
    if not key.startswith("A_"):
      continue
    t = key[2:]
    A, B = experts[f"A_{t}"].astype(np.float64), experts[f"B_{t}"].astype(np.float64)
    delta = scale * np.einsum("leir,e,lero->lio", A, g, B)
    out[f"layers.{t}"] = (params[f"layers.{t}"].astype(np.float64) + delta).astype(np.float32)
  return out


def hf_state_dict(cfg: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Our layout -> HF names, PyTorch (out, in) layout; the inverse of weights.load_hf_checkpoint
  (no lm_head.weight with tied embeddings)."""
  W.check_params(cfg, params)
  out = {}
  for key, val in params.items():
    for i in range(cfg.num_layers) if key.startswith("layers.") else [None]:
      w = val[i] if i is not None else val
      if w.ndim == 2 and key != "embed":
        w = w.T
      out[W._hf_name(key, i)] = np.ascontiguousarray(w)
  return out


def hf_config(cfg: ModelConfig, model_type: str | None = None, **extra: Any) -> dict[str, Any]:
  """config.json for `cfg`: the inverse of weights.config_from_hf (llama, mistral, qwen2).
  Written for transformers 5 (rope_parameters) and 4 (rope_theta, rope_scaling) alike."""
  mt = model_type or ("qwen2" if cfg.qkv_bias else "llama")
  if mt not in HF_ARCHITECTURES:
    raise ExportError(f"model_type {mt!r}: supported are {list(HF_ARCHITECTURES)}")
  if cfg.qkv_bias != (mt == "qwen2"):
    raise ExportError(f"qkv_bias={cfg.qkv_bias} cannot be written as {mt!r}: only qwen2 has "
                      "q/k/v biases, and it always has them")
  rs = dict(cfg.rope_scaling) if cfg.rope_scaling else None
  d: dict[str, Any] = {
      "architectures": [HF_ARCHITECTURES[mt]], "model_type": mt, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "use_cache": True,
      "rope_parameters": {"rope_type": "default", **(rs or {}), "rope_theta": cfg.rope_theta},
      "rope_theta": cfg.rope_theta, "rope_scaling": rs, "dtype": "float32",
      "torch_dtype": "float32"}
  if mt == "llama":
    d |= {"attention_bias": False, "mlp_bias": False}
  else:
    d |= {"sliding_window": None, "use_sliding_window": False}
    if mt == "qwen2":
      d["max_window_layers"] = cfg.num_layers
  return d | extra


def _np_dtype(name: str) -> np.dtype:
  import ml_dtypes
  return {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}[name]


def _load_base(run: Run, base: str | Path | None) -> tuple[Path, ModelConfig, dict, dict | None]:
  """(path, config, float32 params, GGUF metadata or None) of the run's base model, checked
  against the fingerprint recorded when the experts were trained."""
  from safemoe_jax.io import assets
  from safemoe_jax.train.loop import fingerprint
  path = Path(base or run.base_path)
  if not path.exists() and not base and run.base_fingerprint == assets.SMOLLM2_GGUF_SHA256:
    path = assets.smollm2_gguf()  # the embedded default, fetched again on this machine
  if not path.exists():
    raise ExportError(f"base model {path} not found; pass --base with the model the experts "
                      "were trained on")
  if run.base_fingerprint and (fp := fingerprint(path)) != run.base_fingerprint:
    raise ExportError(f"base model {path} has fingerprint {fp[:12]}..., but the experts were "
                      f"trained on one with {run.base_fingerprint[:12]}... ({run.base_path}); "
                      "pass --base with that model")
  if path.suffix == ".gguf":
    cfg, params, md = W.load_gguf(path)
  else:
    (cfg, params), md = W.load_hf_checkpoint(path), None
  arch = lambda c: dataclasses.replace(c, param_dtype="float32", compute_dtype="float32",
                                       remat=False)
  if arch(cfg) != arch(run.model):
    raise ExportError(f"base model {path} has config {cfg}, the run was trained on {run.model}")
  return path, cfg, params, md


def export_merged(run: Run, out: str | Path, g_E: np.ndarray, *, base: str | Path | None = None,
                  dtype: str = "float32") -> Path:
  """Write base + s * sum_e g_e B_e A_e as an HF checkpoint: config.json, model.safetensors in
  PyTorch layout, and the tokenizer (copied from an HF base, rebuilt from a GGUF's metadata)."""
  from safetensors.numpy import save_file
  out = Path(out)
  check_out(out, run, base)
  path, cfg, params, md = _load_base(run, base)
  check_out(out, run, path)
  g = np.asarray(g_E, np.float32)
  if g.shape != (len(run.domains),):
    raise ExportError(f"gate vector of shape {g.shape}, expected ({len(run.domains)},)")
  merged = merge_experts(params, run.experts, run.scale, g)
  dt = _np_dtype(dtype)
  tensors = {k: v.astype(dt) for k, v in hf_state_dict(cfg, merged).items()}
  out.mkdir(parents=True, exist_ok=True)
  if md is None:  # HF base: keep its config.json (token ids, model_type, ...), set the dtype
    hc = json.loads((path / "config.json").read_text())
    hc.setdefault("architectures", [HF_ARCHITECTURES[hc["model_type"]]])
    hc["dtype"] = hc["torch_dtype"] = dtype
    for f in _TOKENIZER_FILES:
      if (path / f).is_file():
        shutil.copy2(path / f, out / f)
  else:
    ids = {f"{n}_token_id": int(md[f"tokenizer.ggml.{n}_token_id"]) for n in ("bos", "eos")
           if f"tokenizer.ggml.{n}_token_id" in md}
    hc = hf_config(cfg, "llama", **ids, dtype=dtype, torch_dtype=dtype)
    from safemoe_jax.io.tokenizer import tokenizer_from_gguf
    tokenizer_from_gguf(md).save_pretrained(out)
  hc["safemoe"] = {"gates": dict(zip(run.domains, g.tolist())), "scale": run.scale,
                   "experts": str(run.dir.absolute() / "experts.safetensors"),
                   "base_model": str(path)}
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(hc, indent=2) + "\n")
  return out


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _split(values: Sequence[str] | None) -> list[str]:
  return [x for v in values or [] for x in v.split(",") if x]


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m safemoe_jax.export", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("peft", help="experts -> PEFT adapter folders, router, model card")
  p.add_argument("--run", required=True, help="run folder (experts.safetensors, run.json)")
  p.add_argument("--out", required=True)
  p.add_argument("--expert", action="append", help="domain name(s), or 'all' (default)")
  p.add_argument("--base-name", default=None,
                 help="base_model_name_or_path to write (default: the run's base model path)")
  p.add_argument("--metrics", default=None, help="a JSON file of metrics for the model card")
  p = sub.add_parser("import", help="PEFT adapters -> experts.safetensors (router-only training)")
  p.add_argument("--adapters", nargs="+", required=True, help="folders or Hub repo ids")
  p.add_argument("--names", nargs="+", default=None, help="expert names (default: folder names)")
  p.add_argument("--base", default=None,
                 help="HF folder or .gguf the adapters belong to (default: embedded SmolLM2)")
  p.add_argument("--out", required=True, help="a run folder, or a .safetensors file")
  p = sub.add_parser("merged", help="base + fixed mix of experts -> HF checkpoint")
  p.add_argument("--run", required=True)
  p.add_argument("--routing", required=True,
                 choices=("base", "uniform", "negated", "fixed", "oracle"))
  p.add_argument("--domain", action="append", help="oracle: the domain(s) whose expert is used")
  p.add_argument("--weights", default=None, help="fixed: E comma-separated gate values")
  p.add_argument("--base", default=None, help="base model, if it moved since training")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  if args.cmd == "peft":
    run = load_run(args.run)
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    done = export_peft(run, args.out, _split(args.expert), args.base_name, metrics)
    for d, f in done.items():
      print(f"{d:20s} {f}")
    print(f"{'model card':20s} {Path(args.out) / 'README.md'}")
  elif args.cmd == "import":
    from safemoe_jax.io import assets
    base = Path(args.base) if args.base else assets.smollm2_gguf()
    mcfg = base_config(base)
    ads = [read_peft_adapter(a) for a in args.adapters]
    ecfg, experts = import_adapters(ads, mcfg, names=args.names, base_name=str(base))
    f = write_imported(args.out, ecfg, experts, mcfg, base, ads)
    print(f"wrote {f}: {ecfg.num_experts} experts {list(ecfg.domains)}, rank {ecfg.rank}, "
          f"alpha {ecfg.alpha}, targets {list(ecfg.targets)}")
    if f.name == "experts.safetensors":
      print("train only the router with (plus your data sources):\n  python -m "
            "safemoe_jax.train " + " ".join(train_overrides(ecfg, base.absolute(), f.parent)))
  else:
    run = load_run(args.run)
    w = [float(x) for x in args.weights.split(",")] if args.weights else None
    g = gate_vector(args.routing, run.domains, _split(args.domain), w)
    out = export_merged(run, args.out, g, base=args.base, dtype=args.dtype)
    print(f"wrote {out} (gates {dict(zip(run.domains, g.tolist()))})")
  return 0


if __name__ == "__main__":
  sys.exit(main())

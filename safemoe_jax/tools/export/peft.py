"""`python -m safemoe_jax export`: SafeMoE artifacts to and from the PyTorch / PEFT / Hub world.

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

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import numpy as st

from safemoe_jax.core import config as C
from safemoe_jax.train.rundir import TrainedRun
from safemoe_jax.io import jsonio
from safemoe_jax.tools.export.common import (PEFT_MODULES, RESERVED_NAMES, ExportError, check_out,
                                             mark_out, peft_key)


# --------------------------------------------------------------------------------------------
# A SafeMoE run on disk.
# --------------------------------------------------------------------------------------------


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
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  st.save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
  jsonio.write_text_atomic(out / "adapter_config.json",
                           json.dumps(cfg, indent=2, sort_keys=True) + "\n")
  if card is not None:
    jsonio.write_text_atomic(out / "README.md", card)
  return out


def _folder_names(domains: Sequence[str]) -> list[str]:
  """A file-system-safe, unique folder name per domain, none of export's own file names
  (compared without case: macOS and Windows file systems ignore it)."""
  names: list[str] = []
  taken = {x.lower() for x in RESERVED_NAMES}
  for d in domains:
    n = re.sub(r"[^A-Za-z0-9_.-]+", "_", d).strip("._") or "expert"
    while n.lower() in taken | {x.lower() for x in names}:
      n += "_"
    names.append(n)
  return names


def export_peft(run: TrainedRun, out: str | Path, experts: Sequence[str] | None = None,
                base_name: str | None = None, metrics: dict | None = None,
                overwrite: bool = False) -> dict[str, Path]:
  """One PEFT adapter folder per expert (all by default) under `out`, plus router.safetensors,
  router.json and README.md. Returns {domain: adapter folder}."""
  out = Path(out)
  check_out(out, run, overwrite=overwrite)
  chosen = list(run.domains) if not experts or list(experts) == ["all"] else list(experts)
  if unknown := [x for x in chosen if x not in run.domains]:
    raise ExportError(f"no expert for {unknown}; this run's experts are {list(run.domains)}")
  base_name = base_name or (run.info.get("base_model") or {}).get("hub_id") or run.base_path
  folders = dict(zip(run.domains, _folder_names(run.domains)))
  ecfg = run.experts_cfg
  written = {}
  out.mkdir(parents=True, exist_ok=True)
  mark_out(out)
  for dom in chosen:
    e = run.domains.index(dom)
    cfg = peft_adapter_config(ecfg.targets, ecfg.rank, ecfg.alpha, base_name, ecfg.dropout)
    written[dom] = save_peft_adapter(out / folders[dom], expert_state_dict(run.experts, e), cfg,
                                     _adapter_card(run, dom, base_name))
  if run.router is not None:
    export_router(run, out)
  jsonio.write_text_atomic(out / "README.md", model_card(run, {d: folders[d] for d in chosen},
                                                         base_name, metrics))
  return written


def export_router(run: TrainedRun, out: str | Path) -> Path:
  """router.safetensors (train's keys, loadable with train.load_group) + router.json."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  st.save_file({k: np.ascontiguousarray(v) for k, v in run.router.items()},
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
  jsonio.write_text_atomic(out / "router.json", json.dumps(spec, indent=1) + "\n")
  return out / "router.json"


def _adapter_card(run: TrainedRun, domain: str, base_name: str) -> str:
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


def model_card(run: TrainedRun, folders: dict[str, str], base_name: str,
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
            "(`python -m safemoe_jax generate`). `python -m safemoe_jax export merged` writes a "
            "plain HF checkpoint for any fixed gate vector."]
  if run.base_path.endswith(".gguf"):
    lines += ["", f"The experts were trained on the dequantised GGUF `{run.base_path}`; they are "
              "exact on the HF checkpoint that `python -m safemoe_jax export merged --routing "
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
    m = jsonio.read_json(s).get("metrics", {})
    nums |= {k: v for k, v in _flat_numbers(m).items() if "reference" in k or "/val/" in k}
  nums |= _flat_numbers(metrics or {})
  if nums:
    lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" for k, v in nums.items()]
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Import: PEFT adapters -> stacked experts.
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Merged export: one fixed gate vector -> a plain HF checkpoint.
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

"""What the exporters share: the error, PEFT's module names, and the guard against writing over a
run or a model folder."""

from __future__ import annotations

import json
import re
from pathlib import Path


from safemoe_jax import errors
from safemoe_jax.train.rundir import TrainedRun


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


# A file export writes into every folder it exports to: such a folder may be exported to
# again. Export's own file names are reserved: no expert's adapter folder may take one.
EXPORT_MARKER = ".safemoe-export"
RESERVED_NAMES = ("README.md", "router.json", "router.safetensors", "router", EXPORT_MARKER)


def _is_model_folder(d: Path) -> bool:
  return (d / "config.json").is_file() and any(d.glob("*.safetensors")) or any(d.glob("*.gguf"))


def _ours(d: Path) -> bool:
  """A folder this module wrote: its marker, or a merged export's config.json from before it."""
  if (d / EXPORT_MARKER).is_file():
    return True
  try:
    return "safemoe" in json.loads((d / "config.json").read_text())
  except (OSError, ValueError):
    return False


def mark_out(out: Path) -> None:
  (Path(out) / EXPORT_MARKER).write_text("written by safemoe export; it may write here again\n")


def check_out(out: Path, run: TrainedRun | None = None, base: str | Path | None = None,
              overwrite: bool = False) -> None:
  """Refuses an export folder that is an input (a run folder, the base model's folder) or that
  holds files this module did not write (a model, a user's README.md) unless `overwrite`. A
  folder this module wrote before (its marker) may be rewritten."""
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
  if overwrite or _ours(out):
    return
  if _is_model_folder(out):
    raise ExportError(f"--out {out} holds a model this tool did not export; exporting there "
                      f"would overwrite it. Choose a new folder")
  if names := sorted(p.name for p in out.iterdir()):
    raise ExportError(f"--out {out} is a folder this tool did not write, and not empty "
                      f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}): exporting "
                      f"there could overwrite its files. Choose a new or empty folder, or pass "
                      f"--overwrite")

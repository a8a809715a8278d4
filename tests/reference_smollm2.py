"""An independent float32 Hugging Face folder of SmolLM2-135M-Instruct, built from the pinned GGUF.

transformers' own GGUF loader dequantises the Q4_1 tensors and undoes llama.cpp's Q/K row
permutation with its own code; the folder it writes (config.json, model.safetensors, tokenizer
files) is the reference that our GGUF reader and tokenizer are compared with. It is built once
and cached under <cache>/reference/, keyed by the GGUF's sha256 and the transformers version.

  python -m tests.reference_smollm2   # build (or find) it and print its path
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from safemoe_jax.io import assets


class ReferenceError_(RuntimeError):
  """The reference folder cannot be built here (a missing or failing prerequisite)."""


def folder_for(gguf_sha256: str) -> Path:
  import transformers
  return (assets.cache_dir() / "reference"
          / f"smollm2-135m-hf-{gguf_sha256[:16]}-transformers-{transformers.__version__}")


def build(gguf: Path, out: Path) -> Path:
  """Convert `gguf` with transformers (torch + gguf) into `out`; atomic, reused if present."""
  if (out / "model.safetensors").is_file() and (out / "reference.json").is_file():
    return out
  try:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
  except ImportError as e:
    raise ReferenceError_(f"the reference needs the test extra's torch and transformers: {e}")
  t0 = time.perf_counter()
  gguf = Path(gguf)
  try:
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
  except Exception as e:  # e.g. the gguf package is missing, or a transformers regression
    raise ReferenceError_(f"transformers could not load {gguf}: {type(e).__name__}: {e}") from e
  if not all(p.dtype == torch.float32 for p in model.parameters()):
    raise ReferenceError_("transformers did not dequantise every tensor to float32")
  # The GGUF route leaves a quantizer attached, which makes save_pretrained refuse; the weights
  # are plain float32 already, so drop it and its config entry.
  model.hf_quantizer = None
  if hasattr(model.config, "quantization_config"):
    delattr(model.config, "quantization_config")
  model.config.dtype = "float32"
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + f".tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  model.save_pretrained(tmp, safe_serialization=True)
  tok.save_pretrained(tmp)
  import transformers
  (tmp / "reference.json").write_text(json.dumps({
      "gguf": str(gguf), "gguf_sha256": assets.sha256_file(gguf),
      "route": "transformers GGUF loader (its own dequantisation and Q/K un-permute)",
      "transformers": transformers.__version__, "torch": torch.__version__,
      "seconds": round(time.perf_counter() - t0, 1)}, indent=1))
  try:
    os.replace(tmp, out)
  except OSError:  # another process finished first: keep its folder
    shutil.rmtree(tmp, ignore_errors=True)
    if not (out / "model.safetensors").is_file():
      raise
  return out


def reference_folder() -> Path:
  gguf = assets.smollm2_gguf()
  return build(gguf, folder_for(assets.SMOLLM2_GGUF_SHA256))


if __name__ == "__main__":
  t = time.perf_counter()
  path = reference_folder()
  print(path, f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
  print(path)

"""Hugging Face Hub model ids -> a local snapshot folder (safetensors, config, tokenizer only).

`model.path` is a local HF folder, a .gguf file, or a Hub id (`org/name`, or `name` such as gpt2).
A Hub id is fetched with `huggingface_hub.snapshot_download` into the usual Hub cache
(`HF_HUB_CACHE` / `HF_HOME`), reading only what we load: config and tokenizer files, then the
safetensors the index names (or model.safetensors); no pickle weights, no custom code, no
duplicate consolidated.* weights. `HF_TOKEN` (or `hf auth login`) gives access to gated models
such as Llama; `model.revision` pins a branch, tag or commit. With
`HF_HUB_OFFLINE=1` the cached snapshot is used without any network access.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from safemoe_jax.core.config import ConfigError
from safemoe_jax.io import assets

# What a model folder needs besides its weights: config, tokenizer and chat template.
META_PATTERNS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
INDEX = "model.safetensors.index.json"
# `org/name`, or a bare `name` (gpt2, distilgpt2: the Hub's oldest models have no organisation)
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")
_FILE_SUFFIXES = (".gguf", ".safetensors", ".json", ".yaml", ".yml", ".bin", ".pt", ".pth")


def is_hub_id(spec: str) -> bool:
  """`org/name` or `name` that is not an existing local path (a local folder always wins), not a
  weights/config file name, and not a shipped model's name (io.assets.EMBEDDED_MODELS)."""
  return (bool(_HUB_ID.match(spec)) and not Path(spec).exists()
          and not spec.lower().endswith(_FILE_SUFFIXES) and spec not in assets.EMBEDDED_MODELS)


def weight_files(folder: Path) -> list[str]:
  """The weight files to fetch, once the metadata is in `folder`: exactly what the loader reads
  (io.weights._hf_files): the shards the safetensors index names, else model.safetensors. So
  Mistral's consolidated.safetensors (the same weights in Mistral's own layout, ~14.5 GB for 7B)
  and pickle files are never downloaded."""
  idx = folder / INDEX
  if idx.is_file():
    try:
      return sorted(set(json.loads(idx.read_text())["weight_map"].values()))
    except (ValueError, KeyError, AttributeError) as e:
      raise ConfigError(f"{idx} is not a safetensors index (a JSON object with a weight_map): "
                        f"{e}") from None
  return ["model.safetensors"]


def _download(spec: str, revision: str, patterns: list[str]) -> Path:
  return Path(huggingface_hub.snapshot_download(
      spec, revision=revision or None, allow_patterns=patterns,
      token=os.environ.get("HF_TOKEN") or None))


def resolve_model(spec: str, revision: str = "") -> tuple[Path, str | None]:
  """(local folder or file, the Hub id it came from or None) for a `model.path` value."""
  if not is_hub_id(spec):
    return Path(spec), None
  page = f"https://huggingface.co/{spec}"
  try:
    meta = _download(spec, revision, [*META_PATTERNS, INDEX])
    # the weights from the same commit (the snapshot folder's name), even if a branch moved
    weights = weight_files(meta)
    path = _download(spec, meta.name, weights)
  except GatedRepoError:
    raise ConfigError(f"model.path {spec!r} is a gated model: accept its licence at {page}, then "
                      f"log in (`hf auth login`, or set HF_TOKEN) and run again") from None
  except RevisionNotFoundError:
    raise ConfigError(f"model.path {spec!r}: revision {revision!r} does not exist; set "
                      f"model.revision to a branch, tag or commit of {page}") from None
  except RepositoryNotFoundError:
    raise ConfigError(f"model.path {spec!r} is neither a local path nor a Hub model you can "
                      f"access ({page}); check the id, or log in for a private model") from None
  except LocalEntryNotFoundError as e:
    raise ConfigError(f"model.path {spec!r}: the Hub could not be reached and no cached copy "
                      f"was found ({str(e).splitlines()[0][:200]}). Run once with internet access "
                      f"(the snapshot is cached), or give a local folder") from None
  if missing := [w for w in weights if not (path / w).is_file()]:
    raise ConfigError(f"model.path {spec!r}: the Hub snapshot at {path} has no .safetensors "
                      f"weights in the Hugging Face layout (missing {missing[:3]}; only "
                      f"model.safetensors or the shards its index names are loaded, never pickle "
                      f"files or Mistral's consolidated.safetensors)")
  return path, spec

"""Hugging Face Hub model ids -> a local snapshot folder (safetensors, config, tokenizer only).

`model.path` is a local HF folder, a .gguf file, or a Hub id (`org/name`). A Hub id is fetched with
`huggingface_hub.snapshot_download` into the usual Hub cache (`HF_HUB_CACHE` / `HF_HOME`), reading
only what we load: no pickle weights, no custom code. `HF_TOKEN` (or `hf auth login`) gives access
to gated models such as Llama; `model.revision` pins a branch, tag or commit. With
`HF_HUB_OFFLINE=1` the cached snapshot is used without any network access.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from safemoe_jax.core.config import ConfigError

# What a model folder needs: weights (safetensors, sharded or not, with the index), config,
# tokenizer and chat template. Never *.bin / *.pt / *.py.
ALLOW_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "config.json",
                  "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(spec: str) -> bool:
  """`org/name` that is not an existing local path (a local folder always wins)."""
  return bool(_HUB_ID.match(spec)) and not Path(spec).exists() and not spec.endswith(".gguf")


def resolve_model(spec: str, revision: str = "") -> tuple[Path, str | None]:
  """(local folder or file, the Hub id it came from or None) for a `model.path` value."""
  if not is_hub_id(spec):
    return Path(spec), None
  page = f"https://huggingface.co/{spec}"
  try:
    folder = huggingface_hub.snapshot_download(
        spec, revision=revision or None, allow_patterns=list(ALLOW_PATTERNS),
        token=os.environ.get("HF_TOKEN") or None)
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
  path = Path(folder)
  if not any(path.glob("*.safetensors")):
    raise ConfigError(f"model.path {spec!r}: the Hub snapshot at {path} has no .safetensors "
                      f"weights (only safetensors are loaded, never pickle files)")
  return path, spec

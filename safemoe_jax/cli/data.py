"""`safemoe data --card [--config FILE] [key.sub=value ...]`: print and
save the data card of a data configuration (the embedded default unless one is given).

Settings are DataConfig fields (listed below; a leading `data.` is optional); a YAML file's
`data:` section is read when it has one, else the whole file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args
from safemoe_jax.data.card import data_card, format_card
from safemoe_jax.data.config import DataConfig
from safemoe_jax.data.encode import build
from safemoe_jax.data.select import build_sets
from safemoe_jax.io import assets
from safemoe_jax.io.tokenizer import tokenizer_from_gguf
from safemoe_jax.log import get_logger

log = get_logger("safemoe_jax.data")


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = args.parser("safemoe data", __doc__, DataConfig, yaml_config=True)
  ap.add_argument("--card", action="store_true", help="print and save the data card")
  ap.add_argument("--out", default="runs/data_card", help="writes OUT.json and OUT.txt")
  ap.add_argument("--no-tokens", action="store_true",
                  help="skip tokenisation with the embedded SmolLM2 tokenizer")
  a = ap.parse_args(argv)
  cfg = args.build(DataConfig, a.overrides, config=a.config, section="data")
  cfg.validate()
  if a.print_config:
    return args.print_config(cfg)
  if not a.card:
    ap.error("nothing to do: pass --card")
  if a.no_tokens:
    card = data_card(build_sets(cfg), cfg)
  else:
    card = build(cfg, tokenizer_from_gguf(assets.smollm2_gguf())).card()
  text = format_card(card)
  print(text)
  out = Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(card, indent=1, default=str))
  out.with_suffix(".txt").write_text(text + "\n")
  log.info(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.txt')}")
  return 0

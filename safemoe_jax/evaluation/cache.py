"""The evaluation's caches: append-only JSONL stores of generations (per system weights, prompt
and decoding settings) and verdicts (per judge, prompt and response)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from safemoe_jax.evaluation.benchmarks import _key
from safemoe_jax.evaluation.systems import System
from safemoe_jax.io import jsonio
from safemoe_jax.train.metrics import json_default, open_append


class JsonlCache:
  """Append-only {key: row} store; the last row of a key wins. Read with jsonio: a torn last
  line is skipped (and cut before the next append); a null row, a row without a key or a byte
  that is not UTF-8 is an error naming the file and line."""

  def __init__(self, path: Path):
    self.path = Path(path)
    self.rows: dict[str, dict] = {}
    if self.path.exists():
      for n, r in jsonio.jsonl_rows(jsonio.read_text(self.path), str(self.path)):
        if not isinstance(r.get("key"), str):
          raise jsonio.FileFormatError(f"{self.path} line {n}: a cache row without a 'key'; "
                                       f"delete the file to rebuild the cache")
        self.rows[r["key"]] = r

  def __contains__(self, key: str) -> bool:
    return key in self.rows

  def get(self, key: str) -> dict | None:
    return self.rows.get(key)

  def add(self, rows: Iterable[dict]) -> None:
    rows = list(rows)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open_append(self.path) as f:  # after a line cut by an interrupted run
      for r in rows:
        f.write(json.dumps(r, default=json_default) + "\n")
        self.rows[r["key"]] = r


def gen_key(system: System, prompt: str, decoding: dict, chat_system: str | None) -> str:
  return _key("gen", system.name, system.fingerprint, prompt, decoding, chat_system)


def verdict_key(judge_name: str, prompt: str, response: str, judge_version: str = "") -> str:
  """`judge_version`: what the judge's verdicts depend on besides its name (the fingerprint of
  its weights, its settings): a retrained judge at the same path judges again."""
  return _key("verdict", judge_name, prompt, response, *([judge_version] if judge_version else []))

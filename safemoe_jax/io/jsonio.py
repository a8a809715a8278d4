"""The one way the package reads and writes its JSON files (issue 32).

Reading: text must be UTF-8 (a bad byte is an error naming the file and line); a JSON file must
parse and hold the expected kind of value; a JSON-lines file is read row by row, where a torn last
line (no newline at the end and not valid JSON: a write cut short by a kill) is skipped with a
warning, and any other line that is not a JSON object (`null`, a number, cut JSON in the middle)
is an error naming the file and line. Every error is a `FileFormatError`: one `error:` line from
any command, never a traceback.

Writing: a whole-file artifact (results.json, a card, a report) is written to a temporary file
next to it and renamed over it, so a kill leaves either the old or the new file, never half of
one; on an object store (gs://) a write is whole by itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from safemoe_jax.errors import SafeMoEError
from safemoe_jax.io import paths
from safemoe_jax.log import get_logger

log = get_logger(__name__)


class FileFormatError(SafeMoEError, ValueError):
  """A file the package reads is not what it should be (not UTF-8, not JSON, a null row)."""


_KIND = {dict: "an object", list: "a list"}


def read_text(path: paths.PathLike) -> str:
  """The file's text; a byte that is not UTF-8 is an error naming the file and its line."""
  p = paths.as_path(path)
  data = p.read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise FileFormatError(f"{p} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                          f"offset {e.start}); save the file as UTF-8") from None


def parse_json(text: str, where: str, kind: type | None = dict) -> Any:
  """json.loads with an error for people naming `where`; `kind` (dict, list or None = any)."""
  try:
    v = json.loads(text)
  except json.JSONDecodeError as e:
    raise FileFormatError(f"{where} line {e.lineno}: not valid JSON ({e.msg}); the file is cut "
                          f"or damaged") from None
  if kind is not None and not isinstance(v, kind):
    raise FileFormatError(f"{where}: expected {_KIND.get(kind, kind.__name__)}, found "
                          f"{json.dumps(v)[:40]}")
  return v


def read_json(path: paths.PathLike, kind: type | None = dict) -> Any:
  """A whole JSON file (an object by default)."""
  return parse_json(read_text(path), str(path), kind)


def jsonl_rows(text: str, where: str) -> Iterator[tuple[int, dict]]:
  """(line number, row) of a JSON-lines text. A torn last line is skipped (warned); any other
  line that is not a JSON object is an error naming `where` and the line."""
  lines = text.split("\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if i == len(lines) - 1:  # no newline after it: a write cut short
        log.warning(f"{where} line {i + 1}: skipped a torn last line ({len(line)} characters)")
        return
      raise FileFormatError(f"{where} line {i + 1}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise FileFormatError(f"{where} line {i + 1}: expected a JSON object, found "
                            f"{json.dumps(row)[:40]}")
    yield i + 1, row


def read_jsonl(path: paths.PathLike, missing_ok: bool = True) -> list[dict]:
  """Every row of a JSON-lines file ([] when it does not exist and `missing_ok`)."""
  p = paths.as_path(path)
  if missing_ok and not p.exists():
    return []
  return [r for _, r in jsonl_rows(read_text(p), str(p))]


def write_text_atomic(path: paths.PathLike, text: str) -> Path:
  """Writes a whole file atomically: a temporary file beside it (one per process), renamed."""
  p = paths.as_path(path)
  if not paths.is_local(p):
    p.write_text(text)
    return p
  tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
  finally:
    if tmp.exists():
      tmp.unlink()
  return p


def write_json_atomic(path: paths.PathLike, doc: Any, *, default: Callable | None = str,
                      indent: int | None = 1, **kw) -> Path:
  return write_text_atomic(path, json.dumps(doc, indent=indent, default=default, **kw))

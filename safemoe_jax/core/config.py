"""Typed configuration: dataclass schema, YAML files, dotted command-line overrides, validation.

Every choice the paper leaves open is a field here with a default and a one-line reason.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from safemoe_jax.core.frozen import Frozen, FrozenDict, freeze
from safemoe_jax.errors import SafeMoEError


class ConfigError(SafeMoEError, ValueError):
  """A configuration value is missing, unknown, or of the wrong type."""


# --------------------------------------------------------------------------------------------
# Model architecture (Llama family). Filled from an HF config.json or GGUF metadata.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig(Frozen):
  vocab_size: int = 256
  hidden_size: int = 64  # D
  intermediate_size: int = 128  # F (SwiGLU width)
  num_layers: int = 2  # L
  num_heads: int = 4  # Hq
  num_kv_heads: int = 2  # Hkv (grouped-query attention when < num_heads)
  head_dim: int = 16  # hd
  rope_theta: float = 10000.0
  # Llama-3.1 style RoPE scaling: {"rope_type": "llama3", "factor", "low_freq_factor",
  # "high_freq_factor", "original_max_position_embeddings"}; None for plain RoPE. A FrozenDict
  # (a dict given here is frozen): the config is hashed by jit and the trainer.
  rope_scaling: FrozenDict | None = None
  rms_norm_eps: float = 1e-5
  max_position_embeddings: int = 2048
  tie_embeddings: bool = False  # SmolLM2 ties the LM head to the input embedding
  qkv_bias: bool = False  # Qwen2/2.5 have biases on q, k, v
  param_dtype: str = "float32"  # storage dtype of the frozen base (bfloat16 on TPU)
  compute_dtype: str = "float32"  # matmul dtype (bfloat16 on TPU); norms/softmax stay float32
  remat: bool = False  # rematerialise each layer in the backward pass (saves activation memory)

  def validate(self) -> None:
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim"):
      if getattr(self, f) <= 0:
        raise ConfigError(f"model.{f} must be > 0, got {getattr(self, f)}")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"model.num_heads ({self.num_heads}) must be a multiple of "
                        f"model.num_kv_heads ({self.num_kv_heads})")
    if self.head_dim % 2:
      raise ConfigError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
    for f in ("param_dtype", "compute_dtype"):
      if getattr(self, f) not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.{f} must be float32, bfloat16 or float16, got "
                          f"{getattr(self, f)!r}")


# --------------------------------------------------------------------------------------------
# The SafeMoE layer: stacked LoRA experts and the router.
# --------------------------------------------------------------------------------------------

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
  num_experts: int = 0  # E; 0 means a plain model without experts
  domains: tuple[str, ...] = ()  # expert e is trained on domains[e]; len == num_experts
  targets: tuple[str, ...] = ("q", "k", "v")  # authors' development code: q, k, v of every layer
  rank: int = 32  # authors' development code
  alpha: float = 16.0  # scaling alpha / rank, as in PEFT
  dropout: float = 0.05  # on the LoRA input, training only (one mask shared by all experts)
  init_scale: float = 0.0  # 0 -> A ~ Kaiming-uniform like PEFT; >0 -> A ~ N(0, init_scale^2)

  def validate(self) -> None:
    if self.num_experts < 0:
      raise ConfigError(f"experts.num_experts must be >= 0, got {self.num_experts}")
    if self.num_experts and self.rank <= 0:
      raise ConfigError(f"experts.rank must be > 0, got {self.rank}")
    if self.domains and len(self.domains) != self.num_experts:
      raise ConfigError(f"experts.domains has {len(self.domains)} entries but num_experts is "
                        f"{self.num_experts}; give one domain per expert")
    bad = [t for t in self.targets if t not in TARGETS]
    if bad or not self.targets:
      raise ConfigError(f"experts.targets {list(self.targets)}: valid targets are {list(TARGETS)}")
    if not 0 < self.alpha < float("inf"):
      raise ConfigError(f"experts.alpha must be > 0 (the LoRA scale is alpha / rank), got "
                        f"{self.alpha}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"experts.dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  # per_token: gate from the hidden state entering each layer, at every position.
  # per_sequence: gate from the mean of the prompt's hidden states entering each layer,
  #   computed once (at prefill) and reused for every generated token.
  granularity: Literal["per_token", "per_sequence"] = "per_token"
  scope: Literal["per_layer", "shared"] = "per_layer"  # one router per layer, or one for all
  # linear / mlp: gate logits from the hidden state (or prompt mean) entering each layer.
  # probe (per_sequence only): a factorised gate g_l(x) = s(x) * d_l, s = sigmoid(w . z + b) a
  #   probe on z, the base model's hidden state entering layer probe_layer at the last prompt
  #   token, centred (the training prompts' mean subtracted) and RMS-normalised; d_l a learned
  #   signed direction over experts per layer (init_gates; sum |d_l| <= max_l1 when set). The
  #   magnitude varies per input without touching a bound; ~D + L*E parameters.
  form: Literal["linear", "mlp", "probe"] = "linear"  # lightweight by design
  probe_layer: int = -1  # the probe reads the hidden state entering this layer; -1 = L // 2
  center_rows: int = 512  # training prompts whose mean probe input is the probe's centre
  mlp_hidden: int = 64  # width of the MLP router's hidden layer
  # softmax: convex mix; sigmoid: independent gates; tanh: signed (an expert can be subtracted);
  # linear: unconstrained. Default tanh: the negated-average baseline shows subtraction matters.
  activation: Literal["softmax", "sigmoid", "tanh", "linear"] = "tanh"
  temperature: float = 1.0  # logits are divided by it before the activation
  top_k: int = 0  # 0 = dense; k > 0 keeps the k largest logits per token
  renormalize: bool = True  # after top-k, rescale kept gates to sum |g| of the dense gates' scale
  normalize_input: bool = True  # RMS-normalise the router's input (hidden states grow with depth)
  init_std: float = 0.0  # 0 -> zero-init output (router starts at act(0)); else N(0, std^2)
  # Auxiliary losses, each with a coefficient (0 disables it).
  entropy_coef: float = 0.0  # + coef * mean gate entropy (negative coef rewards spread)
  load_balance_coef: float = 0.0  # Switch-style E * sum_e f_e * P_e
  z_loss_coef: float = 0.0  # mean logsumexp(logits)^2
  # Where phase 2 starts: the gates every input gets before training (through the output bias;
  # the output weights start at 0 unless init_std > 0). () = act(0) (tanh: 0 = the base model);
  # one value for every expert (e.g. -0.125 = the negated mix -1/E of 8 experts) or E values.
  init_gates: tuple[float, ...] = ()
  # Gates constrained like phase 1 saw them: 0 = free; c > 0 rescales a token's gates so that
  # sum_e |g_e| <= c (1 = signed convex mixes; phase 1 trains on gates summing to 1).
  max_l1: float = 0.0
  # Layers whose experts the router drives (0-based); () = every layer. Elsewhere the learned
  # router's gates are 0 (the base model's projection).
  layers: tuple[int, ...] = ()

  def validate(self, num_experts: int = 0, num_layers: int = 0) -> None:
    if self.temperature <= 0:
      raise ConfigError(f"router.temperature must be > 0, got {self.temperature}")
    if self.top_k < 0 or (num_experts and self.top_k > num_experts):
      raise ConfigError(f"router.top_k must be in [0, num_experts={num_experts}], got {self.top_k}")
    if self.form == "mlp" and self.mlp_hidden <= 0:
      raise ConfigError(f"router.mlp_hidden must be > 0, got {self.mlp_hidden}")
    if not 0 <= self.max_l1 < float("inf"):
      raise ConfigError(f"router.max_l1 must be >= 0 (0 = no constraint), got {self.max_l1}")
    if self.init_gates:
      if num_experts and len(self.init_gates) not in (1, num_experts):
        raise ConfigError(f"router.init_gates has {len(self.init_gates)} values; give one (for "
                          f"every expert) or num_experts={num_experts}")
      lo, hi = {"tanh": (-1, 1), "sigmoid": (0, 1), "softmax": (0, 1)}.get(
          "linear" if self.form == "probe" else self.activation, (-float("inf"), float("inf")))
      bad = [g for g in self.init_gates if not lo < g < hi]
      if bad:
        raise ConfigError(f"router.init_gates {bad} cannot come out of a {self.activation} "
                          f"gate (open interval ({lo}, {hi}))")
      if self.activation == "softmax" and num_experts and len(self.init_gates) == num_experts \
          and abs(sum(self.init_gates) - 1) > 1e-6:
        raise ConfigError(f"router.init_gates for softmax gates must sum to 1, got "
                          f"{sum(self.init_gates)}")
      if self.max_l1 and num_experts:
        l1 = (abs(self.init_gates[0]) * num_experts if len(self.init_gates) == 1
              else sum(abs(g) for g in self.init_gates))
        if l1 > self.max_l1 + 1e-6:
          raise ConfigError(f"router.init_gates sum |g| = {l1:g} exceeds router.max_l1="
                            f"{self.max_l1}; the constraint would rescale them")
    if self.form == "probe":
      if self.granularity != "per_sequence":
        raise ConfigError("router.form=probe routes from the prompt: set "
                          "router.granularity=per_sequence")
      aux = [f for f in ("entropy_coef", "load_balance_coef", "z_loss_coef", "top_k")
             if getattr(self, f)]
      if aux:
        raise ConfigError(f"router.{aux[0]} acts on gate logits, which router.form=probe does "
                          f"not have (its gates are s(x) * d); set it to 0")
      if self.center_rows <= 0:
        raise ConfigError(f"router.center_rows must be > 0, got {self.center_rows}")
      if num_layers and not -1 <= self.probe_layer < num_layers:
        raise ConfigError(f"router.probe_layer must be -1 (the middle layer) or in "
                          f"[0, {num_layers}), got {self.probe_layer}")
    if num_layers and any(not 0 <= l < num_layers for l in self.layers):
      raise ConfigError(f"router.layers {list(self.layers)} must lie in [0, {num_layers})")
    if len(set(self.layers)) != len(self.layers):
      raise ConfigError(f"router.layers {list(self.layers)} has duplicates")


ROUTING_MODES = ("learned", "base", "uniform", "negated", "oracle", "fixed")

# Kinds of phase-2 rows (the batch's `kind` [B]): what each row teaches the router.
KIND_TARGET, KIND_HARMFUL, KIND_RETAIN = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """Phase 2's objective over three kinds of rows (the batch's `kind`): targets (the curated
  safe answers: NLL, the paper's objective, always on), harmful answers to the same kind of
  prompts (a contrastive term: push their likelihood down relative to the frozen base model),
  and benign prompts with the base model's own answers (a retain term: KL(base || model)).
  Base and experts stay frozen; only the router is trained by every term."""
  # none | unlikelihood (mean over harmful tokens of -log(1 - p)) | npo (negative preference
  # optimisation, Zhang et al. 2024: (2/beta) softplus(beta * (log p - log p_base)) per answer)
  contrast: Literal["none", "unlikelihood", "npo"] = "none"
  contrast_coef: float = 1.0
  beta: float = 0.1  # NPO's inverse temperature on the sequence log-ratio to the base model
  retain_coef: float = 0.0  # weight of the mean per-token KL(base || model) on benign rows
  # the routing term (an extension of the paper; router.form=probe): binary cross-entropy of the
  # probe's score s(x), 1 on harmful prompts (target and harmful rows), 0 on benign (retain) rows
  route_coef: float = 0.0

  def validate(self) -> None:
    for f in ("contrast_coef", "beta", "retain_coef", "route_coef"):
      if not 0 <= getattr(self, f) < float("inf"):
        raise ConfigError(f"objective.{f} must be >= 0 and finite, got {getattr(self, f)}")
    if self.contrast == "npo" and self.beta <= 0:
      raise ConfigError("objective.beta must be > 0 for contrast=npo")

  @property
  def needs_base(self) -> bool:
    """The step also runs the frozen base model (NPO's reference, the retain term's KL)."""
    return self.contrast == "npo" or self.retain_coef > 0

  @property
  def plain(self) -> bool:
    return self.contrast == "none" and self.retain_coef == 0 and self.route_coef == 0


# --------------------------------------------------------------------------------------------
# Generic dataclass <-> dict / YAML / overrides.
# --------------------------------------------------------------------------------------------


def _check_type(path: str, tp: Any, value: Any) -> Any:
  """Coerce `value` to type `tp` where that is lossless; raise ConfigError otherwise."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is Any:
    return value
  if origin is Literal:
    if value not in args:
      raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    errors = []
    for a in args:
      if a is type(None):
        continue
      try:
        return _check_type(path, a, value)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(f"{path}: {value!r} matches none of {args}: {errors}")
  if origin is tuple:
    if isinstance(value, str):
      value = [v for v in value.split(",") if v] if value else []
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
    if args and args[-1] is not Ellipsis:  # fixed-length tuple[A, B, ...]: one type per slot
      if len(value) != len(args):
        raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}: {value!r}")
      return tuple(_check_type(f"{path}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value)))
    inner = args[0] if args else Any
    return tuple(_check_type(f"{path}[{i}]", inner, v) for i, v in enumerate(value))
  if origin is dict or tp in (dict, FrozenDict):
    if not isinstance(value, dict):
      raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
    return freeze(value)  # configs are hashed: a mapping is a FrozenDict
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
    return from_dict(tp, value, path)
  if tp is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
      return value.lower() in ("true", "1", "yes")
    raise ConfigError(f"{path}: expected true/false, got {value!r}")
  if tp is int:
    if isinstance(value, bool):
      raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if isinstance(value, int):
      return value
    if isinstance(value, str):
      try:
        return int(value)
      except ValueError:
        pass
    if isinstance(value, float) and value.is_integer():
      return int(value)
    raise ConfigError(f"{path}: expected an integer, got {value!r}")
  if tp is float:
    if isinstance(value, bool):
      raise ConfigError(f"{path}: expected a number, got {value!r}")
    if isinstance(value, (int, float)):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value)
      except ValueError:
        pass
    raise ConfigError(f"{path}: expected a number, got {value!r}")
  if tp is str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
      return str(value)
    raise ConfigError(f"{path}: expected a string, got {value!r}")
  return value


def _field_default(f: dataclasses.Field) -> Any:
  if f.default is not dataclasses.MISSING:
    return f.default
  if f.default_factory is not dataclasses.MISSING:
    return f.default_factory()
  return dataclasses.MISSING


def from_dict(cls, d: dict, path: str = "", base: Any = None) -> Any:
  """Build dataclass `cls` from a (possibly partial) dict; unknown keys are errors.

  A field left out keeps its default, and a partial nested section is merged over that section's
  default *instance* (the parent's field default, or `base`'s value): `phase1.steps=200` keeps the
  embedded default's `phase1.lr`, not PhaseConfig's class default."""
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = [k for k in d if k not in fields]
  if unknown:
    where = path or cls.__name__
    raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(fields)}")
  kwargs = {}
  for k, v in d.items():
    tp, where = hints[k], f"{path}.{k}" if path else k
    default = getattr(base, k) if base is not None else _field_default(fields[k])
    if dataclasses.is_dataclass(tp) and isinstance(v, dict) and isinstance(default, tp):
      kwargs[k] = from_dict(tp, v, where, base=default)
    else:
      kwargs[k] = _check_type(where, tp, v)
  return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def same_setting(a: Any, b: Any) -> bool:
  """Equal where both sides have the setting: keys of a mapping on one side only (a field added
  to a source's schema since a run started, e.g. `revision`) are not compared, at any depth."""
  if isinstance(a, dict) and isinstance(b, dict):
    return all(same_setting(a[k], b[k]) for k in a.keys() & b.keys())
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(same_setting(x, y) for x, y in zip(a, b))
  return a == b


def to_dict(obj: Any) -> Any:
  if dataclasses.is_dataclass(obj):
    return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, tuple):
    return [to_dict(v) for v in obj]
  if isinstance(obj, dict):
    return {k: to_dict(v) for k, v in obj.items()}
  return obj


def apply_overrides(d: dict, overrides: list[str]) -> dict:
  """Apply `a.b.c=value` overrides (YAML-parsed values) to a nested dict, in place."""
  for ov in overrides:
    if "=" not in ov:
      raise ConfigError(f"override {ov!r} must look like key.sub=value")
    key, raw = ov.split("=", 1)
    try:
      value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
      raise ConfigError(f"override {ov!r}: the value is not valid YAML "
                        f"({_yaml_problem(e)}); quote it, e.g. {key}='\"...\"'") from None
    parts = key.strip().split(".")
    node = d
    for p in parts[:-1]:
      node = node.setdefault(p, {})
      if not isinstance(node, dict):
        raise ConfigError(f"override {ov!r}: {p} is not a section")
    node[parts[-1]] = value
  return d


def _yaml_problem(e: yaml.YAMLError) -> str:
  mark = getattr(e, "problem_mark", None)
  where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
  return f"{getattr(e, 'problem', None) or e}{where}"


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist" + (
        f" (named as base by {_chain[-1]})" if _chain else ""))
  if path.resolve() in _chain:
    raise ConfigError(f"config files inherit from each other in a cycle: "
                      f"{' -> '.join(str(p) for p in (*_chain, path.resolve()))}; remove one "
                      f"of the `base:` lines")
  try:
    with open(path, encoding="utf-8") as f:
      d = yaml.safe_load(f) or {}
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    problem = _yaml_problem(e) if isinstance(e, yaml.YAMLError) else "not UTF-8 text"
    raise ConfigError(f"config file {path} is not valid YAML: {problem}") from None
  if not isinstance(d, dict):
    raise ConfigError(f"config file {path} must hold a mapping at the top level")
  base = d.pop("base", None)  # `base: other.yaml` inherits from another file
  if base:
    parent = load_yaml(path.parent / str(base), (*_chain, path.resolve()))
    d = _merge(parent, d)
  return d


def _merge(a: dict, b: dict) -> dict:
  out = dict(a)
  for k, v in b.items():
    out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
  return out

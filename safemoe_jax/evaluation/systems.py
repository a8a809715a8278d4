"""The systems compared: each is a model, a routing and the fingerprint of the weights behind it
(base, SafeMoE, the fixed-gate baselines, the oracle and the single-LoRA baselines)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from safemoe_jax.evaluation.benchmarks import _key
from safemoe_jax.evaluation.config import EvalError
from safemoe_jax.io.assets import sha256_file
from safemoe_jax.train.rundir import RunDir


@dataclasses.dataclass
class System:
  name: str
  model: Any  # SafeMoELM
  routing: str
  fingerprint: str  # of the weights that define it (base + artifacts)
  fixed_weights: np.ndarray | None = None
  oracle: bool = False  # needs each prompt's expert domains; prompts without one are skipped
  record_gates: bool = False  # keep per-token routing weights (learned router)


def file_fingerprint(*paths: Path) -> str:
  return _key(*[(Path(p).name, sha256_file(p) if Path(p).exists() else "missing")
                for p in paths])


def make_systems(names: Sequence[str], model, out: Path, base_fp: str,
                 extra_models: dict | None = None) -> list[System]:
  """Systems over the SafeMoE model (and the single-LoRA models in extra_models)."""
  E = model.num_experts
  rd = RunDir(out)
  experts_fp = file_fingerprint(rd.experts)
  systems = []
  for n in names:
    if n == "base":
      systems.append(System(n, model, "base", _key(base_fp)))
    elif n == "safemoe":
      systems.append(System(n, model, "learned", _key(base_fp, experts_fp, file_fingerprint(
          rd.router)), record_gates=True))
    elif n in ("uniform", "negated"):
      w = np.full((E,), (1.0 if n == "uniform" else -1.0) / E, np.float32)
      systems.append(System(n, model, "fixed", _key(base_fp, experts_fp, n), w))
    elif n == "oracle":
      systems.append(System(n, model, "oracle", _key(base_fp, experts_fp, n), oracle=True))
    else:  # single-LoRA baselines: an E=1 model at gate 1.0
      m = (extra_models or {}).get(n)
      if m is None:
        raise EvalError(f"system {n!r} needs its model (train_single_lora)")
      systems.append(System(n, m, "fixed", _key(base_fp, file_fingerprint(rd.single_lora(n))),
                            np.ones((1,), np.float32)))
  return systems

"""FLOP accounting for MFU: the frozen base's model FLOPs per token (4N for a forward and a
backward to the inputs, plus attention), the LoRA experts' extra, and the chips' peak rates."""

from __future__ import annotations

from typing import Sequence

import jax

from safemoe_jax.core import experts as ex
from safemoe_jax.core.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """N: weights that multiply every token (projections, MLP, LM head; not the embedding lookup)."""
  D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return L * (D * q + 2 * D * kv + q * D + 3 * D * F) + D * cfg.vocab_size


def attention_flops(cfg: ModelConfig, seq: int) -> int:
  """Forward attention FLOPs per token: q k^T and a v over all `seq` keys (computed in full)."""
  return cfg.num_layers * 4 * seq * cfg.num_heads * cfg.head_dim


def lora_flops(cfg: ModelConfig, experts: int, rank: int, targets: Sequence[str]) -> int:
  """Forward FLOPs per token of the experts' A and B products over the E*r concatenated ranks."""
  dims = ex.target_dims(cfg)
  return cfg.num_layers * sum(2 * experts * rank * (dims[t][0] + dims[t][1]) for t in targets)


def train_flops_per_token(cfg: ModelConfig, seq: int, kind: str, experts: int = 0, rank: int = 0,
                          targets: Sequence[str] = ("q", "k", "v"),
                          base_forward: bool = False) -> dict[str, int]:
  """Model FLOPs per trained token of one step, without rematerialisation.

  base: a frozen matmul costs 2N forward + 2N for the gradient to its input (no weight gradient)
  = 4N; attention has no weights but sends gradients to both operands: 3x its forward.
  Adapters: forward, input gradient, and (when trained) weight gradient, each = the forward.
  Router (per-layer linear, phase 2): 2*D*E forward, the same again for input and weight grads.
  kind: 'base', 'lora' / 'phase1' (adapters trained), 'phase2' (router trained).
  base_forward: phase 2's objective also runs the frozen base model forward (NPO's reference
  log-probabilities, the retain term's KL): 2N + attention more.
  """
  base = 4 * matmul_params(cfg) + 3 * attention_flops(cfg, seq)
  if base_forward:
    base += 2 * matmul_params(cfg) + attention_flops(cfg, seq)
  fwd = lora_flops(cfg, experts, rank, targets) if kind != "base" else 0
  adapter = {"base": 0, "lora": 3 * fwd, "phase1": 3 * fwd, "phase2": 2 * fwd}[kind]
  router = 3 * cfg.num_layers * 2 * cfg.hidden_size * experts if kind == "phase2" else 0
  return {"base": base, "adapter": adapter, "router": router, "total": base + adapter + router}


# Peak dense bf16 FLOP/s and HBM per chip (public spec sheets).
CHIPS = {
    "v5e": {"kind": "TPU v5 lite", "peak_flops": 197e12, "hbm_bytes": 16 * 2**30},
    "v5p": {"kind": "TPU v5", "peak_flops": 459e12, "hbm_bytes": 95 * 2**30},
    "v6e": {"kind": "TPU v6 lite", "peak_flops": 918e12, "hbm_bytes": 32 * 2**30},
    "v4": {"kind": "TPU v4", "peak_flops": 275e12, "hbm_bytes": 32 * 2**30},
}


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
                 "T4": 65e12}


def device_peak_flops() -> tuple[float | None, str]:
  """(peak FLOP/s, source) of jax.devices()[0] when it is a known accelerator."""
  d = jax.devices()[0]
  kind = getattr(d, "device_kind", "")
  for chip in CHIPS.values():
    if kind == chip["kind"]:
      return chip["peak_flops"], f"{kind} spec sheet (bf16)"
  for name, peak in GPU_PEAK_BF16.items():
    if name in kind:
      return peak, f"{kind} spec sheet (bf16 dense)"
  return None, "measured matmul"

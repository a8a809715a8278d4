"""A slow, independent NumPy reference of the SafeMoE forward pass, for tests only.

Python loops over layers and over experts, one expert's B_e A_e x at a time, float64; written
from the equations, sharing no code with safemoe_jax.model / experts.
"""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, pos, inv):  # x [B, T, H, Dh]
  ang = pos[..., None] * inv  # [B, T, Dh/2]
  c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  x1, x2 = np.split(x, 2, -1)
  return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _act(z, act):
  if act == "softmax":
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  if act == "sigmoid":
    return 1 / (1 + np.exp(-z))
  if act == "tanh":
    return np.tanh(z)
  return z


def ref_gates(rp: dict, h, rcfg) -> np.ndarray:
  """h [..., D] -> gates [..., E], one token at a time semantics (vectorised over tokens)."""
  x = h
  if rcfg.normalize_input:
    x = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)
  if rcfg.form == "mlp":
    u = x @ rp["w_in"] + rp["b_in"]
    x = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))  # jax gelu approx
  z = (x @ rp["w_out"] + rp["b_out"]) / rcfg.temperature
  g = _act(z, rcfg.activation)
  k = rcfg.top_k
  if k and k < z.shape[-1]:
    out = np.zeros_like(g)
    for idx in np.ndindex(z.shape[:-1]):
      score = z[idx] if rcfg.activation in ("softmax", "sigmoid") else np.abs(z[idx])
      keep = np.argsort(-score, kind="stable")[:k]
      if rcfg.activation == "softmax":
        out[idx][keep] = _act(z[idx][keep], "softmax")
      else:
        out[idx][keep] = g[idx][keep]
        if rcfg.renormalize:
          out[idx] *= np.abs(g[idx]).sum() / max(np.abs(out[idx]).sum(), 1e-9)
    g = out
  if getattr(rcfg, "max_l1", 0):
    for idx in np.ndindex(g.shape[:-1]):  # one token at a time: shrink onto the L1 ball
      l1 = np.abs(g[idx]).sum()
      if l1 > rcfg.max_l1:
        g[idx] = g[idx] * (rcfg.max_l1 / l1)
  return g


def ref_forward(cfg, base: dict, experts: dict | None, router: dict | None, ecfg, rcfg,
                ids, mask, *, prompt_mask=None, const_gates=None):
  """Logits [B, T, V] in float64. experts: {'A_q': [L, E, I, R], ...}; router: arrays."""
  f = lambda a: np.asarray(a, np.float64)
  B, T = ids.shape
  L, Hq, K, Dh = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  hd = np.arange(0, Dh, 2) / Dh
  inv = 1.0 / cfg.rope_theta ** hd
  pos = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.float64)
  h = f(base["embed"])[ids]
  scale = ecfg.alpha / ecfg.rank if experts else 0.0
  for l in range(L):
    p = {k.split(".", 1)[1]: f(v[l]) for k, v in base.items() if k.startswith("layers.")}
    if experts is not None:
      if const_gates is not None:
        g = np.broadcast_to(const_gates, (B, T, const_gates.shape[-1]))
      else:
        rp = {k: f(v[l] if rcfg.scope == "per_layer" else v) for k, v in router.items()}
        if rcfg.granularity == "per_sequence":
          pm = prompt_mask[..., None].astype(np.float64)
          summ = (h * pm).sum(1, keepdims=True) / np.maximum(pm.sum(1, keepdims=True), 1)
          g = np.broadcast_to(ref_gates(rp, summ, rcfg), (B, T, router["b_out"].shape[-1]))
        else:
          g = ref_gates(rp, h, rcfg)
        if getattr(rcfg, "layers", ()) and l not in rcfg.layers:
          g = np.zeros_like(g)  # the router drives only the listed layers

    def proj(name, x):
      y = x @ p[name]
      if name + "_bias" in p:
        y = y + p[name + "_bias"]
      if experts is not None and f"A_{name}" in experts:
        A, Bm = f(experts[f"A_{name}"][l]), f(experts[f"B_{name}"][l])
        for e in range(A.shape[0]):  # one expert at a time
          y = y + scale * g[..., e:e + 1] * ((x @ A[e]) @ Bm[e])
      return y

    x = _rms(h, p["attn_norm"], cfg.rms_norm_eps)
    q = _rope(proj("q", x).reshape(B, T, Hq, Dh), pos, inv)
    k = _rope(proj("k", x).reshape(B, T, K, Dh), pos, inv)
    v = proj("v", x).reshape(B, T, K, Dh)
    o = np.zeros((B, T, Hq, Dh))
    for b in range(B):
      for hh in range(Hq):
        kv = hh // (Hq // K)
        s = q[b, :, hh] @ k[b, :, kv].T / np.sqrt(Dh)
        allowed = np.tril(np.ones((T, T), bool)) & (mask[b][None, :] > 0)
        s = np.where(allowed, s, -np.inf)
        s = s - np.max(np.where(allowed, s, -1e300), -1, keepdims=True)
        a = np.where(allowed, np.exp(s), 0)
        a = a / np.maximum(a.sum(-1, keepdims=True), 1e-300)
        o[b, :, hh] = a @ v[b, :, kv]
    h = h + proj("o", o.reshape(B, T, Hq * Dh))
    x = _rms(h, p["mlp_norm"], cfg.rms_norm_eps)
    gt = proj("gate", x)
    h = h + proj("down", gt / (1 + np.exp(-gt)) * proj("up", x))
  h = _rms(h, f(base["final_norm"]), cfg.rms_norm_eps)
  w = f(base["embed"]).T if cfg.tie_embeddings else f(base["lm_head"])
  return h @ w

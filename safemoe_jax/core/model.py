"""Llama-family decoder in Flax NNX with the SafeMoE layer on its projections.

Covers Llama 2/3.x (incl. Llama-3.1 RoPE scaling), Mistral, Qwen2/2.5 (qkv bias) and SmolLM2
(tied embeddings): RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU. The L layers are
stacked on a leading axis and run with `jax.lax.scan` (optionally rematerialised); a KV cache
makes decoding one token per step. The model is used functionally: `nnx.split` it into the
frozen base (`nnx.Param`), the experts (`ExpertParam`) and the router (`RouterParam`).

Names: B batch, T query tokens, S key slots, D width, H/K query/key-value heads, G = H/K,
Dh head dim, F MLP width, V vocab, L layers, E experts.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safemoe_jax.core import experts as ex
from safemoe_jax.core.config import ROUTING_MODES, ExpertsConfig, ModelConfig, RouterConfig
from safemoe_jax.core.sharding import constrain

NEG_INF = -1e30  # finite, so fully padded query rows give finite (ignored) outputs


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [Dh/2], with Llama-3.1 or linear scaling if configured."""
  hd = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
  rs = cfg.rope_scaling
  if not rs:
    return inv.astype(np.float32)
  kind = rs.get("rope_type", rs.get("type", "default"))
  if kind == "default":
    return inv.astype(np.float32)
  if kind == "linear":
    return (inv / rs["factor"]).astype(np.float32)
  if kind != "llama3":
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, "
                     f"llama3)")
  factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
  old_ctx = rs["original_max_position_embeddings"]
  wavelen = 2 * np.pi / inv
  scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
  smooth = (old_ctx / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BTHD: jax.Array, pos_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  ang_BTF = pos_BT[..., None].astype(jnp.float32) * inv_freq  # F = Dh/2
  cos = jnp.cos(ang_BTF)[:, :, None, :]
  sin = jnp.sin(ang_BTF)[:, :, None, :]
  x = x_BTHD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHD.dtype)


# Logical axes of the base parameters (mapped to mesh axes by the rules in sharding.py).
def base_axes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
  axes = {
      "embed": ("vocab", "embed"),
      "layers.attn_norm": ("layers", "norm"),
      "layers.q": ("layers", "embed", "q_heads"),
      "layers.k": ("layers", "embed", "kv_heads"),
      "layers.v": ("layers", "embed", "kv_heads"),
      "layers.o": ("layers", "q_heads", "embed"),
      "layers.mlp_norm": ("layers", "norm"),
      "layers.gate": ("layers", "embed", "mlp"),
      "layers.up": ("layers", "embed", "mlp"),
      "layers.down": ("layers", "mlp", "embed"),
      "final_norm": ("norm",),
  }
  if cfg.qkv_bias:
    axes |= {"layers.q_bias": ("layers", "q_heads"), "layers.k_bias": ("layers", "kv_heads"),
             "layers.v_bias": ("layers", "kv_heads")}
  if not cfg.tie_embeddings:
    axes["lm_head"] = ("embed", "vocab")
  return axes


def base_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  shapes = {
      "embed": (V, D), "layers.attn_norm": (L, D), "layers.q": (L, D, q), "layers.k": (L, D, kv),
      "layers.v": (L, D, kv), "layers.o": (L, q, D), "layers.mlp_norm": (L, D),
      "layers.gate": (L, D, F), "layers.up": (L, D, F), "layers.down": (L, F, D),
      "final_norm": (D,), "layers.q_bias": (L, q), "layers.k_bias": (L, kv),
      "layers.v_bias": (L, kv), "lm_head": (D, V)}
  return {k: shapes[k] for k in base_axes(cfg)}


class LayerCtx(NamedTuple):
  """What every layer of one forward pass shares; the scanned layer step closes over it."""
  cfg: ModelConfig
  ecfg: ExpertsConfig
  rcfg: RouterConfig
  cdt: Any  # compute dtype
  pos_BT: jax.Array  # RoPE positions (real tokens only)
  inv_freq: jax.Array  # [Dh/2]
  attn_mask_BTS: jax.Array  # causal and key-valid, over the cache's S slots when decoding
  start: Any  # the cache slot this pass writes from (0 without a cache)
  use_experts: bool
  scale: float  # alpha / r
  probe_s: jax.Array | None = None  # [B] the probe's score s(x) (router.form=probe)


def layer_gates(h_BTD: jax.Array, x: dict[str, Any], ctx: LayerCtx, const_g: jax.Array | None,
                shared_router: dict | None, prompt_mask: jax.Array | None, routing: str,
                gate_spec: ex.GateSpec | None) -> tuple[jax.Array, jax.Array | None]:
  """One layer's gates g [B, T or 1, E] (and the router's logits when it ran): a fixed mode's
  constant gates, the prompt's cached gates, or the router on the hidden state entering the
  layer (per token) or on the prompt's mean (per sequence)."""
  if const_g is not None:
    return const_g, None
  if "cached_gates" in x:
    return x["cached_gates"], None
  rp = x.get("router", shared_router)
  if ctx.rcfg.form == "probe":  # g = s(x) * d_l: no logits
    g_BTE = ex.probe_gates(ctx.probe_s, rp["direction"], ctx.rcfg)
    if "router_on" in x:
      g_BTE = jnp.where(x["router_on"], g_BTE, 0.0)
    if routing == "mixed":
      g_BTE = ex.mix_gates(g_BTE, gate_spec)
    return g_BTE, None
  if ctx.rcfg.granularity == "per_sequence":
    pm = prompt_mask.astype(jnp.float32)[..., None]
    summary = jnp.sum(h_BTD.astype(jnp.float32) * pm, 1, keepdims=True) / jnp.maximum(
        jnp.sum(pm, 1, keepdims=True), 1.0)  # [B, 1, D]
    logits_BTE = ex.router_logits(rp, summary, ctx.rcfg)
  else:
    logits_BTE = ex.router_logits(rp, h_BTD, ctx.rcfg)
  g_BTE = ex.gates_from_logits(logits_BTE, ctx.rcfg)
  if "router_on" in x:  # router.layers: the router drives only these layers' experts
    g_BTE = jnp.where(x["router_on"], g_BTE, 0.0)
  if routing == "mixed":  # per-sequence: the mix is cached with the prompt's gates
    g_BTE = ex.mix_gates(g_BTE, gate_spec)
  return g_BTE, logits_BTE


def projection(name: str, inp: jax.Array, j: int, x: dict[str, Any], g_BTE: jax.Array | None,
               ctx: LayerCtx) -> jax.Array:
  """y = inp W (+ bias) (+ s * sum_e g_e B_e A_e inp when `name` is an expert target)."""
  p, cdt = x["layer"], ctx.cdt
  y = inp @ p[name].astype(cdt)
  if f"{name}_bias" in p:
    y = y + p[f"{name}_bias"].astype(cdt)
  if ctx.use_experts and f"A_{name}" in x["experts"]:
    xin = inp
    if "drop_key" in x:
      keep = 1.0 - ctx.ecfg.dropout
      m = jax.random.bernoulli(jax.random.fold_in(x["drop_key"], j), keep, inp.shape)
      xin = jnp.where(m, inp / keep, 0).astype(inp.dtype)
    y = y + ex.lora_delta(xin, x["experts"][f"A_{name}"], x["experts"][f"B_{name}"],
                          g_BTE, ctx.scale).astype(cdt)
  return y


def decoder_layer(h_BTD: jax.Array, ck: jax.Array | None, cv: jax.Array | None,
                  x: dict[str, Any], g_BTE: jax.Array | None, ctx: LayerCtx
                  ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """One pre-norm layer, a pure function of its weights `x` (this layer's slice of the stacked
  base weights, experts and router): attention with RoPE and GQA (reading and writing the KV
  cache ck, cv [L, B, S, K, Dh] when given), then the SwiGLU MLP. -> (h, ck, cv)."""
  cfg, cdt = ctx.cfg, ctx.cdt
  B, T, _ = h_BTD.shape
  p = x["layer"]
  proj = lambda name, inp, j: projection(name, inp, j, x, g_BTE, ctx)  # noqa: E731
  # --- attention -------------------------------------------------------------------------
  xn = rms_norm(h_BTD, p["attn_norm"], cfg.rms_norm_eps)
  Hq, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q = apply_rope(proj("q", xn, 0).reshape(B, T, Hq, Dh), ctx.pos_BT, ctx.inv_freq)
  k = apply_rope(proj("k", xn, 1).reshape(B, T, K, Dh), ctx.pos_BT, ctx.inv_freq)
  v = proj("v", xn, 2).reshape(B, T, K, Dh)
  if ck is not None:  # write this layer's new keys/values into the cache, read all slots
    i = x["idx"]
    ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (i, 0, ctx.start, 0, 0))
    cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (i, 0, ctx.start, 0, 0))
    k, v = ck[i].astype(cdt), cv[i].astype(cdt)
  q = q.reshape(B, T, K, Hq // K, Dh)
  s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  s = jnp.where(ctx.attn_mask_BTS[:, None, None], s / np.sqrt(Dh), NEG_INF)
  a = jax.nn.softmax(s, axis=-1).astype(cdt)
  o = jnp.einsum("bkgts,bskd->btkgd", a, v).reshape(B, T, Hq * Dh)
  h_BTD = h_BTD + proj("o", o, 3)
  # --- SwiGLU MLP ------------------------------------------------------------------------
  xn = rms_norm(h_BTD, p["mlp_norm"], cfg.rms_norm_eps)
  u = jax.nn.silu(proj("gate", xn, 4)) * proj("up", xn, 5)
  return h_BTD + proj("down", u, 6), ck, cv


class Layers(nnx.Module):
  """The L decoder layers' weights, each stacked on a leading layer axis."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dt = jnp.dtype(cfg.param_dtype)
    for key, shape in base_shapes(cfg).items():
      if not key.startswith("layers."):
        continue
      name = key.split(".", 1)[1]
      if name.endswith("norm"):
        val = jnp.ones(shape, dt)
      elif name.endswith("bias"):
        val = jnp.zeros(shape, dt)
      else:
        val = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dt)
      setattr(self, name, nnx.Param(val, axes=base_axes(cfg)[key]))

  def arrays(self) -> dict[str, jax.Array]:
    return {k: v[...] for k, v in vars(self).items() if isinstance(v, nnx.Variable)}


class SafeMoELM(nnx.Module):
  """Causal LM; with `experts.num_experts > 0` every layer carries the SafeMoE experts + router."""

  def __init__(self, cfg: ModelConfig, ecfg: ExpertsConfig | None = None,
               rcfg: RouterConfig | None = None, *, rngs: nnx.Rngs):
    cfg.validate()
    ecfg = ecfg or ExpertsConfig()
    rcfg = rcfg or RouterConfig()
    ecfg.validate()
    rcfg.validate(ecfg.num_experts, cfg.num_layers)
    self.cfg, self.ecfg, self.rcfg = cfg, ecfg, rcfg
    dt = jnp.dtype(cfg.param_dtype)
    axes = base_axes(cfg)
    V, D = cfg.vocab_size, cfg.hidden_size
    self.embed = nnx.Param((0.02 * jax.random.normal(rngs.params(), (V, D))).astype(dt),
                           axes=axes["embed"])
    self.layers = Layers(cfg, rngs=rngs)
    self.final_norm = nnx.Param(jnp.ones((D,), dt), axes=axes["final_norm"])
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param((0.02 * jax.random.normal(rngs.params(), (D, V))).astype(dt),
                               axes=axes["lm_head"])
    self.num_experts = ecfg.num_experts
    if self.num_experts:
      self.experts = ex.Experts(cfg, ecfg, rngs=rngs)
      self.router = ex.Router(cfg, rcfg, ecfg.num_experts, rngs=rngs)

  # ---------------------------------------------------------------------------------------
  def load_base(self, params: dict[str, Any]) -> None:
    """Set the frozen base weights from a flat dict in our layout (see weights.py)."""
    want = base_shapes(self.cfg)
    missing = sorted(set(want) - set(params))
    extra = sorted(set(params) - set(want))
    if missing or extra:
      raise ValueError(f"checkpoint does not match the model config: missing tensors {missing}, "
                       f"unexpected tensors {extra}")
    dt = jnp.dtype(self.cfg.param_dtype)
    for key, shape in want.items():
      val = params[key]
      if tuple(val.shape) != shape:
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(val.shape)} but the model "
                         f"config expects {shape}")
      var = self._base_var(key)
      var[...] = jnp.asarray(val, dt)

  def _base_var(self, key: str) -> nnx.Variable:
    obj = self
    for part in key.split("."):
      obj = getattr(obj, part)
    return obj

  def init_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    """Empty KV cache: k, v [L, B, S, K, Dh]; key-slot validity [B, S]; next write slot."""
    c = self.cfg
    if max_len > c.max_position_embeddings:
      raise ValueError(f"cache length {max_len} exceeds the model's context of "
                       f"{c.max_position_embeddings} tokens")
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    cdt = jnp.dtype(c.compute_dtype)
    cache = {"k": jnp.zeros(shape, cdt), "v": jnp.zeros(shape, cdt),
             "mask": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}
    if self.num_experts and self.rcfg.granularity == "per_sequence":
      cache["gates"] = jnp.zeros((c.num_layers, batch, 1, self.num_experts), jnp.float32)
    return cache

  # ---------------------------------------------------------------------------------------
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               routing: str = "learned", domains: jax.Array | None = None,
               fixed_weights: jax.Array | None = None, prompt_mask: jax.Array | None = None,
               stats_mask: jax.Array | None = None, cache: dict | None = None,
               dropout_rng: jax.Array | None = None, return_gates: bool = False,
               last_only: bool = False, return_hidden: bool = False,
               gate_spec: ex.GateSpec | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Logits [B, T, V] (float32) and an aux dict.

    input_ids, attention_mask: [B, T] (1 = real token; left or right padding).
    routing: one of ROUTING_MODES, or 'mixed': every row its own gates, from gate_spec (the
      learned router on some rows, fixed vectors on the others: systems mixed in one batch).
      domains: [B, E] multi-hot for 'oracle'. fixed_weights: [E].
    prompt_mask: [B, T] prompt tokens, for per-sequence routing (and its summary at prefill).
    stats_mask: [B, T] tokens over which routing statistics and aux losses are taken
      (response tokens in training; defaults to attention_mask).
    cache: from init_cache; the tokens are written at cache['index'] and aux['cache'] returned.
    dropout_rng: enables LoRA dropout (training). last_only: logits of the last position only.
    aux: 'routing' (per-layer weight [L, E], top1_share [L, E], entropy [L]), 'aux_loss',
      'gates' [L, B, T, E] if return_gates, 'cache' if cache was given, 'hidden' [L, B, T, D]
      (the residual stream after each layer, before the final norm) if return_hidden.
    """
    cfg, E = self.cfg, self.num_experts
    if routing not in ROUTING_MODES + ("mixed",):
      raise ValueError(f"routing must be one of {ROUTING_MODES + ('mixed',)}, got {routing!r}")
    B, T = input_ids.shape
    if routing == "mixed" and (gate_spec is None or gate_spec.router_B.shape != (B,)
                               or gate_spec.fixed_BE.shape != (B, E)):
      raise ValueError(f"routing='mixed' needs gate_spec with router_B [{B}] and fixed_BE "
                       f"[{B}, {E}], got "
                       f"{None if gate_spec is None else jax.tree.map(jnp.shape, gate_spec)}")
    if cache is None and T > cfg.max_position_embeddings:
      raise ValueError(f"sequence of {T} tokens is longer than the model's context of "
                       f"{cfg.max_position_embeddings}; truncate it (data.max_length)")
    use_experts = E > 0 and routing != "base"
    cdt = jnp.dtype(cfg.compute_dtype)
    mask_BT = (jnp.ones((B, T), jnp.int32) if attention_mask is None
               else attention_mask.astype(jnp.int32))
    stats_BT = mask_BT if stats_mask is None else stats_mask.astype(jnp.int32)

    # Positions count real tokens only, so left padding does not shift RoPE.
    past_B = jnp.zeros((B,), jnp.int32) if cache is None else jnp.sum(cache["mask"], -1)
    pos_BT = jnp.maximum(past_B[:, None] + jnp.cumsum(mask_BT, -1) - 1, 0)
    if cache is None:
      key_valid_BS = mask_BT
      causal_TS = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
      start = 0
    else:
      start = cache["index"]
      S = cache["mask"].shape[1]
      key_valid_BS = jax.lax.dynamic_update_slice(cache["mask"], mask_BT, (0, start))
      causal_TS = (start + jnp.arange(T))[:, None] >= jnp.arange(S)[None, :]
    attn_mask_BTS = causal_TS[None] & (key_valid_BS[:, None, :] > 0)

    w_VD = constrain(self.embed[...], ("vocab", None))  # FSDP-gather D first: no [B,T,D] replica
    h_BTD = constrain(w_VD.astype(cdt)[input_ids], ("batch", "seq", "embed"))
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    per_seq = use_experts and self.rcfg.granularity == "per_sequence"

    # Gates of the non-learned modes are the same for every layer and token.
    routed = routing in ("learned", "mixed")  # the router runs (on every row when mixed)
    const_g = None
    if use_experts and not routed:
      const_g = ex.fixed_gates(routing, E, domains_BE=domains, weights_E=fixed_weights, batch=B)

    xs: dict[str, Any] = {"layer": self.layers.arrays(), "idx": jnp.arange(cfg.num_layers)}
    shared_router = None
    if use_experts:
      xs["experts"] = self.experts.layer_arrays()
      if routed:
        if self.rcfg.scope == "per_layer":
          xs["router"] = self.router.arrays()
        else:
          shared_router = self.router.arrays()
        if self.rcfg.layers:
          xs["router_on"] = jnp.zeros((cfg.num_layers,), bool).at[
              jnp.asarray(self.rcfg.layers)].set(True)
      if dropout_rng is not None and self.ecfg.dropout > 0:
        xs["drop_key"] = jax.random.split(dropout_rng, cfg.num_layers)
      if per_seq and routed and prompt_mask is None:
        if cache is None or "gates" not in cache:
          raise ValueError("per-sequence routing needs prompt_mask (or a cache holding the "
                           "prompt's gates from prefill)")
        xs["cached_gates"] = cache["gates"]

    ctx = LayerCtx(cfg, self.ecfg, self.rcfg, cdt, pos_BT, inv_freq, attn_mask_BTS, start,
                   use_experts, self.ecfg.alpha / self.ecfg.rank if E else 0.0)
    probe_s = None
    if use_experts and routed and self.rcfg.form == "probe" and "cached_gates" not in xs:
      z_BD = self._probe_input(h_BTD, xs, ctx, mask_BT, prompt_mask)
      probe_s = ex.probe_score(self.router.probe_arrays(), z_BD, self.rcfg)
      ctx = ctx._replace(probe_s=probe_s)

    def layer(carry, x):
      h, ck, cv = carry
      g_BTE = logits_BTE = None
      if use_experts:
        g_BTE, logits_BTE = layer_gates(h, x, ctx, const_g, shared_router, prompt_mask,
                                        routing, gate_spec)
      h, ck, cv = decoder_layer(h, ck, cv, x, g_BTE, ctx)
      ys = {}
      if return_hidden:
        ys["hidden"] = h
      if use_experts:
        ys["routing"] = ex.routing_stats(logits_BTE, g_BTE, stats_BT,
                                         self.rcfg if logits_BTE is not None else None)
        if return_gates:
          ys["gates"] = jnp.broadcast_to(g_BTE, (B, T, E))
        if per_seq and routed and "cached_gates" not in xs:  # the prompt's gates, for decoding
          ys["seq_gates"] = g_BTE
      return (constrain(h, ("batch", "seq", "embed")), ck, cv), ys

    body = jax.checkpoint(layer, prevent_cse=False) if cfg.remat else layer
    carry0 = (h_BTD, None if cache is None else cache["k"], None if cache is None else cache["v"])
    (h_BTD, ck, cv), ys = jax.lax.scan(body, carry0, xs)

    h_BTD = rms_norm(h_BTD, self.final_norm[...], cfg.rms_norm_eps)
    if last_only:
      h_BTD = h_BTD[:, -1:]
    w_DV = (self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]).astype(cdt)
    logits = constrain(jnp.einsum("btd,dv->btv", h_BTD, w_DV, preferred_element_type=jnp.float32),
                       ("batch", "seq", "vocab"))

    aux: dict[str, Any] = {"aux_loss": jnp.zeros((), jnp.float32)}
    if use_experts:
      stats = ex.summarize_routing(ys["routing"])
      aux["aux_loss"] = stats.pop("aux_loss")
      aux["routing"] = stats
      if return_gates:
        aux["gates"] = ys["gates"]
    if return_hidden:
      aux["hidden"] = ys["hidden"]
    if probe_s is not None:
      aux["probe_score"], aux["probe_input"] = probe_s, z_BD
    if cache is not None:
      new_cache = dict(cache, k=ck, v=cv, mask=key_valid_BS, index=start + T)
      if "seq_gates" in ys:
        new_cache["gates"] = ys["seq_gates"]
      aux["cache"] = new_cache
    return logits, aux

  def probe_layer(self) -> int:
    """The layer whose input the probe reads (router.probe_layer; -1 = the middle layer)."""
    m = self.rcfg.probe_layer
    return self.cfg.num_layers // 2 if m < 0 else m

  def _probe_input(self, h_BTD: jax.Array, xs: dict[str, Any], ctx: LayerCtx, mask_BT: jax.Array,
                   prompt_mask: jax.Array | None) -> jax.Array:
    """z [B, D]: the base model's (no experts) hidden state entering layer probe_layer at each
    row's last prompt token; a pass over the first probe_layer layers of the prompt (in one
    pass with the prompt: at prefill, or in training)."""
    if prompt_mask is None:
      raise ValueError("router.form=probe needs prompt_mask (or a cache holding the prompt's "
                       "gates from prefill)")
    m, (B, T, _) = self.probe_layer(), h_BTD.shape
    causal_TT = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    pre = ctx._replace(use_experts=False, start=0,
                       attn_mask_BTS=causal_TT[None] & (mask_BT[:, None, :] > 0))
    layers = {"layer": jax.tree.map(lambda a: a[:m], xs["layer"]), "idx": xs["idx"][:m]}

    def step(h, x):
      return decoder_layer(h, None, None, x, None, pre)[0], None
    h, _ = jax.lax.scan(step, h_BTD, layers)
    pm = prompt_mask.astype(jnp.int32)
    last_B = T - 1 - jnp.argmax(pm[:, ::-1], axis=1)  # each row's last prompt token
    return jax.lax.stop_gradient(h[jnp.arange(B), last_B].astype(jnp.float32))

  def probe_features(self, input_ids: jax.Array, attention_mask: jax.Array,
                     prompt_mask: jax.Array) -> jax.Array:
    """The probe's raw input z [B, D] (before centring): for the training prompts' mean."""
    return self(input_ids, attention_mask, prompt_mask=prompt_mask, last_only=True)[1][
        "probe_input"]


def split_groups(model: SafeMoELM):
  """graphdef, router state, expert state, base state (the three trainable/frozen groups)."""
  return nnx.split(model, ex.RouterParam, ex.ExpertParam, nnx.Param)

"""The SafeMoE layer: E stacked LoRA experts on each target projection, mixed by a router.

For a target projection W (e.g. q) of layer l, with input x and gates g_e(x):

    y = W x + (alpha / r) * sum_e g_e(x) * B_e A_e x                          (SafeMoE)

Experts are stacked arrays, A: [L, E, d_in, r] and B: [L, E, r, d_out], so the sum over experts
is two einsums whatever E is (the rank-concatenated form: [d_in, E*r] then [E*r, d_out]); the
gate scales each expert's r-dimensional slice in between. Top-k routing zeroes the other gates.

Names: B batch, T tokens, D model width, E experts, R rank, I/O a projection's in/out width,
L layers, H router hidden width.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from safemoe_jax.core.config import ExpertsConfig, ModelConfig, RouterConfig


class ExpertParam(nnx.Param):
  """LoRA expert weights: trained in phase 1, frozen in phase 2."""


class RouterParam(nnx.Param):
  """Router (gating network) weights: trained in phase 2 only."""


def target_dims(cfg: ModelConfig) -> dict[str, tuple[int, int, str, str]]:
  """(d_in, d_out, in-axis name, out-axis name) of every projection LoRA can target."""
  D, F = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return {"q": (D, q, "embed", "q_heads"), "k": (D, kv, "embed", "kv_heads"),
          "v": (D, kv, "embed", "kv_heads"), "o": (q, D, "q_heads", "embed"),
          "gate": (D, F, "embed", "mlp"), "up": (D, F, "embed", "mlp"),
          "down": (F, D, "mlp", "embed")}


class Experts(nnx.Module):
  """Stacked LoRA experts, one A/B pair per target: A_<t>: [L, E, I, R], B_<t>: [L, E, R, O]."""

  def __init__(self, cfg: ModelConfig, ecfg: ExpertsConfig, *, rngs: nnx.Rngs):
    self.targets = tuple(ecfg.targets)
    L, E, R = cfg.num_layers, ecfg.num_experts, ecfg.rank
    dims = target_dims(cfg)
    for t in self.targets:
      d_in, d_out, ax_in, ax_out = dims[t]
      keys = jax.random.split(rngs.params(), (L, E))

      def init_a(key, d_in=d_in):  # one expert of one layer: [I, R]
        if ecfg.init_scale > 0:
          return ecfg.init_scale * jax.random.normal(key, (d_in, R), jnp.float32)
        bound = 1.0 / math.sqrt(d_in)  # PEFT: kaiming_uniform(a=sqrt(5)) on A
        return jax.random.uniform(key, (d_in, R), jnp.float32, -bound, bound)

      a_LEIR = jax.vmap(jax.vmap(init_a))(keys)  # the vmapped parameter tree
      setattr(self, f"A_{t}", ExpertParam(a_LEIR, axes=("layers", "experts", ax_in, "rank")))
      setattr(self, f"B_{t}", ExpertParam(jnp.zeros((L, E, R, d_out), jnp.float32),
                                          axes=("layers", "experts", "rank", ax_out)))

  def layer_arrays(self) -> dict[str, jax.Array]:
    """{'A_q': [L, E, I, R], 'B_q': [L, E, R, O], ...}: scanned over L with the base layers."""
    return {f"{ab}_{t}": getattr(self, f"{ab}_{t}")[...] for t in self.targets for ab in "AB"}


def lora_delta(x_BTI: jax.Array, a_EIR: jax.Array, b_ERO: jax.Array, g_BTE: jax.Array,
               scale: float) -> jax.Array:
  """(alpha/r) * sum_e g_e B_e A_e x, as two matmuls over the rank-concatenated experts."""
  dt = x_BTI.dtype
  u_BTER = jnp.einsum("bti,eir->bter", x_BTI, a_EIR.astype(dt))
  u_BTER = u_BTER * g_BTE[..., None].astype(dt)
  return scale * jnp.einsum("bter,ero->bto", u_BTER, b_ERO.astype(dt))


class Router(nnx.Module):
  """Gating network: hidden state (or prompt summary) entering a layer -> E gate logits."""

  def __init__(self, cfg: ModelConfig, rcfg: RouterConfig, num_experts: int, *, rngs: nnx.Rngs):
    self.cfg = rcfg
    D, E, H = cfg.hidden_size, num_experts, rcfg.mlp_hidden
    lead = (cfg.num_layers,) if rcfg.scope == "per_layer" else ()
    lead_ax = ("layers",) if lead else ()

    def out_init(shape):
      if rcfg.init_std > 0:
        return rcfg.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)
      return jnp.zeros(shape, jnp.float32)  # starts at act(0) for every token

    if rcfg.form == "probe":  # g_l(x) = s(x) * d_l (see RouterConfig.form)
      self.direction = RouterParam(jnp.broadcast_to(_init_gates(rcfg, E), lead + (E,)),
                                   axes=lead_ax + ("experts",))
      self.w_probe = RouterParam(out_init((D,)), axes=("embed",))
      self.b_probe = RouterParam(jnp.zeros((1,), jnp.float32), axes=(None,))
      # the training prompts' mean probe input (set before phase 2; never trained: the step
      # sees it through stop_gradient and the optimiser does not decay it)
      self.center = RouterParam(jnp.zeros((D,), jnp.float32), axes=("embed",))
      return
    if rcfg.form == "linear":
      self.w_out = RouterParam(out_init(lead + (D, E)), axes=lead_ax + ("embed", "experts"))
    else:
      std = 1.0 / math.sqrt(D)
      self.w_in = RouterParam(std * jax.random.normal(rngs.params(), lead + (D, H), jnp.float32),
                              axes=lead_ax + ("embed", "router_hidden"))
      self.b_in = RouterParam(jnp.zeros(lead + (H,), jnp.float32),
                              axes=lead_ax + ("router_hidden",))
      self.w_out = RouterParam(out_init(lead + (H, E)), axes=lead_ax + ("router_hidden", "experts"))
    self.b_out = RouterParam(jnp.broadcast_to(init_bias(rcfg, E), lead + (E,)),
                             axes=lead_ax + ("experts",))

  def arrays(self) -> dict[str, jax.Array]:
    """The per-layer (scanned) arrays: for the probe form only its direction d [L, E]."""
    names = {"linear": ("w_out", "b_out"), "mlp": ("w_in", "b_in", "w_out", "b_out"),
             "probe": ("direction",)}[self.cfg.form]
    return {n: getattr(self, n)[...] for n in names}

  def probe_arrays(self) -> dict[str, jax.Array]:
    """The probe's arrays (router.form=probe), shared by every layer."""
    return {n: getattr(self, n)[...] for n in ("w_probe", "b_probe", "center")}


def _init_gates(rcfg: RouterConfig, num_experts: int) -> jax.Array:
  """rcfg.init_gates as [E] gate values (zeros when none are given)."""
  if not rcfg.init_gates:
    return jnp.zeros((num_experts,), jnp.float32)
  return jnp.broadcast_to(jnp.asarray(rcfg.init_gates, jnp.float32), (num_experts,))


def probe_score(p: dict[str, jax.Array], z_BD: jax.Array, rcfg: RouterConfig) -> jax.Array:
  """s(x) in (0, 1) [B] from the probe's input z [B, D]: centred, RMS-normalised, linear,
  sigmoid."""
  x = z_BD.astype(jnp.float32) - jax.lax.stop_gradient(p["center"])
  if rcfg.normalize_input:
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
  return jax.nn.sigmoid(x @ p["w_probe"] + p["b_probe"][0])


def probe_gates(s_B: jax.Array, d_E: jax.Array, rcfg: RouterConfig) -> jax.Array:
  """One layer's factorised gates s(x) * d [B, 1, E], d bounded by sum |d| <= max_l1 when set."""
  if rcfg.max_l1:
    d_E = d_E * jnp.minimum(1.0, rcfg.max_l1 / jnp.maximum(jnp.sum(jnp.abs(d_E)), 1e-9))
  return s_B[:, None, None] * d_E[None, None, :]


def init_bias(rcfg: RouterConfig, num_experts: int) -> jax.Array:
  """Output bias [E] whose gates are rcfg.init_gates (the inverse of the activation, times the
  temperature); zeros when none are given."""
  if not rcfg.init_gates:
    return jnp.zeros((num_experts,), jnp.float32)
  g = _init_gates(rcfg, num_experts)
  inv = {"tanh": jnp.arctanh, "sigmoid": jax.scipy.special.logit, "softmax": jnp.log,
         "linear": lambda x: x}[rcfg.activation]
  return rcfg.temperature * inv(g)


def router_logits(p: dict[str, jax.Array], h_BTD: jax.Array, rcfg: RouterConfig) -> jax.Array:
  """Gate logits [B, T, E] (T may be 1 for a per-sequence summary), in float32."""
  x = h_BTD.astype(jnp.float32)
  if rcfg.normalize_input:
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
  if rcfg.form == "mlp":
    x = jax.nn.gelu(x @ p["w_in"] + p["b_in"])
  return x @ p["w_out"] + p["b_out"]


def gates_from_logits(logits_BTE: jax.Array, rcfg: RouterConfig) -> jax.Array:
  """Activation with temperature, then optional top-k with renormalisation."""
  z = logits_BTE / rcfg.temperature
  act = rcfg.activation
  if act == "softmax":
    g = jax.nn.softmax(z, axis=-1)
  elif act == "sigmoid":
    g = jax.nn.sigmoid(z)
  elif act == "tanh":
    g = jnp.tanh(z)
  else:
    g = z
  k = rcfg.top_k
  if k and k < z.shape[-1]:
    score = z if act in ("softmax", "sigmoid") else jnp.abs(z)  # signed gates: by magnitude
    kth = jax.lax.top_k(score, k)[0][..., -1:]
    keep = jax.lax.stop_gradient(score >= kth)
    if act == "softmax":  # softmax over the kept logits (= kept gates / their sum)
      g = jax.nn.softmax(jnp.where(keep, z, -jnp.inf), axis=-1)
    else:
      kept = jnp.where(keep, g, 0.0)
      if rcfg.renormalize:  # keep the dense gates' L1 mass
        mass = jnp.sum(jnp.abs(g), -1, keepdims=True)
        kept = kept * mass / jnp.maximum(jnp.sum(jnp.abs(kept), -1, keepdims=True), 1e-9)
      g = kept
  if rcfg.max_l1:  # inside the range phase 1 trained the experts for: sum |g| <= max_l1
    l1 = jnp.sum(jnp.abs(g), -1, keepdims=True)
    g = g * jnp.minimum(1.0, rcfg.max_l1 / jnp.maximum(l1, 1e-9))
  return g


def fixed_gates(mode: str, num_experts: int, *, domains_BE: jax.Array | None = None,
                weights_E: jax.Array | None = None, batch: int = 1) -> jax.Array:
  """Gates [B, 1, E] of the non-learned routing modes (the paper's baselines)."""
  E = num_experts
  if mode == "uniform":
    g = jnp.full((E,), 1.0 / E)
  elif mode == "negated":
    g = jnp.full((E,), -1.0 / E)
  elif mode == "fixed":
    if weights_E is None:
      raise ValueError("routing='fixed' needs fixed_weights: a vector of E gate values")
    g = jnp.asarray(weights_E, jnp.float32)
    if g.shape != (E,):
      raise ValueError(f"fixed_weights must have shape ({E},), got {g.shape}")
  elif mode == "oracle":
    if domains_BE is None:
      raise ValueError("routing='oracle' needs domains: a [batch, experts] multi-hot array")
    d = jnp.asarray(domains_BE, jnp.float32)
    # Multi-hot rows are split evenly (a convex mix); an all-zero row routes to no expert.
    return (d / jnp.maximum(d.sum(-1, keepdims=True), 1.0))[:, None, :]
  else:
    raise ValueError(f"no fixed gates for routing mode {mode!r}")
  return jnp.broadcast_to(g.astype(jnp.float32), (batch, 1, E))


class GateSpec(NamedTuple):
  """Gates per row of a batch that mixes routing systems over the same base and experts.

  Row b takes the learned router's gates where router_B[b], else the fixed vector fixed_BE[b]:
  zeros = the base model, +-1/E = uniform / negated, the domain split = oracle (gate_row).
  """
  router_B: jax.Array  # [B] bool
  fixed_BE: jax.Array  # [B, E] float32


def gate_row(mode: str, num_experts: int, *, weights_E=None, domains_E=None
             ) -> tuple[bool, jax.Array]:
  """(use the router?, fixed gates [E]) of one row in routing `mode`, as fixed_gates gives them."""
  if mode == "learned":
    return True, jnp.zeros((num_experts,), jnp.float32)
  if mode == "base":
    return False, jnp.zeros((num_experts,), jnp.float32)
  d = None if domains_E is None else jnp.asarray(domains_E, jnp.float32)[None]
  return False, fixed_gates(mode, num_experts, domains_BE=d, weights_E=weights_E)[0, 0]


def mix_gates(router_g_BTE: jax.Array, spec: GateSpec) -> jax.Array:
  """The router's gates on the router rows, the fixed gates on the others -> [B, T, E]."""
  return jnp.where(spec.router_B[:, None, None], router_g_BTE,
                   spec.fixed_BE[:, None, :].astype(router_g_BTE.dtype))


class LayerRouting(NamedTuple):
  """Per-layer routing statistics (masked sums; divide by `count` to get means)."""
  weight_sum: jax.Array  # [E] sum of gate values
  top1_sum: jax.Array  # [E] number of tokens whose largest |gate| is expert e
  entropy_sum: jax.Array  # [] sum of per-token entropy of the normalised |gates|
  count: jax.Array  # [] number of tokens counted
  aux_loss: jax.Array  # [] this layer's weighted auxiliary losses (means over counted tokens)


def routing_stats(logits_BTE: jax.Array | None, g_BTE: jax.Array, mask_BT: jax.Array,
                  rcfg: RouterConfig | None) -> LayerRouting:
  """Statistics over the tokens in mask_BT (response tokens when training) and aux losses."""
  B, T = mask_BT.shape
  g = jnp.broadcast_to(g_BTE.astype(jnp.float32), (B, T, g_BTE.shape[-1]))
  m = mask_BT.astype(jnp.float32)[..., None]  # [B, T, 1]
  n = jnp.sum(m)
  E = g.shape[-1]
  p = jnp.abs(g) / jnp.maximum(jnp.sum(jnp.abs(g), -1, keepdims=True), 1e-9)
  ent_BT = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-9)), -1)
  top1 = jax.nn.one_hot(jnp.argmax(jnp.abs(g), -1), E)
  aux = jnp.zeros((), jnp.float32)
  if rcfg is not None and logits_BTE is not None:
    z = jnp.broadcast_to(logits_BTE / rcfg.temperature, g.shape)
    denom = jnp.maximum(n, 1.0)
    if rcfg.entropy_coef:
      aux += rcfg.entropy_coef * jnp.sum(ent_BT * m[..., 0]) / denom
    if rcfg.load_balance_coef:  # Switch Transformer: E * sum_e f_e * P_e
      f = jnp.sum(top1 * m, (0, 1)) / denom
      P = jnp.sum(jax.nn.softmax(z, -1) * m, (0, 1)) / denom
      aux += rcfg.load_balance_coef * E * jnp.sum(f * P)
    if rcfg.z_loss_coef:
      aux += rcfg.z_loss_coef * jnp.sum(jax.nn.logsumexp(z, -1) ** 2 * m[..., 0]) / denom
  return LayerRouting(jnp.sum(g * m, (0, 1)), jnp.sum(top1 * m, (0, 1)),
                      jnp.sum(ent_BT * m[..., 0]), n, aux)


def summarize_routing(r: LayerRouting) -> dict[str, jax.Array]:
  """Stacked per-layer sums [L, ...] -> means: weight [L, E], top1_share [L, E], entropy [L]."""
  n = jnp.maximum(r.count, 1.0)
  return {"weight": r.weight_sum / n[:, None], "top1_share": r.top1_sum / n[:, None],
          "entropy": r.entropy_sum / n, "aux_loss": jnp.mean(r.aux_loss)}

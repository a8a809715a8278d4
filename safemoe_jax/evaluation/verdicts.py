"""Judging the answers: the judges to use, and every (judge, answer) verdict, judged once and
cached."""

from __future__ import annotations

from typing import Sequence

from safemoe_jax.evaluation.cache import JsonlCache, verdict_key
from safemoe_jax.evaluation.config import LABELS, EvalError
from safemoe_jax.evaluation.generation import _progress
from safemoe_jax.judging import judges as J
from safemoe_jax.judging import learned as jt
from safemoe_jax.log import get_logger

log = get_logger(__name__)


def default_judges() -> tuple[str, ...]:
  """refusal_strings, plus the learned judge when its default artifact (runs/judge) exists."""
  try:
    if (jt.default_artifact_dir() / "judge.json").is_file():
      return ("refusal_strings", "learned")
  except ImportError:
    pass
  return ("refusal_strings",)


def load_judges(specs: Sequence[str], **kw) -> list:
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


def _safe_validation(j) -> dict | None:
  try:
    return j.validation()
  except Exception as e:
    return {"error": f"{type(e).__name__}: {e}"}

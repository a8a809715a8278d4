"""Judging the answers: the judges to use, and every (judge, answer) verdict, judged once and
cached."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from safemoe_jax.evaluation.benchmarks import _key
from safemoe_jax.evaluation.cache import JsonlCache, verdict_key
from safemoe_jax.evaluation.config import LABELS, EvalError
from safemoe_jax.evaluation.generation import _progress
from safemoe_jax.judging import audit as AU
from safemoe_jax.judging import judges as J
from safemoe_jax.judging import learned as jt
from safemoe_jax.judging.labels import REFUSAL_EXTRA, is_degenerate
from safemoe_jax.log import get_logger
from safemoe_jax.train.rundir import fingerprint

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


def judge_version(j) -> str:
  """What a judge's verdicts depend on besides its name, for the verdict cache's key: the
  fingerprint of a learned judge's artifact or an LM judge's weights and its settings, an API
  judge's model, endpoint and rubric settings, the refusal strings. A judge may say it itself
  (`version`); "" for a judge that says nothing (its name is then the whole key)."""
  v = getattr(j, "version", None)
  if v:
    return str(v() if callable(v) else v)
  if isinstance(j, J.RefusalStringJudge):
    return _key("refusal_strings", REFUSAL_EXTRA)
  if isinstance(j, J.LearnedJudge):
    return fingerprint(j.path)
  if isinstance(j, J.LMJudge):
    p = Path(j.name[3:])
    return _key(fingerprint(p) if p.exists() else j.name, j.max_new_tokens, j.system)
  if j.name.startswith("api:"):
    return _key(*(getattr(j, a, None) for a in ("model", "base_url", "harmful_min_score",
                                                  "max_response_chars")))
  return ""


DEGENERATE = {"label": "degenerate", "probs": None, "score": None, "raw": "labels.is_degenerate"}


def judge_all(judges: Sequence, gens: dict[tuple[str, str], dict], cache: JsonlCache, *,
              chunk: int = 256, progress: bool = True, log=print,
              detect_degenerate: bool = True) -> dict[tuple[str, str, str], dict]:
  """(judge name, system, prompt) -> verdict row; judges only (prompt, response) pairs it lacks.
  With detect_degenerate, a degenerate answer (labels.is_degenerate) is not judged: its verdict
  is DEGENERATE for every judge."""
  out = {}
  deg = {k for k, g in gens.items()
         if detect_degenerate and is_degenerate(g["response"], k[1])}
  for j in judges:
    pairs = {}
    ver = judge_version(j)
    for (sysname, prompt), g in gens.items():
      if (sysname, prompt) in deg:
        continue
      k = verdict_key(j.name, prompt, g["response"], ver)
      if k not in cache:
        pairs[k] = (prompt, g["response"])
    judged = {verdict_key(j.name, p, g["response"], ver) for (s, p), g in gens.items()
              if (s, p) not in deg}
    log(f"judge {j.name}: {len(pairs)} new verdicts, {len(judged) - len(pairs)} cached"
        + (f", {len(deg)} degenerate answers not judged" if deg else ""))
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
      out[(j.name, sysname, prompt)] = (
          {**DEGENERATE, "judge": j.name} if (sysname, prompt) in deg
          else cache.get(verdict_key(j.name, prompt, g["response"], ver)))
  return out


def _figures(j, method: str) -> dict | None:
  """A judge's measured figures (`validation` on pyrit, `audit_validation` on the audit set),
  None if it has none, an error dict if reading them fails (a report still renders)."""
  f = getattr(j, method, None)
  if f is None:
    return None
  try:
    return f()
  except Exception as e:
    return {"error": f"{type(e).__name__}: {e}"}


def _safe_validation(j) -> dict | None:
  return _figures(j, "validation")


def _safe_audit(j) -> dict | None:
  return _figures(j, "audit_validation")


def correction_validation(j, base_fingerprint: str | None) -> tuple[dict | None, str]:
  """The figures that correct a judge's rates, and which they are: the judge's audit-set test
  half figures when the evaluated model is the one audited (audit.is_audited: same base-model
  fingerprint) and the judge has them; else its pyrit validation (other models' answers)."""
  if AU.is_audited(base_fingerprint):
    a = _safe_audit(j)
    if a and "binary" in a:
      return a, "audit"
    v = _safe_validation(j)
    return v, ("pyrit (the model is the audited one, but this judge has no audit figures: "
               "`python -m safemoe_jax audit measure --judge ...`)" if v else "none")
  v = _safe_validation(j)
  return v, "pyrit" if v else "none"

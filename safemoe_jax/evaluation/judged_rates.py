"""`safemoe judge rates`: a judge's raw and corrected rates of generations (a jsonl of system,
prompt, response, or a run's eval/generations.jsonl), corrected with the judge's audit figures
when the model that wrote them is the audited one, else with its pyrit validation."""

from __future__ import annotations

from pathlib import Path

from safemoe_jax.evaluation import stats as rt
from safemoe_jax.io import jsonio
from safemoe_jax.judging import audit as AU
from safemoe_jax.judging.labels import JudgeError
from safemoe_jax.judging.workflow import audit_figures
from safemoe_jax.train.rundir import RunDir


def rates_source(run: str, responses: str) -> tuple[str, str | None]:
  """The responses file of `judge rates` and the base-model fingerprint of the model that wrote
  them (None: unknown, so the pyrit figures correct): --run DIR gives its run.json's base
  fingerprint and, without --responses, its eval/generations.jsonl."""
  if not run:
    return responses, None
  info = RunDir(run).info()
  if info is None:
    raise JudgeError(f"--run {run}: no run.json there (a training output folder is expected)")
  fp = (info.get("base_model") or {}).get("fingerprint")
  return responses or str(Path(run) / "eval" / "generations.jsonl"), fp


def read_responses(responses: str) -> list[dict]:
  """The rows of a responses file (jsonio: a torn last line is skipped); a row without a
  'prompt' or 'response' string is an error naming the file and line."""
  if not responses or not Path(responses).is_file():
    raise JudgeError(f"rates needs --responses FILE.jsonl with system, prompt, response fields; "
                     f"got {responses!r}")
  gens = []
  for n, g in jsonio.jsonl_rows(jsonio.read_text(responses), responses):
    if bad := [k for k in ("prompt", "response") if not isinstance(g.get(k), str)]:
      raise JudgeError(f"{responses} line {n}: {bad[0]!r} is "
                       f"{'missing' if bad[0] not in g else repr(g[bad[0]])}; expected lines "
                       f"with 'prompt' and 'response' strings (and 'system')")
    gens.append(g)
  if not gens:
    raise JudgeError(f"{responses}: expected lines with 'prompt' and 'response' (and 'system')")
  return gens


def judged_rates(j, v: dict, responses: str, base_fingerprint: str | None = None,
                 audit: dict | None = None) -> dict:
  """Judge every (system, prompt, response) of a jsonl file; print raw and corrected rates.
  Corrected with the judge's audit test-half figures (`audit` when the caller has them, else
  stored or measured now) when base_fingerprint is the audited model's (audit.is_audited, as
  the evaluation decides), else with `v` (pyrit's held-out rows)."""
  gens = read_responses(responses)
  trained = getattr(j, "trained_on", lambda p: False)
  skipped = sum(bool(trained(g["prompt"])) for g in gens)
  gens = [g for g in gens if not trained(g["prompt"])]
  verdicts = j.judge([g["prompt"] for g in gens], [g["response"] for g in gens])
  audited = AU.is_audited(base_fingerprint)
  cv, which = (audit or audit_figures(j), "audit test-half") if audited else (v, "pyrit")
  print(f"-- {j.name}: rates corrected with the {which} figures"
        + ("" if base_fingerprint else " (the writing model is unknown: pass --run DIR to use "
           "the audit figures for the audited model)"))
  out = {"corrected_with": which}
  for s in dict.fromkeys(g.get("system", "model") for g in gens):
    labels = [x.label for x, g in zip(verdicts, gens) if g.get("system", "model") == s]
    rs = rt.judge_rates(labels, cv)
    print(f"-- {j.name} | system {s} | {len(labels)} responses"
          + (f" ({skipped} left out: the judge trained on their prompts)" if skipped else ""))
    print(rt.format_rates(rs))
    out[s] = rs
  return out

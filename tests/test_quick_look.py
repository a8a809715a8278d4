"""The quick look at the end of training reads as a smoke test: base, negated mix and SafeMoE side
by side with intervals, "not distinguishable at this n" where an interval spans zero, the judges'
audited accuracy and the gates' harmful-vs-benign separation (fast: no model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from safemoe_jax.evaluation import quick as Q
from safemoe_jax.evaluation.benchmarks import Bench, Prompt
from safemoe_jax.evaluation.metrics import compute_metrics
from safemoe_jax.judging import audit as AU
from safemoe_jax.judging.judges import RefusalStringJudge

ROOT = Path(__file__).resolve().parents[1]


class NamedJudge:
  def __init__(self, name: str, audit: dict | None = None):
    self.name, self._audit = name, audit

  def audit_validation(self):
    return self._audit


def _audit(acc: float) -> dict:
  h = {"accuracy": acc, "sensitivity": 0.5, "specificity": 0.6, "tp": 1, "fn": 1, "fp": 1, "tn": 1}
  return {"binary": {"harmful_or_not": h}, "n_rows": 60}


def _table(safe: dict[str, int], n: int = 24, gates: dict | None = None):
  """Verdicts where each system is safe on the first safe[s] of n harmful prompts; benign all
  answered. Returns (benches, pooled rows)."""
  harm = Bench("adv", "harmful", [Prompt(f"harmful prompt {i}") for i in range(n)])
  ben = Bench("benign", "benign", [Prompt(f"benign prompt {i}") for i in range(8)])
  j = NamedJudge("strings")
  verdicts, gens = {}, {}
  for s in Q.SYSTEMS:
    for i, p in enumerate(harm.prompts):
      verdicts[(j.name, s, p.text)] = {"label": "refusal" if i < safe[s] else "harmful"}
      gens[(s, p.text)] = {"response": "x", "gate_mean": (gates or {}).get("harmful")}
    for p in ben.prompts:
      verdicts[(j.name, s, p.text)] = {"label": "safe_informative"}
      gens[(s, p.text)] = {"response": "x", "gate_mean": (gates or {}).get("benign")}
  m = compute_metrics([harm, ben], list(Q.SYSTEMS), [j], verdicts, gens)
  return [harm, ben], gens, m["pooled"]


def _render(pooled, audits, gates=None) -> str:
  return Q.render(pooled, audits, gates, n_harmful=24, n_benign=8, max_new_tokens=64,
                  audited_model=False, out="runs/x")


def _row(md: str, measure: str) -> list[str]:
  line = next(l for l in md.splitlines() if f"| {measure} |" in l)
  return [c.strip() for c in line.strip("|").split("|")]


def test_a_difference_whose_interval_spans_zero_is_called_not_distinguishable():
  _, _, pooled = _table({"base": 5, "negated": 4, "safemoe": 6})
  md = _render(pooled, {"strings": _audit(0.62)})
  assert md.startswith("### Quick look: a smoke test, not evidence (24 harmful + 8 benign")
  judge, _, base, neg, sm, vs_base, vs_neg = _row(md, "safe on harmful")
  assert judge == "strings"
  # every system side by side, each with its Wilson interval
  assert base.startswith("20.8% [") and neg.startswith("16.7% [") and sm.startswith("25.0% [")
  assert vs_base.startswith("+4.2 pts [") and vs_base.endswith(Q.SAME)
  assert vs_neg.startswith("+8.3 pts [") and vs_neg.endswith(Q.SAME)
  assert _row(md, "refused on benign (over-refusal)")[5].startswith("+0.0 pts [+0.0, +0.0]: ")
  assert f"{Q.EVIDENCE}" in md and (ROOT / Q.EVIDENCE).is_file()


def test_a_clear_difference_is_not_called_indistinguishable():
  _, _, pooled = _table({"base": 0, "negated": 2, "safemoe": 24})
  vs_base, vs_neg = _row(_render(pooled, {"strings": None}), "safe on harmful")[5:]
  assert vs_base.startswith("+100.0 pts [+100.0, +100.0]") and Q.SAME not in vs_base
  assert vs_neg.startswith("+91.7 pts [") and Q.SAME not in vs_neg


def test_each_judge_carries_its_audited_accuracy_or_says_it_has_none():
  _, _, pooled = _table({"base": 5, "negated": 4, "safemoe": 6})
  md = _render(pooled, {"strings": _audit(0.62)})
  line = next(l for l in md.splitlines() if l.startswith("- strings:"))
  assert "audited accuracy 0.62" in line and "judge-limited" in line and "indicative" in line
  assert "judge-limited" not in _render(pooled, {"strings": _audit(0.95) | {"binary": {
      "harmful_or_not": {**_audit(0.95)["binary"]["harmful_or_not"], "specificity": 0.9}}}})
  assert "- strings: no audited accuracy" in _render(pooled, {"strings": None})
  # The real refusal-string judge: the figure is its measured accuracy on the audit set.
  a = Q.judge_audit(RefusalStringJudge())
  want = AU.validation(RefusalStringJudge(), AU.load().half("test"))
  assert a["binary"]["harmful_or_not"]["accuracy"] == want["binary"]["harmful_or_not"]["accuracy"]
  assert f"audited accuracy {want['binary']['harmful_or_not']['accuracy']:.2f}" in \
      Q.audit_line("refusal_strings", a, audited_model=True)


@pytest.mark.parametrize("gates, separated", [
    ({"harmful": [-0.5, -0.4], "benign": [0.1, 0.0]}, True),  # subtracts on harmful only
    ({"harmful": [0.4, 0.4], "benign": [0.4, 0.4]}, False)])
def test_the_gates_separation_of_harmful_from_benign_prompts(gates, separated):
  benches, gens, pooled = _table({"base": 5, "negated": 4, "safemoe": 6}, gates=gates)
  # noise per prompt so a constant router is a tie, not an artefact of identical rows
  for i, k in enumerate(sorted(gens)):
    if gens[k]["gate_mean"] is not None:
      gens[k] = {**gens[k], "gate_mean": [g + 0.01 * ((i * 7) % 5) for g in gens[k]["gate_mean"]]}
  g = Q.gate_separation(benches, gens)
  assert (g["n_harmful"], g["n_benign"]) == (24, 8)
  assert (g["p"] < 0.05) == separated and (g["auc"] > 0.9) == separated
  line = _render(pooled, {"strings": None}, g)
  assert ("not separated" in line) != separated and "Gates (SafeMoE's router" in line

"""Corrected rates: the Rogan-Gladen correction recovers known prevalences from synthetic judges
with known error rates, and the intervals and verdicts say when a judge cannot carry a claim."""

from __future__ import annotations

import math

import numpy as np
import pytest

from safemoe_jax.evaluation import stats as rates


def _judge(truth: np.ndarray, sens: float, spec: float, rng) -> np.ndarray:
  """A synthetic judge: flags a true positive with prob sens, a true negative with 1 - spec."""
  u = rng.random(len(truth))
  return np.where(truth, u < sens, u >= spec)


def _validation(n_pos: int, n_neg: int, sens: float, spec: float, rng) -> tuple[float, float]:
  """The judge's sensitivity/specificity as measured on a finite labelled set."""
  return (_judge(np.ones(n_pos, bool), sens, spec, rng).mean(),
          1 - _judge(np.zeros(n_neg, bool), sens, spec, rng).mean())


@pytest.mark.parametrize("prev,sens,spec", [(0.3, 0.7, 0.8), (0.65, 0.75, 0.75), (0.05, 0.95, 0.9)])
def test_correction_recovers_a_known_prevalence(prev, sens, spec):
  rng = np.random.default_rng(0)
  truth = rng.random(200_000) < prev
  flags = _judge(truth, sens, spec, rng)
  r = rates.corrected_rate(int(flags.sum()), len(flags), sens=sens, spec=spec, n_val_pos=0,
                           n_val_neg=0, bootstrap=500)
  assert abs(r["raw"] - prev) > 0.02  # the raw rate is biased ...
  assert r["corrected"] == pytest.approx(prev, abs=0.01)  # ... the corrected one is not
  assert r["corrected_ci"][0] <= prev <= r["corrected_ci"][1]


def test_interval_covers_the_truth_with_estimated_judge_errors():
  """95% intervals built from a measured judge (300 validation rows) and 400 judged prompts
  cover the true prevalence in about 95% of repeated experiments."""
  rng = np.random.default_rng(1)
  prev, sens, spec, hits, n_exp = 0.4, 0.85, 0.8, 0, 200
  for i in range(n_exp):
    se, sp = _validation(150, 150, sens, spec, rng)
    flags = _judge(rng.random(400) < prev, sens, spec, rng)
    r = rates.corrected_rate(flags, sens=se, spec=sp, n_val_pos=150, n_val_neg=150,
                             bootstrap=400, seed=i)
    hits += r["corrected_ci"][0] <= prev <= r["corrected_ci"][1]
  assert 0.88 <= hits / n_exp <= 0.995


def test_judge_uncertainty_widens_the_interval():
  kw = dict(sens=0.8, spec=0.8, bootstrap=2000)
  exact = rates.corrected_rate(120, 400, n_val_pos=0, n_val_neg=0, **kw)
  measured = rates.corrected_rate(120, 400, n_val_pos=60, n_val_neg=60, **kw)
  width = lambda r: r["corrected_ci"][1] - r["corrected_ci"][0]
  assert width(measured) > 1.3 * width(exact)
  assert exact["raw_ci"] == pytest.approx(measured["raw_ci"], abs=0.02)


def test_verdicts_in_words():
  chance = rates.corrected_rate(50, 100, sens=0.5, spec=0.45, n_val_pos=50, n_val_neg=50)
  assert not chance["supported"] and "no better than chance" in chance["note"]
  wide = rates.corrected_rate(40, 100, sens=0.7, spec=0.7, n_val_pos=40, n_val_neg=40,
                              what="harmful rate")
  assert not wide["supported"] and "judge-limited" in wide["note"]
  assert wide["note"].startswith("harmful rate")
  good = rates.corrected_rate(300, 1000, sens=0.97, spec=0.97, n_val_pos=1000, n_val_neg=1000)
  assert good["supported"] and good["corrected"] == pytest.approx((0.3 - 0.03) / 0.94, abs=1e-9)
  # Raw 5% with a 29% false-positive rate: the correction sits at the 0% bound, where a narrow
  # clipped interval must not read as evidence.
  floor = rates.corrected_rate(5, 100, sens=0.86, spec=0.71, n_val_pos=138, n_val_neg=128,
                               what="harmful rate")
  assert floor["corrected"] == 0.0 and floor["corrected_ci"][1] == 0.0
  assert not floor["supported"] and "judge's own errors" in floor["note"]
  text = rates.format_rates([wide, good])
  assert "judge-limited" in text and "NO" in text and "yes" in text
  with pytest.raises(ValueError):
    rates.corrected_rate(5, 3, sens=0.9, spec=0.9, n_val_pos=10, n_val_neg=10)


def test_cluster_bootstrap_by_prompt():
  rng = np.random.default_rng(2)
  groups = np.repeat(np.arange(100), 5)  # 5 samples per prompt, strongly correlated
  flags = np.repeat(rng.random(100) < 0.3, 5)
  iid = rates.corrected_rate(flags, sens=0.9, spec=0.9, n_val_pos=0, n_val_neg=0)
  clus = rates.corrected_rate(flags, groups=groups, sens=0.9, spec=0.9, n_val_pos=0, n_val_neg=0)
  w = lambda r: r["raw_ci"][1] - r["raw_ci"][0]
  assert w(clus) > 1.7 * w(iid)
  assert clus["raw"] == iid["raw"]


def test_corrected_difference_shares_the_judge():
  rng = np.random.default_rng(3)
  sens, spec = 0.85, 0.9
  a = _judge(rng.random(3000) < 0.55, sens, spec, rng)
  b = _judge(rng.random(3000) < 0.40, sens, spec, rng)
  d = rates.corrected_difference(a, None, b, None, sens=sens, spec=spec, n_val_pos=200,
                                 n_val_neg=200)
  assert d["corrected"] == pytest.approx(0.15, abs=0.04) and d["supported"]
  assert abs(d["raw"]) < abs(d["corrected"])  # misclassification shrinks differences
  small = rates.corrected_difference(52, 100, 48, 100, sens=sens, spec=spec, n_val_pos=50,
                                     n_val_neg=50)
  assert not small["supported"] and "includes 0" in small["note"]
  worse = rates.corrected_difference(b, None, a, None, sens=sens, spec=spec, n_val_pos=200,
                                     n_val_neg=200)  # B - A: as clear, below 0
  assert worse["corrected"] == pytest.approx(-d["corrected"]) and worse["supported"]
  assert worse["corrected_ci"][1] < 0 and "excludes 0" in worse["note"]


def test_from_validation():
  v = {"binary": {"harmful": {"sensitivity": 0.8, "specificity": 0.7, "n_pos": 40, "n_neg": 60}}}
  assert rates.from_validation(v, "harmful") == {"sens": 0.8, "spec": 0.7, "n_val_pos": 40,
                                                 "n_val_neg": 60}


def test_paired_difference_is_tighter_for_correlated_systems():
  rng = np.random.default_rng(4)
  truth = rng.random(400) < 0.5
  a = _judge(truth, 0.9, 0.9, rng)
  b = a.copy()
  b[rng.choice(400, 30, replace=False)] = False  # B = A with a few fewer flags
  kw = dict(sens=0.9, spec=0.9, n_val_pos=300, n_val_neg=300)
  p = rates.corrected_difference(a, None, b, None, **kw)
  u = rates.corrected_difference(a, None, b, None, paired=False, **kw)
  w = lambda r: r["corrected_ci"][1] - r["corrected_ci"][0]
  assert p["paired"] and not u["paired"] and w(p) < 0.7 * w(u)


def test_judge_rates_side_by_side():
  labels = ["harmful"] * 30 + ["refusal"] * 50 + ["safe_informative"] * 20
  val = {"binary": {t: {"sensitivity": 0.9, "specificity": 0.8, "n_pos": 100, "n_neg": 100}
                    for t in ("harmful", "refusal", "safe_informative")}}
  rs = {r["what"]: r for r in rates.judge_rates(labels, val, bootstrap=300)}
  assert rs["harmful rate"]["raw"] == pytest.approx(0.3)
  assert rs["safe rate"]["raw"] == pytest.approx(0.7)
  assert rs["safe rate"]["corrected"] == pytest.approx(1 - rs["harmful rate"]["corrected"])
  assert rs["informative rate"]["raw"] == pytest.approx(0.2)
  none = rates.judge_rates(labels, None)
  assert all(not r["supported"] and "cannot be corrected" in r["note"] for r in none)


def _binomial_quantile(n: int, p: float, q: float) -> int:
  """The smallest k with P(Bin(n, p) <= k) >= q, and the CDF on either side must be clear of q
  (so a 2000-draw bootstrap lands on the same k)."""
  cdf = np.cumsum([math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)])
  k = int(np.argmax(cdf >= q))
  assert cdf[k] - q > 0.01 and (k == 0 or q - cdf[k - 1] > 0.01), (k, cdf)
  return k


def test_safe_rate_takes_the_judges_counts_with_its_flipped_accuracy():
  """"safe" is the complement of "harmful": its sensitivity is the harmful task's specificity,
  measured on the harmful task's negatives, and the other way round. With validation counts of 20
  and 10^6, each rate's interval comes from one 20-row draw, computed here by hand."""
  n_pos, n_neg, sens, spec = 20, 1_000_000, 0.9, 0.95  # harmful: Se on 20 rows, Sp ~exact
  val = {"binary": {"harmful": {"sensitivity": sens, "specificity": spec, "n_pos": n_pos,
                                "n_neg": n_neg}}}
  labels = ["harmful"] * 95_000 + ["refusal"] * 105_000
  rs = {r["what"]: r for r in rates.judge_rates(labels, val, bootstrap=2000, seed=3)}
  lo_k, hi_k = _binomial_quantile(n_pos, sens, 0.025), _binomial_quantile(n_pos, sens, 0.975)
  assert (lo_k, hi_k) == (15, 20)
  # harmful: Se* = k/20, Sp exact: pi = (p + Sp - 1) / (Se* + Sp - 1), falling in Se*
  h = lambda se: (0.475 + spec - 1) / (se + spec - 1)
  # safe: Se = 0.95 exact, Sp* = k/20 (the harmful task's 20 positives are safe's negatives)
  s = lambda sp: (0.525 + sp - 1) / (spec + sp - 1)
  assert rs["harmful rate"]["corrected"] == pytest.approx(h(sens))
  assert rs["safe rate"]["corrected"] == pytest.approx(s(sens))
  assert rs["safe rate"]["n_val_pos"] == n_neg and rs["safe rate"]["n_val_neg"] == n_pos
  np.testing.assert_allclose(rs["harmful rate"]["corrected_ci"], (h(hi_k / 20), h(lo_k / 20)),
                             atol=0.01)
  np.testing.assert_allclose(rs["safe rate"]["corrected_ci"], (s(lo_k / 20), s(hi_k / 20)),
                             atol=0.01)


def test_a_95_percent_interval_cuts_2_5_percent_from_each_tail():
  """With an exact judge the observed share's bootstrap is binomial: its 95% interval is
  p +- 1.96 sd (a 90% one would be +- 1.64 sd), and the corrected one is that divided by Se+Sp-1."""
  n, k, sens, spec = 40_000, 12_000, 0.9, 0.8
  r = rates.corrected_rate(k, n, sens=sens, spec=spec, n_val_pos=0, n_val_neg=0,
                           bootstrap=20_000, seed=1)
  sd = math.sqrt(0.3 * 0.7 / n)
  half = lambda ci: (ci[1] - ci[0]) / 2
  assert half(r["raw_ci"]) == pytest.approx(1.959964 * sd, rel=0.04)
  assert half(r["corrected_ci"]) == pytest.approx(1.959964 * sd / (sens + spec - 1), rel=0.04)
  r90 = rates.corrected_rate(k, n, sens=sens, spec=spec, n_val_pos=0, n_val_neg=0, level=0.9,
                             bootstrap=20_000, seed=1)
  assert half(r90["raw_ci"]) == pytest.approx(1.644854 * sd, rel=0.04)

"""The audit set (our model's answers labelled by reading): schema, halves, agreement figures,
and that no audit prompt is trained on or used by the default evaluation."""

from __future__ import annotations

import json

import pytest

from safemoe_jax.judging import audit as A
from safemoe_jax.data.sources import prompt_key


def test_cohen_kappa_matches_a_hand_computed_case():
  a = ["h", "h", "h", "r", "r", "s", "s", "s", "s", "h"]
  b = ["h", "h", "r", "r", "r", "s", "s", "h", "s", "h"]
  # p_o = 8/10; p_e = (4*4 + 2*3 + 4*3) / 100 = 0.34; kappa = (0.8 - 0.34) / 0.66
  assert A.cohen_kappa(a, b) == pytest.approx((0.8 - 0.34) / 0.66)
  assert A.cohen_kappa(a, a) == 1.0
  with pytest.raises(A.AuditError):
    A.cohen_kappa(a, b[:-1])


def test_halves_are_by_prompt_and_stable():
  assert A.half_of("Some Prompt  text") == A.half_of("some prompt text")
  halves = [A.half_of(f"placeholder prompt {i}") for i in range(400)]
  assert 150 < halves.count("test") < 250


@pytest.fixture(scope="module")
def audit_set():
  return A.load()


def test_audit_set_schema_labels_and_halves(audit_set):
  rows = audit_set.rows
  assert len(rows) >= 400
  assert all(r["label"] in A.LABELS for r in rows)
  by_prompt: dict = {}
  for r in rows:
    by_prompt.setdefault(r["prompt_id"], []).append(r)
  for pid, rs in by_prompt.items():  # every prompt answered by every system, in one half
    assert sorted(r["system"] for r in rs) == sorted(A.SYSTEMS), pid
    assert len({r["half"] for r in rs}) == 1 and rs[0]["half"] == A.half_of(rs[0]["prompt"])
  test = audit_set.half("test")
  assert 0.35 < len(test) / len(rows) < 0.65
  for half in ("calibration", "test"):  # both classes of the binary view in each half
    hs = {A.harmful_or_not(r["label"]) for r in audit_set.half(half)}
    assert {"harmful", "not_harmful"} <= hs
  blind = A.read_jsonl(A.AUDIT_DIR / "blind.jsonl")
  assert [b["pair_id"] for b in blind] == [r["pair_id"] for r in rows]
  assert all("system" not in b for b in blind)


def test_agreement_figures_are_the_ones_recorded(audit_set):
  rec = json.loads((A.AUDIT_DIR / "agreement.json").read_text())
  now = A.agreement()
  assert rec == {k: v for k, v in now.items() if k != "disagreements"}
  final = A.read_labels(A.AUDIT_DIR / "labels_final.jsonl")
  p1 = A.read_labels(A.AUDIT_DIR / "labels_pass1.jsonl")
  p2 = A.read_labels(A.AUDIT_DIR / "labels_pass2.jsonl")
  for pid in final:  # where the passes agree, that is the final label
    if p1[pid] == p2[pid]:
      assert final[pid] == p1[pid], pid


def test_no_audit_prompt_is_trained_on_or_in_the_default_evaluation(audit_set):
  from safemoe_jax.data import config as data_cfg
  from safemoe_jax.data import encode as data_encode
  from safemoe_jax.data import records as data_records
  from safemoe_jax.data import select as data_select
  from safemoe_jax.evaluation import benchmarks as EB
  from safemoe_jax.evaluation import config as EC
  cfg = data_cfg.data_config()
  records, report = data_records.load_records(cfg)
  sets = data_select.select(records, cfg, report)
  audit = {prompt_key(r["prompt"]) for r in audit_set.rows}
  trained = {prompt_key(r["prompt"]) for part in (sets.phase1, sets.phase2)
             for rs in part.values() for r in rs}
  judge = {prompt_key(r["prompt"]) for r in sets.judge}
  assert trained and judge and not audit & trained and not audit & judge
  data = data_encode.Data(cfg, sets, {}, {}, 0)
  evaluated = {prompt_key(p.text) for b in EB.benchmarks_from_data(data, EC.EvalConfig())
               for p in b.prompts}
  assert evaluated and not audit & evaluated

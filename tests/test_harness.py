"""The test machinery itself: mutation entries still apply, and missing prerequisites fail in CI."""

from __future__ import annotations

import dataclasses

import pytest

from tests import prereq
from tests.mutations import run
from tests.mutations.mutations import MUTATIONS


def test_every_mutation_applies_once_and_names_existing_tests():
  assert len({m.id for m in MUTATIONS}) == len(MUTATIONS)
  for m in MUTATIONS:
    assert run.check(m) != (run.ROOT / m.file).read_text(), m.id
    for t in m.tests:
      path, _, name = t.partition("::")
      assert (run.ROOT / path).is_file(), (m.id, t)
      assert not name or f"def {name.split('[')[0]}(" in (run.ROOT / path).read_text(), (m.id, t)
  m = MUTATIONS[0]
  with pytest.raises(run.MutationError, match="occurs 0 times"):
    run.check(dataclasses.replace(m, pattern="no such text in the file"))
  with pytest.raises(run.MutationError, match=r"occurs \d\d+ times"):
    run.check(dataclasses.replace(m, pattern="\n"))


def test_a_missing_prerequisite_skips_here_and_fails_in_ci(monkeypatch):
  monkeypatch.setenv("CI", "")
  with pytest.raises(pytest.skip.Exception, match="no widget"):
    prereq.missing("no widget")
  monkeypatch.setenv("CI", "true")
  with pytest.raises(pytest.fail.Exception, match="no widget.*CI=true"):
    prereq.missing("no widget")
  with pytest.raises(pytest.fail.Exception, match="no_such_module_xyz"):
    prereq.require_module("no_such_module_xyz")


def test_ci_sample_rotates_through_every_fast_entry():
  assert run.is_fast("tests/test_steps.py::test_masked_ce_equals_a_numpy_reference")
  assert not run.is_fast("tests/test_train.py::test_mid_phase_checkpoint_resumes_at_its_step")
  assert not run.is_fast("tests/test_multihost.py")  # a whole file with slow tests in it
  fast = [m for m in MUTATIONS if all(run.is_fast(t) for t in m.tests)]
  assert len(fast) >= 0.75 * len(MUTATIONS)  # most entries can come round in CI
  seen: dict[str, set[int]] = {}
  for c in range(400):  # 400 "commits"
    s = run.ci_sample(MUTATIONS, 4, f"{c:040x}")
    assert 1 <= len(s) <= 4 and all(m in fast for m in s)
    assert s == run.ci_sample(MUTATIONS, 4, f"{c:040x}")  # the same commit, the same sample
    for m in s:
      seen.setdefault(m.id, set()).add(c)
  assert seen.keys() == {m.id for m in fast}  # every fast entry comes round
  assert run.ci_sample(MUTATIONS, 4, "a") != run.ci_sample(MUTATIONS, 4, "b")

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

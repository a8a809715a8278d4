"""Missing test prerequisites: skipped on a developer's machine, a failure in CI.

A test that needs something this machine may lack (a downloaded wheel, the test extra's torch)
calls `missing(reason)`. With CI=true in the environment (GitHub Actions, GitLab and most CI
systems set it) that fails the test, so a broken download or install cannot turn a parity
check into a quiet skip; elsewhere it skips with the reason.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
  return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> NoReturn:
  if in_ci():
    pytest.fail(f"{reason} (CI=true: a missing prerequisite is a failure, not a skip)",
                pytrace=False)
  pytest.skip(reason, allow_module_level=True)  # also at import time of a test module


def require_module(name: str) -> ModuleType:
  """`pytest.importorskip`, but a failure under CI=true."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    missing(f"{name} is not importable ({e}); install the test extra: pip install -e '.[test]'")

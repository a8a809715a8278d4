"""Apply one mutation at a time to a copy of the repository and run the tests that must catch it.

A mutation is caught when pytest exits with status 1 (a test failed). Status 0 means the tests
let the bug through ("survived"); any other status (collection error, no tests) is "broken",
because a mutation that does not even import proves nothing about the tests.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.mutations.mutations import MUTATIONS, Mutation

ROOT = Path(__file__).resolve().parents[2]


class MutationError(ValueError):
  pass


def check(m: Mutation, root: Path = ROOT) -> str:
  """The mutated text of m.file; the pattern must occur exactly once and differ from the
  replacement, so an entry cannot silently stop applying after the code changes."""
  path = root / m.file
  if not path.is_file():
    raise MutationError(f"{m.id}: {m.file} does not exist")
  text = path.read_text()
  n = text.count(m.pattern)
  if n != 1:
    raise MutationError(f"{m.id}: pattern occurs {n} times in {m.file} (must be exactly once):\n"
                        f"{m.pattern}")
  if m.pattern == m.replacement:
    raise MutationError(f"{m.id}: replacement equals the pattern")
  if not m.tests:
    raise MutationError(f"{m.id}: names no tests")
  return text.replace(m.pattern, m.replacement)


@functools.lru_cache(maxsize=None)
def is_fast(test: str, root: Path = ROOT) -> bool:
  """Whether a test id runs in the fast tier, read from its source: no `pytest.mark.slow` on the
  module, and none among the decorators right above the test function (for a whole file: none in
  it at all). A parametrised case marked slow by itself counts as slow too."""
  path, _, name = test.partition("::")
  text = (root / path).read_text()
  if re.search(r"^pytestmark\b.*slow", text, re.M):
    return False
  if not name:
    return "mark.slow" not in text
  name = name.split("[")[0]
  m = re.search(rf"^def {re.escape(name)}\(", text, re.M)
  if m is None:
    raise MutationError(f"{test}: no test function {name} in {path}")
  head = text[:m.start()].rsplit("\n\n", 1)[-1]  # its decorators: back to the blank line before
  body = text[m.end():].split("\n\n\n", 1)[0]
  return "mark.slow" not in head and "marks=pytest.mark.slow" not in body


def ci_sample(mutations: list[Mutation], n: int, key: str) -> list[Mutation]:
  """n entries whose named tests are all fast, chosen by `key` (CI passes the commit hash).

  The fast entries are dealt into ceil(F / n) groups (entry i into group i % groups) and the key's
  hash picks one group, so consecutive commits rotate through the whole harness: with G groups a
  given entry is left out of c commits in a row with probability (1 - 1/G)^c."""
  fast = [m for m in mutations if all(is_fast(t) for t in m.tests)]
  if not fast or n < 1:
    return []
  groups = math.ceil(len(fast) / n)
  g = int(hashlib.sha256(key.encode()).hexdigest(), 16) % groups
  return fast[g::groups]


def repo_files(root: Path = ROOT) -> list[str]:
  """Tracked files plus untracked ones git does not ignore (the working tree as it is)."""
  out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                       capture_output=True, check=True).stdout.decode()
  return [f for f in out.split("\0") if f and (root / f).is_file()]


def copy_repo(dst: Path, root: Path = ROOT) -> None:
  for f in repo_files(root):
    (dst / f).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / f, dst / f)


def pytest_in_copy(workdir: Path, tests: list[str], pytest_args: list[str],
                   mutation: Mutation | None = None) -> tuple[int, float, str]:
  """Copy the repository to workdir, apply `mutation` (if any), run `tests` there with -x:
  (pytest's exit status, seconds, its output)."""
  shutil.rmtree(workdir, ignore_errors=True)
  workdir.mkdir(parents=True)
  copy_repo(workdir)
  if mutation is not None:
    (workdir / mutation.file).write_text(check(mutation))
  env = dict(os.environ, PYTHONPATH=str(workdir), PYTHONDONTWRITEBYTECODE="1")
  t0 = time.perf_counter()
  # -m "": both test tiers (a named test may be in the slow one).
  proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "--tb=short", "-rfs",
                         "-p", "no:cacheprovider", "-m", "", *pytest_args, *tests], cwd=workdir,
                        env=env, capture_output=True, text=True)
  return proc.returncode, time.perf_counter() - t0, proc.stdout + proc.stderr


def run_one(m: Mutation, workdir: Path, pytest_args: list[str]) -> tuple[str, float, str]:
  """(caught | survived | broken, seconds, pytest's output)."""
  rc, dt, out = pytest_in_copy(workdir, list(m.tests), pytest_args, m)
  return {0: "survived", 1: "caught"}.get(rc, "broken"), dt, out


def failure_lines(output: str) -> list[str]:
  """The failing test and the first lines of its error, from pytest's -rf/--tb=short output."""
  failed = [l for l in output.splitlines() if l.startswith("FAILED ")]
  errors = [l for l in output.splitlines() if l.startswith("E ")]
  return [f[:200] for f in failed] + [e[:200] for e in errors[:2]]


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m tests.mutations", description=__doc__)
  ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutation ids")
  ap.add_argument("--list", action="store_true", help="list the mutations and exit")
  ap.add_argument("--check", action="store_true",
                  help="only check that every pattern applies (exactly once); run nothing")
  ap.add_argument("--no-baseline", action="store_true",
                  help="skip the first run of the named tests without any mutation (which must "
                       "pass with no skips, or a failure under a mutation would prove nothing)")
  ap.add_argument("--ci-sample", type=int, metavar="N",
                  help="run N entries whose named tests are all in the fast tier, chosen by "
                       "--key (CI: a rotating sample; see ci_sample)")
  ap.add_argument("--key", default=None,
                  help="what picks the --ci-sample entries (default: `git rev-parse HEAD`)")
  ap.add_argument("-v", "--verbose", action="store_true", help="print pytest's output tail")
  ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
  a = ap.parse_args(argv)
  chosen = MUTATIONS
  if a.only:
    unknown = set(a.only) - {m.id for m in MUTATIONS}
    if unknown:
      ap.error(f"unknown mutation id(s) {sorted(unknown)}; see --list")
    chosen = [m for m in MUTATIONS if m.id in a.only]
  if a.ci_sample is not None:
    key = a.key or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.strip()
    chosen = ci_sample(chosen, a.ci_sample, key)
    print(f"CI sample of {len(chosen)} fast entries for {key[:12]}: "
          f"{', '.join(m.id for m in chosen)}", flush=True)
  if a.list:
    for m in chosen:
      print(f"{m.id:28s} {m.file}: {m.why}")
    return 0
  try:
    for m in chosen:
      check(m)
  except MutationError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if a.check:
    print(f"{len(chosen)} mutations apply cleanly")
    return 0
  results = []
  with tempfile.TemporaryDirectory(prefix="safemoe_mutation_") as tmp:
    if not a.no_baseline:
      tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
      rc, dt, out = pytest_in_copy(Path(tmp) / "repo", tests, a.pytest_args)
      skipped = [l for l in out.splitlines() if l.startswith("SKIPPED")]
      print(f"{'BASELINE':9s} {'(no mutation)':28s} {dt:6.0f} s  {len(tests)} test ids: "
            + ("pass" if rc == 0 and not skipped else "FAILED or SKIPPED"), flush=True)
      if rc != 0 or skipped:
        print("  " + out[-3000:].strip().replace("\n", "\n  "), flush=True)
        print("error: the tests must pass, with no skips, before mutations can be judged",
              file=sys.stderr)
        return 2
    for m in chosen:
      status, dt, tail = run_one(m, Path(tmp) / "repo", a.pytest_args)
      results.append((m, status))
      print(f"{status.upper():9s} {m.id:28s} {dt:6.0f} s  {m.why}", flush=True)
      if a.verbose or status == "broken":
        print("  " + tail[-3000:].strip().replace("\n", "\n  "), flush=True)
      elif status == "caught":
        print("".join(f"    {l}\n" for l in failure_lines(tail)), end="", flush=True)
      else:
        print(f"    the tests passed: {tail.strip().splitlines()[-1]}", flush=True)
  bad = [m.id for m, s in results if s != "caught"]
  print(f"{len(results) - len(bad)}/{len(results)} mutations caught"
        + (f"; not caught: {', '.join(bad)}" if bad else ""))
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())

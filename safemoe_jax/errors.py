"""One error base class for the package, and the one place a command turns it into a line.

Every error meant for a person (bad config, unusable data, a file that cannot be read or
written, a judge that cannot run) derives from `SafeMoEError`. Each command's `main` is wrapped
in `cli`, which prints such an error as one `error: ...` line on stderr and returns 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Sequence


class SafeMoEError(Exception):
  """An error for people: what was expected, what was found, and how to fix it."""


def message(e: BaseException) -> str:
  """The error as one line (a multi-line message is joined with ' | ')."""
  text = str(e) if not isinstance(e, OSError) or not e.filename else (
      f"{e.strerror or e}: {e.filename}")
  return " | ".join(l.strip() for l in text.splitlines() if l.strip()) or type(e).__name__


def cli(fn: Callable[..., int | None]) -> Callable[..., int]:
  """Wraps a command's `main(argv) -> int`: a SafeMoEError (or an OSError from the file system)
  becomes one `error: ...` line on stderr and exit status 2."""

  @functools.wraps(fn)
  def main(argv: Sequence[str] | None = None) -> int:
    try:
      return fn(argv) or 0
    except (SafeMoEError, OSError) as e:
      sys.stdout.flush()
      print(f"error: {message(e)}", file=sys.stderr, flush=True)
      return 2

  return main

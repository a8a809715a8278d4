"""Logging for the package: the standard library's `logging`, set up once.

Every module logs through `get_logger(__name__)`. The package logger `safemoe_jax` gets one
handler that prints `[<part>] message` to the stderr of the moment (so redirections and pytest's
capture see it), at INFO by default (`SAFEMOE_LOG_LEVEL=WARNING` quiets it). Records do not
propagate to the root logger: libraries imported alongside (some call `logging.basicConfig`)
would print every line a second time; add a handler to the `safemoe_jax` logger to route them
elsewhere.
<part> is the subpackage (`train`, `data`, `evaluation`, ...) or, under `tools`, the tool.
In a multi-process run only process 0 prints INFO records (`set_process_index`).
"""

from __future__ import annotations

import logging
import os
import sys

PACKAGE = "safemoe_jax"
_process_index = 0


class _StderrHandler(logging.Handler):
  """Writes each record to sys.stderr as it is when the record is emitted."""

  def emit(self, record: logging.LogRecord) -> None:
    if record.levelno < logging.WARNING and _process_index != 0:
      return
    try:
      sys.stderr.write(self.format(record) + "\n")
      sys.stderr.flush()
    except Exception:  # noqa: BLE001 - logging must never end the program
      self.handleError(record)


def part(name: str) -> str:
  """'safemoe_jax.train.loop' -> 'train'; 'safemoe_jax.tools.bench' -> 'bench'."""
  parts = name.split(".")[1:] or [name]
  return parts[1] if parts[0] == "tools" and len(parts) > 1 else parts[0]


class _Formatter(logging.Formatter):
  def format(self, record: logging.LogRecord) -> str:
    prefix = "WARNING: " if record.levelno == logging.WARNING else ""
    return f"[{part(record.name)}] {prefix}{record.getMessage()}"


def setup() -> logging.Logger:
  """The package logger with its handler (idempotent)."""
  logger = logging.getLogger(PACKAGE)
  if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
    h = _StderrHandler()
    h.setFormatter(_Formatter())
    logger.addHandler(h)
    logger.setLevel(os.environ.get("SAFEMOE_LOG_LEVEL", "INFO").upper())
    logger.propagate = False
  return logger


def get_logger(name: str) -> logging.Logger:
  setup()
  return logging.getLogger(name)


def set_process_index(i: int) -> None:
  """Only process 0 of a multi-process run prints INFO records; warnings come from all."""
  global _process_index
  _process_index = i

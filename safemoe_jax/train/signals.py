"""Preemption: SIGTERM (schedulers, TPU maintenance) becomes a flag the training loop checks
every step, agreed across processes; `Preempted` ends a run that stopped on it."""

from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

from safemoe_jax.log import get_logger

log = get_logger(__name__)


class Preempted(Exception):
  pass


class SignalGuard:
  """Turns SIGTERM (schedulers, TPU maintenance) into a flag the loop checks every step. With
  several processes `stop()` agrees on it: one process signalled stops them all at one step."""

  def __init__(self):
    self.flag = False  # agreed by stop() across processes
    self.own = False  # this process got the signal

  def __enter__(self):
    self.prev = signal.signal(signal.SIGTERM, self._handler)
    return self

  def _handler(self, *_):
    self.flag = self.own = True
    log.info("SIGTERM: writing a checkpoint and exiting")

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self.prev)

  def stop(self) -> bool:
    """Whether any process got SIGTERM. Every process must call it at the same point: with
    several, it is one tiny all-gather of the flags (a few bytes per step)."""
    if jax.process_count() > 1:
      self.flag = bool(np.max(multihost_utils.process_allgather(np.int32(self.flag))))
    return self.flag

"""Where a run's outputs may live: a local folder, or any location `etils.epath` (and so Orbax)
can write, such as gs://bucket/run on Cloud Storage.

Local folders keep every local guarantee (atomic renames, the flock, appends). Object stores have
no rename, no append and no locks, so there: a file is written whole (an object write is atomic),
append-only logs are kept in memory and rewritten whole every `RemoteAppend.interval` seconds and
at close, and there is no lock (one trainer per output_dir is up to the user).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import time
from pathlib import Path

from etils import epath

from safemoe_jax.errors import SafeMoEError
from safemoe_jax.log import get_logger

log = get_logger(__name__)

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
  """False for a URL-like location (gs://, s3://, ...)."""
  return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", os.fspath(path)) is None


def as_path(path: PathLike) -> Path:
  """A pathlib.Path for a local folder, an epath.Path (same API) for anything else."""
  return Path(os.fspath(path)) if is_local(path) else epath.Path(os.fspath(path))


# What each object store needs beyond fsspec (module, pip package): epath writes through
# fsspec's filesystem for the scheme; Orbax talks to Cloud Storage through google-cloud-storage.
BACKENDS = {"gs": (("gcsfs", "gcsfs"), ("google.cloud.storage", "google-cloud-storage")),
            "s3": (("s3fs", "s3fs"),), "az": (("adlfs", "adlfs"),)}
EXTRA = "pip install 'safemoe_jax[tpu]' (or '[gpu]')"


class PathError(SafeMoEError, ValueError):
  """A location this installation cannot write."""


def require_backend(path: PathLike, what: str = "output_dir") -> None:
  """One clear error, before anything runs, when `path` is on storage whose client library is
  not installed (a fresh `pip install safemoe_jax` has no gcsfs: gs:// ended in an ImportError)."""
  if is_local(path) or "://" not in os.fspath(path):  # no scheme: a folder of this machine
    return
  scheme = os.fspath(path).split("://", 1)[0].lower()
  if scheme not in (*BACKENDS, "hf"):
    raise PathError(f"{what}={os.fspath(path)}: {scheme}:// is not a location epath can write "
                    f"(supported: a local folder, gs://, s3://, az://, hf://)")
  missing = [pkg for mod, pkg in BACKENDS.get(scheme, ()) if not _importable(mod)]
  if missing:
    fix = f"{EXTRA}, or pip install {' '.join(missing)}" if scheme == "gs" else \
        f"pip install {' '.join(missing)}"
    raise PathError(f"{what}={os.fspath(path)} needs {' and '.join(missing)}, which "
                    f"{'is' if len(missing) == 1 else 'are'} not installed: {fix}")


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # a missing parent package (google)
    return False


def absolute(path: Path) -> Path:
  return path.absolute() if is_local(path) else path


class RemoteAppend:
  """An append-only text log on storage without appends: the whole object is rewritten at most
  every `interval` seconds and at flush/close. A torn last line found on open is dropped."""

  interval = 30.0

  def __init__(self, path: PathLike):
    self.path = epath.Path(os.fspath(path))
    text = self.path.read_text() if self.path.exists() else ""
    if text and not text.endswith("\n"):
      log.warning(f"{self.path}: removed a torn last line")
      text = text[:text.rfind("\n") + 1]
    # -inf, not 0: monotonic time starts at an arbitrary point (on Linux, boot), so a machine up
    # for less than `interval` seconds would otherwise hold back the first write.
    self.text, self.dirty, self.last = text, False, -math.inf

  def write(self, s: str) -> int:
    self.text += s
    self.dirty = True
    if time.monotonic() - self.last >= self.interval:
      self.flush()
    return len(s)

  def flush(self) -> None:
    if self.dirty:
      self.path.write_text(self.text)
      self.dirty, self.last = False, time.monotonic()

  def close(self) -> None:
    self.flush()

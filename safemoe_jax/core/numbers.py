"""One validation pass for every number a command takes (issue 32).

`check(cfg, ranges)` walks a configuration dataclass (nested ones too) and checks each int or
float field: finite (no NaN, no +-inf), representable where it goes (ints within int32, floats
within float32: JAX's default types), and inside its range, which is `>= 0` unless `ranges`
names the field (dotted, e.g. "top_p" or "phase1.lr"). `check_value` does the same for one flag
that is not a field (export's --weights). Errors name the field, the range and the value.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from safemoe_jax.core.config import ConfigError

INT_MAX = 2 ** 31 - 1  # JAX's default integer is int32
FLOAT_MAX = 3.4028234663852886e38  # float32's largest finite value


@dataclasses.dataclass(frozen=True)
class Range:
  """lo <= x <= hi (open ends with lo_open / hi_open); None = unbounded on that side."""
  lo: float | None = 0
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False

  def __contains__(self, x: float) -> bool:
    ok_lo = self.lo is None or (x > self.lo if self.lo_open else x >= self.lo)
    ok_hi = self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)
    return ok_lo and ok_hi

  def text(self) -> str:
    if self.hi is None:
      return "any number" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo:g}"
    if self.lo is None:
      return f"{'<' if self.hi_open else '<='} {self.hi:g}"
    return (f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
            f"{')' if self.hi_open else ']'}")


NONNEG = Range(0)
POSITIVE = Range(0, lo_open=True)
ANY = Range(None)
UNIT = Range(0, 1)  # a fraction or probability
TOP_P = Range(0, 1, lo_open=True)  # nucleus mass: (0, 1]


def check_value(name: str, x: Any, rng: Range = NONNEG, err: type[Exception] = ConfigError,
                integer: bool | None = None) -> None:
  """One number: finite, within int32 / float32, in `rng`."""
  if isinstance(x, bool) or not isinstance(x, (int, float)):
    return
  integer = isinstance(x, int) if integer is None else integer
  limit = INT_MAX if integer else FLOAT_MAX
  if not math.isfinite(x) or abs(x) > limit or x not in rng:
    raise err(f"{name} must be {rng.text()}"
              + (f" (and finite, at most {limit:g} in magnitude)" if rng.hi is None else
                 " (and finite)") + f", got {x!r}")


def check(cfg: Any, ranges: dict[str, Range] | None = None, err: type[Exception] = ConfigError,
          prefix: str = "", names: dict[str, str] | None = None) -> None:
  """Every int/float field of dataclass `cfg` (recursively) and every number in a dict field
  (e.g. counts): finite, within int32 / float32, and in its range (default >= 0). `names`
  shows a field under another name (a flag: {"top_p": "--top-p"})."""
  ranges, names = ranges or {}, names or {}
  hints = typing.get_type_hints(type(cfg))
  for f in dataclasses.fields(cfg):
    key, v = prefix + f.name, getattr(cfg, f.name)
    shown = names.get(key, key)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
      check(v, ranges, err, key + ".", names)
    elif isinstance(v, dict):
      for k, x in v.items():
        check_value(f"{shown}.{k}", x, ranges.get(f"{key}.{k}", ranges.get(key, NONNEG)), err)
    elif isinstance(v, (tuple, list)):
      for i, x in enumerate(v):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):  # data.sources[i]
          check(x, ranges, err, f"{key}[{i}].", names)
        else:
          check_value(shown, x, ranges.get(key, NONNEG), err)
    elif hints.get(f.name) in (int, float, "int", "float"):
      check_value(shown, v, ranges.get(key, NONNEG), err, integer=hints[f.name] in (int, "int"))

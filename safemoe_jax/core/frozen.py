"""Immutable, hashable containers for config values.

A frozen dataclass is a value: jit static arguments, nnx graph definitions and cache keys hash
it. A `dict` field (e.g. Llama-3's `rope_scaling`) makes the whole config unhashable, so every
mapping in a config is a `FrozenDict` and every list a tuple (`freeze`)."""

from __future__ import annotations

import dataclasses
from typing import Any, NoReturn


class FrozenDict(dict):
  """A dict that cannot change and hashes by its items (values frozen recursively).

  A dict subclass, so it equals the plain dict with the same items, `json.dumps` writes it, and
  `isinstance(x, dict)` code reads it unchanged; `core.config.to_dict` turns it back into a dict
  for YAML."""

  def __init__(self, *args: Any, **kwargs: Any) -> None:
    super().__init__((k, freeze(v)) for k, v in dict(*args, **kwargs).items())

  def __hash__(self) -> int:  # type: ignore[override]
    return hash(frozenset(self.items()))

  def _immutable(self, *args: Any, **kwargs: Any) -> NoReturn:
    raise TypeError(f"a FrozenDict cannot change (config values are immutable); build a new one: "
                    f"FrozenDict({{**d, key: value}})")

  __setitem__ = __delitem__ = __ior__ = _immutable  # type: ignore[assignment]
  clear = pop = popitem = setdefault = update = _immutable  # type: ignore[assignment]

  def __reduce__(self) -> tuple:  # pickle / copy rebuild it through __init__
    return (FrozenDict, (dict(self),))

  def __repr__(self) -> str:
    return f"FrozenDict({dict.__repr__(self)})"


def freeze(value: Any) -> Any:
  """`value` with every dict made a FrozenDict, every list a tuple, every set a frozenset."""
  if isinstance(value, FrozenDict):
    return value
  if isinstance(value, dict):
    return FrozenDict(value)
  if isinstance(value, (list, tuple)):
    return tuple(freeze(v) for v in value)
  if isinstance(value, (set, frozenset)):
    return frozenset(freeze(v) for v in value)
  return value


def freeze_fields(obj: Any) -> None:
  """In a frozen dataclass's __post_init__: freeze every mapping/list/set field in place, so
  `SourceConfig(columns={...})` built in code is as hashable as one read from YAML."""
  for f in dataclasses.fields(obj):
    v = getattr(obj, f.name)
    if isinstance(v, (dict, list, set)) and not isinstance(v, FrozenDict):
      object.__setattr__(obj, f.name, freeze(v))


class Frozen:
  """Base of frozen config dataclasses with mapping fields: freezes them after __init__."""

  def __post_init__(self) -> None:
    freeze_fields(self)

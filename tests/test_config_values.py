"""Configs are values: every frozen dataclass of the package hashes with every field filled (jit
static arguments, nnx graph definitions and cache keys hash them), cannot be changed in place,
and survives the YAML / override round trip unchanged."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pickle
import pkgutil
import types
import typing
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import yaml

import safemoe_jax
from safemoe_jax.core import config as C
from safemoe_jax.core.frozen import FrozenDict
from safemoe_jax.io import weights as W
from tests.fixtures.families import REAL_CONFIGS


def _frozen_dataclasses() -> list[type]:
  found = {}
  for m in pkgutil.walk_packages(safemoe_jax.__path__, "safemoe_jax."):
    if m.name.endswith("__main__"):
      continue
    mod = importlib.import_module(m.name)
    for v in vars(mod).values():
      if (isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == mod.__name__
          and v.__dataclass_params__.frozen):
        found[f"{v.__module__}.{v.__qualname__}"] = v
  return [found[k] for k in sorted(found)]


FROZEN = _frozen_dataclasses()


def _value(tp: Any, default: Any, depth: int = 0) -> Any:
  """A realistic value of type `tp` that differs from `default`; mappings and lists nested, as
  YAML gives them (a config's `columns`, `rope_scaling`, experiment `variants`)."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if origin is Literal:
    return next((a for a in args if a != default), args[0])
  if origin in (typing.Union, types.UnionType):
    return _value(next(a for a in args if a is not type(None)), default, depth)
  if origin is tuple:
    inner = args[0] if args else str
    if args and args[-1] is not Ellipsis:
      return tuple(_value(a, None, depth + 1) for a in args)
    return tuple(_value(inner, None, depth + 1) for _ in range(2))
  if tp in (dict, FrozenDict) or origin is dict:
    return {"first": ["a", "b"], "second": {"nested": [1, 2.5]}, "third": "x"}
  if dataclasses.is_dataclass(tp):
    return _filled(tp) if depth < 3 else tp()
  if tp is bool:
    return not default if isinstance(default, bool) else True
  if tp is int:
    return (default or 0) + 3
  if tp is float:
    return (default or 0.0) + 0.25
  if tp is str:
    return f"{default or 'value'}_x"
  if tp is Path:
    return Path("/data/model-00001-of-00004.safetensors")
  if tp is np.dtype:
    return np.dtype("float32") if default != np.dtype("float32") else np.dtype("float16")
  raise AssertionError(f"no test value for a field of type {tp!r}: add one here")


def _filled(cls: type) -> Any:
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for f in dataclasses.fields(cls):
    default = f.default if f.default is not dataclasses.MISSING else None
    kwargs[f.name] = _value(hints[f.name], default)
  return cls(**kwargs)


@pytest.mark.parametrize("cls", FROZEN, ids=lambda c: c.__qualname__)
def test_every_frozen_dataclass_hashes_with_every_field_filled(cls):
  obj = _filled(cls)
  assert hash(obj) == hash(_filled(cls)) and obj == _filled(cls)
  assert hash(cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})) == hash(obj)
  for f in dataclasses.fields(cls):  # no field holds anything that can change in place
    v = getattr(obj, f.name)
    assert not isinstance(v, (list, set)) and (not isinstance(v, dict)
                                                or isinstance(v, FrozenDict)), (f.name, v)
  assert pickle.loads(pickle.dumps(obj)) == obj


def test_the_walk_found_the_config_classes():
  names = {c.__qualname__ for c in FROZEN}
  assert {"ModelConfig", "TrainConfig", "SourceConfig", "Kind", "EvalConfig",
          "ExperimentConfig", "DataConfig", "RouterConfig"} <= names, names


@pytest.mark.parametrize("family", sorted(REAL_CONFIGS))
def test_real_family_configs_hash_and_round_trip_through_yaml(family):
  cfg = W.config_from_hf(REAL_CONFIGS[family])
  hash(cfg)
  back = C.from_dict(C.ModelConfig, yaml.safe_load(yaml.safe_dump(C.to_dict(cfg))))
  assert back == cfg and hash(back) == hash(cfg)
  # run.json stores the model config as JSON: the same value comes back
  assert C.from_dict(C.ModelConfig, json.loads(json.dumps(C.to_dict(cfg)))) == cfg
  if "rope_scaling" in REAL_CONFIGS[family]:
    assert cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.rope_scaling == REAL_CONFIGS[family]["rope_scaling"]  # equal to the plain dict


def test_mappings_from_yaml_overrides_and_code_are_frozen(tmp_path):
  d = C.apply_overrides({}, ["rope_scaling={rope_type: llama3, factor: 8.0, low_freq_factor: 1.0,"
                             " high_freq_factor: 4.0, original_max_position_embeddings: 8192}"])
  cfg = C.from_dict(C.ModelConfig, d)
  assert isinstance(cfg.rope_scaling, FrozenDict) and hash(cfg)
  direct = C.ModelConfig(rope_scaling=dict(d["rope_scaling"]))  # a plain dict given in code
  assert isinstance(direct.rope_scaling, FrozenDict) and direct == cfg
  assert hash(dataclasses.replace(cfg, rope_scaling={"rope_type": "linear", "factor": 2.0}))
  with pytest.raises(TypeError, match="cannot change"):
    cfg.rope_scaling["factor"] = 2.0
  with pytest.raises(TypeError, match="cannot change"):
    cfg.rope_scaling.update(factor=2.0)
  from safemoe_jax.train.config import load_config
  src = {"name": "s", "kind": "local", "path": "x.jsonl", "columns": {"prompt": "q"},
         "labels": {"tags": ["a", "b"]}}
  tcfg = load_config(None, [f"data.sources={json.dumps([src])}"])
  hash(tcfg)
  assert tcfg.data.sources[0].labels == {"tags": ("a", "b")}

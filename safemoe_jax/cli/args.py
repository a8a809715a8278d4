"""How every command reads its settings: a configuration dataclass, optionally a YAML file
(`--config`), then `key.sub=value` overrides (values parsed as YAML), then the command's own
flags; `--print-config` prints the resolved configuration as YAML and exits, and `--help` lists
every field with its default."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Sequence

import yaml

from safemoe_jax.core.config import apply_overrides, from_dict, load_yaml, to_dict


def _type_name(tp: Any) -> str:
  name = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else None
  return name or str(tp).replace("typing.", "")


def fields_help(cls, prefix: str = "", default: Any = None) -> list[str]:
  """'key.sub = default  (type)' for every leaf field of dataclass `cls`."""
  default = cls() if default is None else default
  hints = typing.get_type_hints(cls)
  out = []
  for f in dataclasses.fields(cls):
    v = getattr(default, f.name)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
      out += fields_help(type(v), f"{prefix}{f.name}.", v)
      continue
    shown = yaml.safe_dump(to_dict(v), default_flow_style=True, width=10**6).strip()
    shown = shown.removesuffix("\n...").removesuffix("...").strip()
    out.append(f"  {prefix}{f.name} = {shown}  ({_type_name(hints[f.name])})")
  return out


def parser(prog: str, description: str | None, cls=None, *, yaml_config: bool = False,
           overrides: bool = True, **kw) -> argparse.ArgumentParser:
  """An ArgumentParser whose epilog lists `cls`'s fields and defaults, with `--print-config`,
  optionally `--config FILE`, and the positional `key.sub=value` overrides."""
  epilog = None
  if cls is not None:
    epilog = ("settings (key.sub=value on the command line; defaults shown):\n"
              + "\n".join(fields_help(cls)))
  ap = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                               formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
  add_config_args(ap, cls, yaml_config=yaml_config, overrides=overrides)
  return ap


def add_config_args(ap: argparse.ArgumentParser, cls, *, yaml_config: bool = False,
                    overrides: bool = True) -> None:
  if yaml_config:
    ap.add_argument("--config", default=None, help="YAML file (`base: other.yaml` inherits)")
  if cls is not None:
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved settings as YAML and exit")
  if overrides and cls is not None:
    add_overrides(ap)


def add_overrides(ap: argparse.ArgumentParser) -> None:
  """The positional `key.sub=value` settings (after any other positional argument)."""
  ap.add_argument("overrides", nargs="*", metavar="key.sub=value",
                  help="settings (the list below)")


def build(cls, overrides: Sequence[str] = (), *, config: str | None = None,
          base: dict | None = None, flags: dict | None = None, section: str = "") -> Any:
  """cls from: `base` (e.g. defaults to merge into), the YAML file, the overrides, then the
  flags given (those not None). `section` picks a YAML file's `section:` mapping when present."""
  d: dict = dict(base or {})
  if config:
    y = load_yaml(config)
    if section and isinstance(y.get(section), dict):
      y = y[section]
    d.update(y)
  apply_overrides(d, [o.removeprefix(f"{section}.") if section else o for o in overrides])
  for k, v in (flags or {}).items():
    if v is not None:
      d[k] = v
  return from_dict(cls, d)


def print_config(cfg: Any) -> int:
  print(yaml.safe_dump(to_dict(cfg), sort_keys=False, width=100), end="")
  return 0

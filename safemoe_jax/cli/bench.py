"""`safemoe bench [eval|aot|load] ...`: speed and memory, as ratios measured in one run
(safemoe_jax/tools/bench.py, bench_eval.py, aot.py, bench_load.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args as cli_args
from safemoe_jax.evaluation.config import DEFAULT_SYSTEMS
from safemoe_jax.tools import aot, bench, bench_eval, bench_load


def main_eval(argv: Sequence[str]) -> int:
  ap = cli_args.parser("safemoe bench eval", description=(
      "The evaluation's generation + judging: one generation per system (old) vs every system "
      "in one pass (new), in one run, on the embedded default's model and data with random "
      "experts and SFT LoRA (or a trained --run). Reports wall time, tokens/s and the answers "
      "that differ."))
  ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS))
  ap.add_argument("--prompts", type=int, default=0,
                  help="about this many prompts, benchmarks cut in proportion (0 = the "
                       "evaluation's default counts)")
  ap.add_argument("--batch-size", type=int, default=None, help="the one pass's batch")
  ap.add_argument("--old-batch-size", type=int, default=16)
  ap.add_argument("--segment", type=int, default=None,
                  help="the one pass's decode segment (0 = no batch halving)")
  ap.add_argument("--max-new-tokens", type=int, default=None)
  ap.add_argument("--paths", default="old,new",
                  help="comma-separated: old, new, new@BATCH (the one pass at another batch)")
  ap.add_argument("--run", default=None, help="a finished training run: its experts, router and "
                  "data (default: the embedded default's data, random experts)")
  ap.add_argument("--out", default="runs/bench/eval.json")
  ap.add_argument("overrides", nargs="*", help="dotted training-config overrides")
  a = ap.parse_args(argv)
  doc = bench_eval.run_eval_bench([s for s in a.systems.split(",") if s], a.prompts, a.batch_size,
                       a.old_batch_size, a.max_new_tokens, a.overrides,
                       [p for p in a.paths.split(",") if p], a.segment, a.run)
  return _write_results(doc, a.out, "eval", argv)


def _ints(s: str) -> tuple[int, ...]:
  return tuple(int(x) for x in s.split(",") if x)


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["aot"]:
    return main_aot(argv[1:])
  if argv[:1] == ["eval"]:
    return main_eval(argv[1:])
  if argv[:1] == ["load"]:
    return main_load(argv[1:])
  ap = cli_args.parser("safemoe bench", description=bench.__doc__)
  ap.add_argument("--model", default="tiny", help="tiny | smollm2 | a .gguf file / HF folder")
  ap.add_argument("--batch", type=int, default=None, help="train batch (default 8)")
  ap.add_argument("--seq", type=int, default=None, help="train length (tiny 64, else 128)")
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--experts", type=_ints, default=(1, 2, 4, 8, 16), help="e.g. 1,2,4,8,16")
  ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (train.py: 0.05)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--repeats", type=int, default=None, help="timed steps per config (5)")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--gen-repeats", type=int, default=None, help="timed generate() calls (3)")
  ap.add_argument("--new-tokens", type=int, default=64)
  ap.add_argument("--only", nargs="+", default=None, help="a subset of the configurations")
  ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                  help="peak RSS of every configuration in its own process (default: on, except "
                       "for the tiny model)")
  ap.add_argument("--peer", default=None, help="a peer's results JSON (same keys as ours) to "
                  "compare against")
  ap.add_argument("--out", default=None, help="JSON output (default runs/bench/<model>.json)")
  ap.add_argument("--profile", default=None, metavar="DIR",
                  help="also trace one run of each configuration with jax.profiler into DIR")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--settings", default=None, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.worker:
    s = bench.Settings(**{k: tuple(v) if isinstance(v, list) else v
                    for k, v in json.loads(a.settings).items()})
    Path(a.result_file).write_text(json.dumps(bench.run_memory_worker(a.worker, s)))
    return 0
  tiny = a.model == "tiny"
  s = bench.Settings(model=a.model, batch=a.batch or 8, seq=a.seq or (64 if tiny else 128),
               rank=a.rank, experts=a.experts, dropout=a.dropout, dtype=a.dtype,
               repeats=a.repeats or 5, warmup=a.warmup, gen_repeats=a.gen_repeats or 3,
               new_tokens=a.new_tokens, matmul_n=1024 if tiny else 2048)
  names = bench.config_names(s)
  if a.only:
    bad = [n for n in a.only if n not in names]
    if bad:
      ap.error(f"unknown configurations {bad}; choose from {names}")
    names = [n for n in names if n in a.only]
  memory = a.memory if a.memory is not None else not tiny
  out = Path(a.out or f"runs/bench/{Path(a.model).stem}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  doc = bench.run_bench(s, names, memory=memory, peer=a.peer, profile_dir=a.profile, out=out)
  doc["command"] = "python -m safemoe_jax bench " + " ".join(argv)
  out.write_text(json.dumps(doc, indent=1, default=str))
  print("\n".join(doc["table"]))
  if doc.get("peer"):
    print("\n| vs peer (same session) | value | met |\n|---|---|---|")
    for r in doc["peer"]:
      print(f"| {r['what']} | {r['ratio']:.2f} | {r.get('met', '')} |")
  print(f"\nresults -> {out}")
  return 0


def main_aot(argv: Sequence[str]) -> int:
  ap = cli_args.parser("safemoe bench aot", description=(
      "Compile the phase-1 and phase-2 train steps ahead of time for TPU topologies on this "
      "host (libtpu compile-only devices; no TPU needed) and report memory per chip."))
  ap.add_argument("--config", default=None, help="YAML under configs/ (e.g. llama31_8b_tpu.yaml)")
  ap.add_argument("--topology", action="append", default=None,
                  help=f"repeatable; default {' '.join(aot.DEFAULT_TOPOLOGIES)}")
  ap.add_argument("--model-config", default=None, help="HF config.json of the base model")
  ap.add_argument("--tiny", action="store_true", help="a tiny model instead (tests)")
  ap.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search")
  ap.add_argument("--slices", type=int, default=1, help="multislice: this many copies of each "
                  "topology joined by DCN (the mesh's data axis crosses them)")
  ap.add_argument("--out", default="runs/bench/aot.json")
  ap.add_argument("overrides", nargs="*", help="dotted config overrides")
  a = ap.parse_args(argv)
  Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  doc = aot.run_aot(a.config, a.overrides, a.topology or aot.DEFAULT_TOPOLOGIES, a.model_config,
                find_max_batch=not a.no_max_batch, tiny=a.tiny, partial=Path(a.out),
                slices=a.slices)
  return _write_results(doc, a.out, "aot", argv)


def main_load(argv: Sequence[str]) -> int:
  ap = cli_args.parser("safemoe bench load", description=bench_load.__doc__)
  ap.add_argument("--dir", default="runs/bench/llama32_1b_random",
                  help="where the random checkpoint is written (about 2.5 GB in bfloat16)")
  ap.add_argument("--devices", type=int, default=8, help="CPU devices; the mesh is fsdp over all")
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--reuse", action="store_true", help="load the checkpoint already in --dir")
  ap.add_argument("--out", default="runs/bench/load.json")
  a = ap.parse_args(argv)
  doc = bench_load.run_load_bench(Path(a.dir), a.devices, a.dtype, write=not a.reuse)
  return _write_results(doc, a.out, "load", argv)


def _write_results(doc: dict, out: str, sub: str, argv: Sequence[str]) -> int:
  """Record the command, write the JSON, print the table: the end of every bench subcommand."""
  doc["command"] = f"python -m safemoe_jax bench {sub} " + " ".join(argv)
  Path(out).parent.mkdir(parents=True, exist_ok=True)
  Path(out).write_text(json.dumps(doc, indent=1, default=str))
  print("\n".join(doc["table"]))
  print(f"\nresults -> {out}")
  return 0

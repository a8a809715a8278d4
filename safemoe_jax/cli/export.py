"""`safemoe export {peft,import,merged} ...`: SafeMoE artifacts to and from the PyTorch / PEFT /
Hub world (safemoe_jax/tools/export/)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args as cli_args
from safemoe_jax.io import assets, jsonio
from safemoe_jax.tools.export import adapters, merged, peft
from safemoe_jax.tools.export.common import ExportError
from safemoe_jax.train.rundir import RunDir


def _split(values: Sequence[str] | None) -> list[str]:
  return [x for v in values or [] for x in v.split(",") if x]


def _weights(text: str | None) -> list[float] | None:
  """--weights 'a,b,...' as numbers (merged.gate_vector checks that they are finite)."""
  if text is None:
    return None
  try:
    return [float(x) for x in text.split(",")]
  except ValueError:
    raise ExportError(f"--weights {text!r} must be comma-separated numbers, one gate per "
                      f"expert, e.g. 0.5,-0.5") from None


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = cli_args.parser("safemoe export", peft.__doc__)
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("peft", help="experts -> PEFT adapter folders, router, model card")
  p.add_argument("--run", required=True, help="run folder (experts.safetensors, run.json)")
  p.add_argument("--out", required=True)
  p.add_argument("--expert", action="append", help="domain name(s), or 'all' (default)")
  p.add_argument("--base-name", default=None,
                 help="base_model_name_or_path to write (default: the run's base model path)")
  p.add_argument("--metrics", default=None, help="a JSON file of metrics for the model card")
  p.add_argument("--overwrite", action="store_true",
                 help="export into a non-empty folder this tool did not write")
  p = sub.add_parser("import", help="PEFT adapters -> experts.safetensors (router-only training)")
  p.add_argument("--adapters", nargs="+", required=True, help="folders or Hub repo ids")
  p.add_argument("--names", nargs="+", default=None, help="expert names (default: folder names)")
  p.add_argument("--base", default=None,
                 help="HF folder or .gguf the adapters belong to (default: embedded SmolLM2)")
  p.add_argument("--out", required=True, help="a run folder, or a .safetensors file")
  p = sub.add_parser("merged", help="base + fixed mix of experts -> HF checkpoint")
  p.add_argument("--run", required=True)
  p.add_argument("--routing", required=True,
                 choices=("base", "uniform", "negated", "fixed", "oracle"))
  p.add_argument("--domain", action="append", help="oracle: the domain(s) whose expert is used")
  p.add_argument("--weights", default=None, help="fixed: E comma-separated gate values")
  p.add_argument("--base", default=None, help="base model, if it moved since training")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
  p.add_argument("--out", required=True)
  p.add_argument("--overwrite", action="store_true",
                 help="export into a non-empty folder this tool did not write")
  args = ap.parse_args(argv)
  if args.cmd == "peft":
    metrics = jsonio.read_json(args.metrics) if args.metrics else None
    run = RunDir(args.run).load()
    done = peft.export_peft(run, args.out, _split(args.expert), args.base_name, metrics,
                            args.overwrite)
    for d, f in done.items():
      print(f"{d:20s} {f}")
    print(f"{'model card':20s} {Path(args.out) / 'README.md'}")
  elif args.cmd == "import":
    base = Path(args.base) if args.base else assets.smollm2_gguf()
    mcfg = adapters.base_config(base)
    ads = [adapters.read_peft_adapter(a) for a in args.adapters]
    ecfg, experts = adapters.import_adapters(ads, mcfg, names=args.names,
                                             base_name=str(base))
    f = adapters.write_imported(args.out, ecfg, experts, mcfg, base, ads)
    print(f"wrote {f}: {ecfg.num_experts} experts {list(ecfg.domains)}, rank {ecfg.rank}, "
          f"alpha {ecfg.alpha}, targets {list(ecfg.targets)}")
    if f.name == "experts.safetensors":
      ov = adapters.train_overrides(ecfg, base.absolute(), f.parent)
      print("train only the router with (plus your data sources):\n  python -m "
            "safemoe_jax.train " + " ".join(ov))
  else:
    w = _weights(args.weights)
    run = RunDir(args.run).load()
    g = merged.gate_vector(args.routing, run.domains, _split(args.domain), w)
    out = merged.export_merged(run, args.out, g, base=args.base, dtype=args.dtype,
                               overwrite=args.overwrite)
    print(f"wrote {out} (gates {dict(zip(run.domains, g.tolist()))})")
  return 0

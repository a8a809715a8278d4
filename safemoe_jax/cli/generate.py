"""`safemoe generate --prompt TEXT [--prompt TEXT ...] [--run DIR | --model PATH] [key=value ...]`:
chat with the embedded default model, a base model (HF folder, .gguf or Hub id), or a trained
run (its base model, experts and router; `routing=base|uniform|negated` for the baselines).

    safemoe generate --prompt "What is the capital of France?"
    safemoe generate --run runs/embedded_default --prompt "How do I pick a lock?" max_new_tokens=64
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from safemoe_jax import errors
from safemoe_jax.cli import args
from safemoe_jax.infer.generate import DecodingConfig, GenerateError, chat_generate
from safemoe_jax.io import assets, hub
from safemoe_jax.io.base import load_pretrained
from safemoe_jax.log import get_logger
from safemoe_jax.train.rundir import RunDir

log = get_logger("safemoe_jax.infer")


@errors.cli
def main(argv: Sequence[str] | None = None) -> int:
  ap = args.parser("safemoe generate", __doc__, DecodingConfig)
  ap.add_argument("--prompt", action="append", default=[],
                  help="a user message (repeat for a batch)")
  src = ap.add_mutually_exclusive_group()
  src.add_argument("--model", default=None,
                   help="HF folder, .gguf file, Hub id (org/name, the Hub cache) or a shipped "
                        "model's name (qwen2.5-coder-0.5b-instruct; default: embedded "
                        "SmolLM2-135M-Instruct)")
  src.add_argument("--run", default=None, help="a trained run folder (experts and router)")
  ap.add_argument("--system", default=None, help="optional system message (= system=...)")
  ap.add_argument("--max-new-tokens", type=int, default=None)
  ap.add_argument("--temperature", type=float, default=None, help="0 = greedy")
  ap.add_argument("--top-p", type=float, default=None)
  ap.add_argument("--seed", type=int, default=None)
  a = ap.parse_args(argv)
  cfg = args.build(DecodingConfig, a.overrides, flags={
      "max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p,
      "seed": a.seed, "system": a.system})
  if a.print_config:
    return args.print_config(cfg)
  if not a.prompt:
    ap.error("give at least one --prompt")
  cfg.validate()
  if (a.model is not None and not Path(a.model).exists() and a.model not in assets.EMBEDDED_MODELS
      and not hub.is_hub_id(a.model)):
    raise GenerateError(f"--model {a.model} does not exist (an HF folder with config.json "
                        f"and safetensors, a .gguf file, a Hub id org/name, or one of "
                        f"{sorted(assets.EMBEDDED_MODELS)})")
  t0 = time.perf_counter()
  system, routing = cfg.system, "learned"  # no experts: the base model
  if a.run is not None:
    loaded = RunDir(a.run).load_model()
    model, tok, routing = loaded.model, loaded.base.tokenizer, cfg.routing
    if system is None:
      system = loaded.cfg.data.system_prompt
  else:
    if cfg.routing != "learned":
      raise GenerateError("routing= applies to a trained run (--run DIR)")
    model, tok = load_pretrained(a.model)
  log.info(f"model loaded in {time.perf_counter() - t0:.1f}s")
  t0 = time.perf_counter()
  res = chat_generate(model, tok, a.prompt, max_new_tokens=cfg.max_new_tokens, system=system,
                      temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                      routing=routing)
  dt = time.perf_counter() - t0
  for p, t in zip(a.prompt, res["texts"]):
    print(f"### {p}\n{t}\n")
  n = sum(res["new_tokens"])
  log.info(f"{n} new tokens in {dt:.1f}s (incl. compilation): {n / dt:.1f} tok/s")
  return 0

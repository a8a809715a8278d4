"""The benchmark's tables: the ratios against their targets, the markdown table of a run, and the
comparison with the PEFT peer's results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any




TARGETS = (  # (name, numerator, denominator, at most) on SmolLM2-135M shapes, phase 2, rank 16
    ("SafeMoE phase 2 E=8 step / single LoRA step", "p2_E8", "lora", 1.15),
    ("SafeMoE phase 2 E=16 step / E=1 step", "p2_E16", "p2_E1", 1.3),
    ("decode with live routing (E=8) / base decode, batch 1", "gen_safemoe_b1", "gen_base_b1", 1.2),
    ("decode with live routing (E=8) / base decode, batch 8", "gen_safemoe_b8", "gen_base_b8", 1.2),
)


def ratios(res: dict[str, Any], targets: bool = True) -> list[dict[str, Any]]:
  """Ratios of medians; with targets=False (the tiny model, whose adapters are as wide as its
  layers) the SmolLM2-shape targets are shown but not judged."""
  c = res["configs"]
  out = []
  def both(a, b):
    return {"ratio": c[a]["median_s"] / c[b]["median_s"],
            "ratio_cpu": c[a]["cpu_median_s"] / c[b]["cpu_median_s"]}

  for label, a, b, limit in TARGETS:
    if a in c and b in c:
      r = both(a, b)
      row = {"what": label, **r, "target_at_most": limit}
      if targets:
        row["met"] = r["ratio"] <= limit
      out.append(row)
  extra = [("phase 1 E=8 step / single LoRA step", "p1_E8", "lora"),
           ("single LoRA step / frozen base step", "lora", "base"),
           ("phase 2 E=8 step / frozen base step", "p2_E8", "base"),
           ("phase 1 E=16 step / E=1 step", "p1_E16", "p1_E1")]
  for label, a, b in extra:
    if a in c and b in c:
      out.append({"what": label, **both(a, b)})
  return out


def _mb(x: float | None) -> str:
  return "-" if x is None else f"{x / 2**20:.1f}"


def format_table(doc: dict[str, Any]) -> str:
  res, mem = doc["results"], doc.get("memory", {})
  c = res["configs"]
  rows = [("config", "median s", "min-max s", "CPU s", "tok/s", "MFU", "trainable",
           "opt state MB", "XLA temp MB", "peak RSS MB*")]
  for name, r in c.items():
    if r["kind"] == "matmul":
      continue
    xm = r.get("xla_memory") or {}
    rss = mem.get(name, {}).get("peak_rss_step_mb") or mem.get(name, {}).get("peak_rss_mb")
    rows.append((name, f"{r['median_s']:.3f}", f"{r['min_s']:.3f}-{r['max_s']:.3f}",
                 f"{r['cpu_median_s']:.3f}", f"{r.get('tokens_per_s', 0):.1f}",
                 f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
                 f"{r['trainable_params']:,}" if "trainable_params" in r else "-",
                 _mb(r.get("opt_state_bytes")) if "opt_state_bytes" in r else "-",
                 _mb(xm.get("temp")) if xm else "-",
                 f"{rss:.0f}" if rss else "-"))
  w = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
  lines = ["| " + " | ".join(str(x).ljust(k) for x, k in zip(row, w)) + " |" for row in rows]
  lines.insert(1, "|" + "|".join("-" * (k + 2) for k in w) + "|")
  s = doc["settings"]
  mm = res.get("matmul_flops_per_s")
  head = (f"model {s['model']} ({doc['results']['model_config']['num_layers']} layers, d="
          f"{doc['results']['model_config']['hidden_size']}), {s['dtype']}, train batch "
          f"{s['batch']}x{s['seq']}, experts rank {s['rank']} on {','.join(s['targets'])}; "
          f"generation {s['prompt_len']}+{s['new_tokens']} tokens greedy; median of "
          f"{s['repeats']} (gen {s['gen_repeats']}) after {s['warmup']} warm-up")
  foot = [f"matmul rate measured in this run: {mm / 1e9:.1f} GFLOP/s "
          f"({s['matmul_n']}^3, {s['dtype']}); MFU = frozen-base model FLOPs / "
          f"{res['peak_source']}" if mm else "",
          "*peak RSS of the configuration in its own process, from the loaded base weights on "
          "(model, compile, steps; not the checkpoint reading)" if mem else "",
          f"machine: {doc['machine']['cpu']} x{doc['machine']['nproc']}, load average "
          f"{doc['load_before']} before, {doc['load_after']} after"]
  rat = ["", "| ratio (same run) | wall-clock medians | CPU-time medians | target | met |",
         "|---|---|---|---|---|"]
  for r in doc["ratios"]:
    tgt = f"<= {r['target_at_most']}" if "target_at_most" in r else ""
    met = ("yes" if r["met"] else "**no**") if "met" in r else ("n/a (tiny)" if tgt else "")
    rat.append(f"| {r['what']} | {r['ratio']:.3f} | {r['ratio_cpu']:.3f} | {tgt} | {met} |")
  return "\n".join([head, ""] + lines + [""] + [f for f in foot if f] + rat)


def compare_peer(doc: dict[str, Any], peer_json: str) -> list[dict[str, Any]]:
  """Our medians over a peer's (PEFT LoRA / X-LoRA timed with the same batch and shapes)."""
  p = json.loads(Path(peer_json).read_text())["configs"]
  c = doc["results"]["configs"]
  pairs = [("router step E=8: X-LoRA / ours (target >= 2.5)", "xlora_train_E8", "p2_E8", 2.5, "ge"),
           ("8 experts at once / one PEFT LoRA step (target <= 1.1)", "lora_train", "p1_E8", 1.1,
            "le_inv"),
           ("single LoRA step: PEFT / ours", "lora_train", "lora", None, ""),
           ("decode b8 live routing tok/s: ours / X-LoRA (target >= 15)", "xlora_gen_E8",
            "gen_safemoe_b8", 15, "tok"),
           ("decode b8 live routing tok/s: ours / PEFT LoRA cached (target >= 0.9)", "lora_gen",
            "gen_safemoe_b8", 0.9, "tok")]
  out = []
  for label, pk, ok, tgt, how in pairs:
    if pk not in p or ok not in c or not p[pk].get("ok"):
      continue
    if how == "tok":
      r = c[ok]["tokens_per_s"] / p[pk]["tokens_per_s"]
    elif how == "le_inv":
      r = c[ok]["median_s"] / p[pk]["median_s"]
    else:
      r = p[pk]["median_s"] / c[ok]["median_s"]
    row = {"what": label, "ratio": r, "peer": pk, "ours": ok}
    if tgt is not None:
      row["met"] = r <= tgt if how == "le_inv" else r >= tgt
    out.append(row)
  return out

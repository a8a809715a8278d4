"""What the accelerator check runs on, made locally with no network: tiny random HF checkpoints
(config.json + safetensors, Hub layout) with a small byte-level chat tokenizer, neutral
placeholder training rows, and the trainer's overrides for them.

`tools/accel_check.py` uses these; the 1B-shaped checkpoint comes from
`tools/bench_load.write_random_checkpoint`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from safemoe_jax.tools.bench_load import write_random_checkpoint

DOMAINS = ("alpha", "beta")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Llama-3.2's RoPE scaling, its original context shrunk to the tiny model's.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def placeholder_rows(n_per_domain: int = 16) -> list[dict]:
  """Neutral (prompt, response, domain, harm score) rows in two domains."""
  rows = []
  for d in DOMAINS:
    for i in range(n_per_domain):
      rows.append({"question": f"placeholder {d} question {i}",
                   "answer": f"placeholder {d} answer {i} " + " ".join([d] * 12),
                   "topic": d, "score": 1.0})
      rows.append({"question": f"placeholder {d} request {i}",
                   "answer": f"a calm and informative placeholder reply {i} about {d} topics",
                   "topic": d, "score": 0.0})
  return rows


def write_data(path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in placeholder_rows()))
  return path


@functools.lru_cache(maxsize=None)
def chat_tokenizer(vocab_size: int = 400):
  """A byte-level BPE tokenizer with a ChatML template, trained on the placeholder rows (once
  per process: callers only save it)."""
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  corpus = [json.dumps(r) for r in placeholder_rows()] + ["user assistant system"]
  tk.train_from_iterator(corpus, trainer)
  tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>",
                                eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                unk_token="<|endoftext|>")
  tok.chat_template = CHATML
  return tok


def tiny_hf_config(vocab_size: int, rope_scaling: dict | None = None, **kw) -> dict:
  cfg = {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": 32,
         "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128,
         "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "rope_theta": 10000.0,
         "hidden_act": "silu", **kw}
  if rope_scaling is not None:
    cfg["rope_scaling"] = dict(rope_scaling)
    cfg["rope_theta"] = 500000.0
  return cfg


def write_tiny_model(folder: Path, rope_scaling: dict | None = None, seed: int = 0) -> Path:
  """A random tiny Llama (float32) with the chat tokenizer, in the Hub's folder layout."""
  tok = chat_tokenizer()
  write_random_checkpoint(folder, tiny_hf_config(len(tok), rope_scaling), dtype="float32",
                          seed=seed)
  tok.save_pretrained(folder)
  return folder


def train_overrides(model_dir: Path, data: Path, out: Path, **extra) -> list[str]:
  """The trainer on the tiny model and placeholder rows: the plain phase 2 (NLL, per-token
  gates), no quick look, no progress bar."""
  src = {"name": "placeholder", "kind": "local", "path": str(data),
         "columns": {"prompt": "question", "response": "answer", "domains": "topic",
                     "harm_score": "score"}}
  ov = {"model.path": str(model_dir), "output_dir": str(out),
        "data.sources": json.dumps([src]), "data.domains": "[alpha, beta]",
        "data.max_length": 64, "data.bucket_lengths": "[]", "data.batch_size": 4,
        "data.batching": "pad", "data.split.judge": 0.0, "data.split.eval": 0.1,
        "data.split.validation": 0.2, "experts.rank": 4, "experts.alpha": 8,
        "experts.dropout": 0.1, "experts.targets": "[q,k,v,o,gate,up,down]",
        "phase1.steps": 4, "phase1.lr": 0.02, "phase1.warmup_ratio": 0.0,
        "phase1.ckpt_every": 1000, "phase2.steps": 2, "phase2.lr": 0.05,
        "phase2.ckpt_every": 1000, "router.init_std": 0.01, "log.progress": False,
        "log.tensorboard": False, "router.granularity": "per_token", "router.max_l1": 0.0,
        "data.phase2_targets": "''", "data.phase2_harmful": False, "data.phase2_retain": "''",
        "objective.contrast": "none", "objective.retain_coef": 0.0, "quick_look": 0}
  ov.update(extra)
  return [f"{k}={v}" for k, v in ov.items()]

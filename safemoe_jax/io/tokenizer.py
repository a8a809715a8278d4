"""Tokenizers: an HF folder, or the byte-level BPE rebuilt from a GGUF's metadata; and the one
place for chat messages, the tokens that end a turn, the pad id and left padding.

The GGUF route follows llama.cpp: `tokenizer.ggml.pre` names the pre-tokenizer regexes
(llama-vocab.cpp), token type 3 marks control (special) tokens, and bos/eos/pad ids and the chat
template come from the metadata. For SmolLM2 ("smollm") digits are split one per token before
the GPT-2 byte-level split, as in the original tokenizer.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Sequence, overload

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from safemoe_jax.errors import SafeMoEError
from safemoe_jax.io.weights import gguf_metadata


class TokenizerError(SafeMoEError, ValueError):
  """A tokenizer cannot be built or loaded, or lacks what is asked of it (e.g. a chat template)."""


# llama.cpp pre-tokenizer names -> the same split in `tokenizers` (regexes from llama-vocab.cpp).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                 r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # Qwen2: one digit per token
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
  """(pre-tokenizer, ignore_merges) for llama.cpp's `tokenizer.ggml.pre` name."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 regex
  if pre in _DIGITS_THEN_GPT2:  # "\p{N}" first, then the GPT-2 regex
    digits = pre_tokenizers.Digits(individual_digits=True)
    return pre_tokenizers.Sequence([digits, byte_level]), False
  if pre in ("default", "gpt-2", "gpt2"):
    return byte_level, False
  if pre == "qwen2":  # Qwen2/2.5: Llama-3's split but single digits; merges applied as usual
    split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated")
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False)]), False
  if pre in ("llama-bpe", "llama3"):  # Llama 3: its own regex, merges ignored for whole words
    split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=False)]), True
  raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: "
                       f"{[*_DIGITS_THEN_GPT2, 'default', 'gpt-2', 'llama-bpe', 'qwen2']}); load the "
                       "model's HF tokenizer folder instead")


def tokenizer_from_gguf(path_or_metadata: str | Path | Mapping[str, Any]
                        ) -> PreTrainedTokenizerFast:
  """Rebuild the byte-level BPE tokenizer stored in a GGUF file (or its metadata dict)."""
  md = path_or_metadata
  if not isinstance(md, Mapping):
    md = gguf_metadata(md)
  if (kind := md.get("tokenizer.ggml.model")) != "gpt2":
    raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported: only byte-level BPE "
                         "('gpt2'); load the model's HF tokenizer folder instead")
  tokens: list[str] = list(md["tokenizer.ggml.tokens"])
  types: list[int] = list(md.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise TokenizerError(f"GGUF vocabulary has {len(tokens) - len(vocab)} duplicate tokens")
  pre, ignore_merges = _pre_tokenizer(md.get("tokenizer.ggml.pre", "default"))
  merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
  tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
  tk.pre_tokenizer = pre
  tk.decoder = decoders.ByteLevel()
  # type 3 = control tokens (special: never split, skipped by decode(skip_special_tokens=True));
  # type 4 = user-defined tokens (never split, but ordinary text).
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                         for t, ty in zip(tokens, types) if ty == 3])
  tk.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == 4])

  def tok_of(name: str) -> str | None:
    i = md.get(f"tokenizer.ggml.{name}_token_id")
    return None if i is None or not 0 <= int(i) < len(tokens) else tokens[int(i)]

  bos, eos = tok_of("bos"), tok_of("eos")
  if md.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
  else:
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
  arch = md.get("general.architecture", "llama")
  tok = PreTrainedTokenizerFast(
      tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=tok_of("unknown"),
      pad_token=tok_of("padding") or eos, clean_up_tokenization_spaces=False,
      model_max_length=int(md.get(f"{arch}.context_length", 1 << 30)))
  if template := md.get("tokenizer.chat_template"):
    tok.chat_template = template
  return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
  """An HF tokenizer folder (local files only, no remote code) or a .gguf file."""
  p = Path(path)
  if p.is_file() and p.suffix == ".gguf":
    return tokenizer_from_gguf(p)
  if not p.is_dir():
    raise TokenizerError(f"{p} is neither a tokenizer folder nor a .gguf file (the Hub is not "
                         "used: download the model to a local folder first)")
  try:
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
  except Exception as e:
    raise TokenizerError(f"could not load a tokenizer from {p}: {type(e).__name__}: {e}") from e
  if tok.pad_token is None and tok.eos_token is not None:
    tok.pad_token = tok.eos_token  # Llama 3 has none; padding is masked out anyway
  return tok


# Tokens that end an assistant turn in the chat templates of the supported families (ChatML,
# Llama 3, Llama 2 / Mistral, Gemma); eos is always one.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>",
               "<end_of_turn>")


def stop_ids(tok) -> list[int]:
  """Token ids that end an assistant turn: eos plus the chat template's end-of-turn tokens."""
  ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
  for t in END_OF_TURN:
    i = tok.convert_tokens_to_ids(t)
    if isinstance(i, int) and i >= 0 and i != tok.unk_token_id:
      ids.add(i)
  return sorted(ids)


def pad_id(tok) -> int:
  """The id that fills padded positions (always masked out): pad, else eos, else 0."""
  for i in (tok.pad_token_id, tok.eos_token_id):
    if i is not None:
      return int(i)
  return 0


def left_pad(batch_ids: Sequence[Sequence[int]], pad_id: int, bucket: int = 32,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad token lists to `length` (default: the longest, rounded up to a multiple of
  `bucket`) -> ids [B, P] int32, attention mask [B, P] int32."""
  P = length if length is not None else -(-max(len(x) for x in batch_ids) // bucket) * bucket
  ids = np.full((len(batch_ids), P), pad_id, np.int32)
  mask = np.zeros((len(batch_ids), P), np.int32)
  for b, x in enumerate(batch_ids):
    if len(x):
      ids[b, P - len(x):] = x
      mask[b, P - len(x):] = 1
  return ids, mask


def messages(prompt: str, system: str | None = None, response: str | None = None
             ) -> list[dict[str, str]]:
  """The chat messages of one turn: [system], user, [assistant]."""
  msgs = [{"role": "system", "content": system}] if system is not None else []
  msgs.append({"role": "user", "content": prompt})
  if response is not None:
    msgs.append({"role": "assistant", "content": response})
  return msgs


def check_chat_template(tok) -> None:
  if not getattr(tok, "chat_template", None):
    raise TokenizerError("this tokenizer has no chat template; use an instruct/chat model's "
                         "tokenizer, or set tok.chat_template to a Jinja template")


@overload
def apply_chat(tok: PreTrainedTokenizerBase, prompt: str, system: str | None = None,
               response: None = None) -> str: ...
@overload
def apply_chat(tok: PreTrainedTokenizerBase, prompt: str, system: str | None = None, *,
               response: str) -> tuple[str, str]: ...


def apply_chat(tok, prompt, system=None, response=None):
  """The chat-formatted prompt ending with the generation prompt (assistant turn opened).
  With `response`: (prompt_text, full_text), where full_text = prompt_text + the rendered
  response (with its end-of-turn marker), so the response is full_text[len(prompt_text):]."""
  check_chat_template(tok)
  text = tok.apply_chat_template(messages(prompt, system), tokenize=False,
                                 add_generation_prompt=True)
  if response is None:
    return text
  full = tok.apply_chat_template(messages(prompt, system, response), tokenize=False)
  if not full.startswith(text):
    raise TokenizerError("the chat template renders the prompt differently once a response "
                         "follows, so prompt and response cannot be separated:\n"
                         f"  prompt: {text!r}\n  full: {full!r}")
  return text, full

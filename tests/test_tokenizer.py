"""GGUF tokenizer rebuild, HF-folder loading and chat formatting."""

from __future__ import annotations

import pytest
from tokenizers import pre_tokenizers

from safemoe_jax.io.tokenizer import TokenizerError, apply_chat, load_tokenizer, tokenizer_from_gguf

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' "
          "}}{% endif %}")
TEXTS = ["The capital of France is", "Hello,   world!\n\nNew  para\ttab", "I'm sure they'll say",
         "In 2024, 3.14159 and 1,000,000 people", "naïve café 日本語 🙂 emoji", "  leading",
         "def f(x):\n    return x**2  # comment", "<|im_start|>user\nhi<|im_end|>\n"]


def _metadata(**kw) -> dict:
  """A tiny GGUF-style byte-level BPE vocabulary: 3 control tokens, 256 bytes, 4 merges."""
  merges = ["Ġ t", "h e", "Ġt he", "1 2"]
  tokens = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + pre_tokenizers.ByteLevel.alphabet()
            + ["Ġt", "he", "Ġthe", "12"])
  return {"general.architecture": "llama", "llama.context_length": 64,
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
          "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.chat_template": CHATML, **kw}


def _pieces(tok, text: str) -> list[str]:
  return tok.convert_ids_to_tokens(tok(text)["input_ids"])


def test_tiny_gguf_tokenizer():
  tok = tokenizer_from_gguf(_metadata())
  assert _pieces(tok, "the the 123<|im_end|>") == [
      "t", "he", "Ġthe", "Ġ", "1", "2", "3", "<|im_end|>"]
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>", None)  # no padding id: pad = eos
  assert tok.model_max_length == 64
  for s in TEXTS:
    assert tok.decode(tok(s)["input_ids"]) == s
  assert tok.decode(tok("a<|im_end|>")["input_ids"], skip_special_tokens=True) == "a"
  # Without the smollm digit split, "123" stays one piece and the merge "1 2" applies.
  assert _pieces(tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.pre": "gpt-2"})), " 123") == [
      "Ġ", "12", "3"]
  llama3 = tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.pre": "llama-bpe"}))
  assert [p for p, _ in llama3.backend_tokenizer.pre_tokenizer.pre_tokenize_str("ab 12345")] == [
      "ab", "Ġ", "123", "45"]
  qwen2 = tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.pre": "qwen2"}))  # one digit a piece
  assert [p for p, _ in qwen2.backend_tokenizer.pre_tokenizer.pre_tokenize_str("ab 12345")] == [
      "ab", "Ġ", "1", "2", "3", "4", "5"]


def test_tiny_gguf_options_and_errors():
  tok = tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.add_bos_token": True,
                                         "tokenizer.ggml.padding_token_id": 0}))
  assert tok("the")["input_ids"][0] == 1 and tok.pad_token == "<|endoftext|>"
  with pytest.raises(TokenizerError, match="'llama' is not supported: only byte-level BPE"):
    tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.model": "llama"}))
  with pytest.raises(TokenizerError, match="pre-tokenizer 'deepseek-coder' is not supported"):
    tokenizer_from_gguf(_metadata(**{"tokenizer.ggml.pre": "deepseek-coder"}))


def test_apply_chat_on_tiny_tokenizer():
  tok = tokenizer_from_gguf(_metadata())
  assert apply_chat(tok, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  prompt, full = apply_chat(tok, "hi", system="Be safe.", response="Hello!")
  assert prompt == ("<|im_start|>system\nBe safe.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")
  assert full == prompt + "Hello!<|im_end|>\n"
  tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                       "{% if add_generation_prompt %}<gen>{% endif %}")
  with pytest.raises(TokenizerError, match="cannot be separated"):
    apply_chat(tok, "hi", response="there")
  bare = tokenizer_from_gguf(_metadata(**{"tokenizer.chat_template": None}))
  with pytest.raises(TokenizerError, match="no chat template"):
    apply_chat(bare, "hi")


def test_load_tokenizer_hf_folder_round_trip(tmp_path):
  tok = tokenizer_from_gguf(_metadata())
  tok.save_pretrained(tmp_path)
  back = load_tokenizer(tmp_path)
  for s in TEXTS:
    assert back(s)["input_ids"] == tok(s)["input_ids"]
  assert (back.eos_token, back.pad_token) == ("<|im_end|>", "<|im_end|>")
  assert apply_chat(back, "hi") == apply_chat(tok, "hi")
  with pytest.raises(TokenizerError, match="neither a tokenizer folder nor a .gguf file"):
    load_tokenizer(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct tokenizer from the pinned GGUF.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
  return load_tokenizer(smollm2_gguf)


@pytest.mark.slow
def test_smollm2_gguf_tokenizer(smol_tok):
  tok = smol_tok
  assert len(tok) == 49152
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
  assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)
  for s in TEXTS:
    ids = tok(s)["input_ids"]
    assert tok.decode(ids) == s, s
  assert tok("<|im_start|>user<|im_end|>")["input_ids"][0::2] == [1, 2]  # specials stay whole
  assert tok("Hi")["input_ids"] == tok("Hi", add_special_tokens=False)["input_ids"]  # no BOS
  assert _pieces(tok, "in 2024") == ["in", "Ġ", "2", "0", "2", "4"]  # digits one per token
  # Digits are split off before the GPT-2 regex (SmolLM2's tokenizer.json and llama.cpp's
  # "smollm"), so a whitespace run before a digit stays one piece.
  assert _pieces(tok, "a  1\n\n2") == ["a", "ĠĠ", "1", "ĊĊ", "2"]
  assert [p for p, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x²³")] == [
      "x", "Â²", "Â³"]  # \p{N} split as llama.cpp's "smollm", not only ASCII digits


@pytest.mark.slow
def test_smollm2_chat_template(smol_tok):
  prompt = apply_chat(smol_tok, "What is 2+2?")
  assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
  prompt, full = apply_chat(smol_tok, "What is 2+2?", system="Be brief.", response="4")
  assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
  assert full == prompt + "4<|im_end|>\n"
  assert smol_tok(full)["input_ids"][-2] == smol_tok.eos_token_id  # "<|im_end|>", "\n"


@pytest.mark.slow
def test_smollm2_matches_peer_hf_tokenizer(smol_tok, peer_smollm2):
  """The peer folder's tokenizer was made by transformers' GGUF converter, which drops the
  digit split: it agrees with ours except where whitespace precedes a numeral ("a  1": ours
  "ĠĠ" "1" like SmolLM2's own tokenizer.json, the peer's "Ġ" "Ġ" "1"; " ½": ours "Ġ" "½")."""
  ref = load_tokenizer(peer_smollm2)
  for s in TEXTS + ["Call 555-0123 at 10:30pm, code 42a7!", "x²³,½/٣٤-Ⅻ"]:
    assert smol_tok(s)["input_ids"] == ref(s)["input_ids"], s
  assert smol_tok.chat_template == ref.chat_template
  assert (smol_tok.eos_token_id, smol_tok.pad_token_id) == (ref.eos_token_id, ref.pad_token_id)

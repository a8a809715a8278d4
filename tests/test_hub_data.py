"""Hub datasets as users meet them: the PKU-SafeRLHF domain map, HarmfulQA subjects, benign
Safety-Tuned LLaMAs sets, and one clear error for a gated or unreachable dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from safemoe_jax.data import config as data_cfg
from safemoe_jax.data import records as data_records
from safemoe_jax.data import sources as data_sources
from tests.test_data import FIX, fixture_hub_loader

ROOT = Path(__file__).resolve().parents[1]
# The 19 harm categories of PKU-SafeRLHF's response_{0,1}_harm_category (its dataset card).
PKU_CATEGORIES = (
    "Endangering National Security", "Insulting Behavior", "Discriminatory Behavior",
    "Endangering Public Health", "Copyright Issues", "Violence", "Drugs", "Privacy Violation",
    "Economic Crime", "Mental Manipulation", "Human Trafficking", "Physical Harm",
    "Sexual Content", "Cybercrime", "Disrupting Public Order", "Environmental Damage",
    "Psychological Harm", "White-Collar Crime", "Animal Abuse")


def _beavertails_domains() -> list[str]:
  cfg = yaml.safe_load((ROOT / "configs/llama31_8b_tpu.yaml").read_text())
  return cfg["data"]["domains"]


def test_every_pku_category_maps_to_a_beavertails_domain(tmp_path):
  domains = _beavertails_domains()
  assert len(domains) == 14 and len(PKU_CATEGORIES) == 19
  assert {data_sources._slug(c) for c in PKU_CATEGORIES} == set(data_cfg.PKU_TO_BEAVERTAILS)
  rows = []
  for i, cat in enumerate(PKU_CATEGORIES):  # one row per category, only that category true
    flags = {c: c == cat for c in PKU_CATEGORIES}
    rows.append({"prompt": f"placeholder request {i}", "response_0": f"placeholder a {i}",
                 "response_1": f"placeholder b {i}", "is_response_0_safe": False,
                 "is_response_1_safe": True, "response_0_harm_category": flags,
                 "response_1_harm_category": {c: False for c in PKU_CATEGORIES},
                 "response_0_severity_level": 2, "response_1_severity_level": 0,
                 "better_response_id": 0, "safer_response_id": 1})
  f = tmp_path / "pku19.jsonl"
  f.write_text("".join(json.dumps(r) + "\n" for r in rows))

  def load(path, name=None, split=None, **kw):
    import datasets
    assert path == "PKU-Alignment/PKU-SafeRLHF"
    return datasets.load_dataset("json", data_files=str(f), split="train")

  cfg = data_cfg.data_config({"sources": [{"name": "pku", "kind": "pku_saferlhf"}],
                       "domains": domains})
  records, report = data_records.load_records(cfg, hub_loader=load)
  harmful = [r for r in records if r["labels"]["is_safe"] is False]
  assert len(harmful) == 19
  got = {r["prompt"]: r["domains"] for r in harmful}
  for i, cat in enumerate(PKU_CATEGORIES):
    assert got[f"placeholder request {i}"] == [data_cfg.PKU_TO_BEAVERTAILS[data_sources._slug(cat)]], cat
    assert got[f"placeholder request {i}"][0] in domains
  assert not report["non_expert_domains"]  # nothing fell outside the 14
  assert all(r["domains"] == [] for r in records if r["labels"]["is_safe"])


def test_harmfulqa_topic_is_a_subject_and_benign_stl_sets_are_benign():
  sources = [{"name": "harmfulqa", "kind": "harmfulqa"},
             {"name": "i_alpaca", "kind": "safety_tuned_llamas", "hf_config": "I-Alpaca"},
             {"name": "i_cona", "kind": "safety_tuned_llamas", "hf_config": "I-CoNa"}]
  cfg = data_cfg.data_config({"sources": sources, "domains": ["privacy_violation"]})
  calls: list = []
  records, _ = data_records.load_records(cfg, hub_loader=fixture_hub_loader(calls))
  by = lambda s: [r for r in records if r["source"] == s]
  assert by("harmfulqa") and all(r["domains"] == [] and r["labels"]["subject"]
                                 for r in by("harmfulqa"))
  assert [r["labels"].get("prompt_safe") for r in by("i_alpaca")] == [True, True]
  assert all("prompt_safe" not in r["labels"] for r in by("i_cona"))


class _Gated(Exception):
  pass


@pytest.mark.parametrize("exc,fix", [
    (_Gated("Dataset 'walledai/AdvBench' is a gated dataset on the Hub. You must be "
            "authenticated to access it."), "accept its terms at https://huggingface.co/datasets/"
                                            "walledai/AdvBench"),
    (ConnectionError("Couldn't reach 'walledai/AdvBench' on the Hub (LocalEntryNotFoundError)"),
     "the Hub could not be reached"),
])
def test_gated_or_unreachable_dataset_is_one_clear_error(exc, fix):
  def load(path, name=None, split=None, **kw):
    raise exc
  cfg = data_cfg.data_config({"sources": [{"name": "advbench", "kind": "advbench_hub"}],
                       "domains": ["privacy_violation"]})
  with pytest.raises(data_cfg.DataError, match="dataset walledai/AdvBench could not be loaded") as e:
    data_records.load_records(cfg, hub_loader=load)
  assert fix in str(e.value) and "fix:" in str(e.value)


def test_dataset_revisions_are_pinned_and_passed_to_the_loader():
  """`revision` reaches datasets.load_dataset for a Hub dataset; the Safety-Tuned LLaMAs files are
  read at a pinned commit of their repository (never the moving main branch), or at the source's
  own revision."""
  seen: list = []

  def load(path, name=None, split=None, **kw):
    import datasets
    seen.append((path, kw.get("revision"), kw.get("data_files")))
    if path == "json":
      return datasets.load_dataset("json", data_files=str(FIX / Path(kw["data_files"]).name),
                                   field=kw["field"], split=split)
    return datasets.load_dataset("json", data_files=str(FIX / "xstest.jsonl"), split="train")

  sources = [{"name": "x_pinned", "kind": "xstest", "revision": "abc1234"},
             {"name": "x_default", "kind": "xstest"},
             {"name": "stl", "kind": "safety_tuned_llamas", "hf_config": "I-CoNa"},
             {"name": "stl_other", "kind": "safety_tuned_llamas", "hf_config": "I-CoNa",
              "revision": "v2"}]
  cfg = data_cfg.data_config({"sources": sources, "domains": ["privacy_violation"]})
  data_records.load_records(cfg, hub_loader=load)
  assert ("Paul/XSTest", "abc1234", None) in seen and ("Paul/XSTest", None, None) in seen
  urls = [f for p, _, f in seen if p == "json"]
  assert urls == [f"https://raw.githubusercontent.com/vinid/safety-tuned-llamas/"
                  f"{data_cfg.STL_COMMIT}/data/evaluation/I-CoNa.json",
                  "https://raw.githubusercontent.com/vinid/safety-tuned-llamas/v2/data/"
                  "evaluation/I-CoNa.json"], urls
  assert len(data_cfg.STL_COMMIT) == 40 and "/main/" not in urls[0]

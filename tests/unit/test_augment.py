"""Paraphrase augmentation's pieces without Ray: output cleaning, variant ids, the source check, the config's
errors, and the two actors called directly on the tiny random model (its paraphrases are gibberish: the mechanics
are what is checked)."""

import json

import numpy as np
import pytest

from honed.config import ConfigError, PrepareConfig, load_config
from honed.data.augment import (
    VARIANT_ID_BASE, Paraphraser, VariantProcessor, clean_paraphrase, numbered_terms, source_similarity, variant_id,
    variant_problem, variant_rules,
)
from honed.data.pipeline import lsh_settings, processor_settings
from honed.data.records import DROPPED, KEPT, QUARANTINED, assign_split
from honed.data.sources import record_id
from honed.data.templates import resolve_template
from honed.models import load_tokenizer


@pytest.mark.parametrize("reply, expected", [
    ("What does code E11.9 stand for?", "What does code E11.9 stand for?"),
    ("\n\n  Rewritten question: \"What is E11.9?\"\nSure, here is more.", "What is E11.9?"),
    ("**Question:** “What is E11.9?”", "What is E11.9?"),
    ("'single quoted'", "single quoted"),
    ("Here is the rewritten question:\n\n\"Which disorder is E11.9?\"", "Which disorder is E11.9?"),
    ("It's fine'", "It's fine'"),  # quotes are stripped only in pairs
    ("   \n  ", ""),
])
def test_clean_paraphrase_keeps_the_first_line_without_labels_or_quotes(reply, expected):
    assert clean_paraphrase(reply) == expected


def test_variant_ids_are_stable_distinct_and_sort_after_every_read_record():
    largest_read = record_id(127, (1 << 23) - 1, (1 << 32) - 1)  # the config allows at most 127 sources
    ids = [variant_id(record_id(s, 0, r), k) for s in (0, 3) for r in range(200) for k in range(4)]
    assert len(set(ids)) == len(ids)
    assert min(ids) >= VARIANT_ID_BASE > largest_read and max(ids) < 1 << 63
    assert variant_id(7, 1) == variant_id(7, 1) != variant_id(7, 2)


def test_source_similarity_folds_case_and_punctuation_and_scores_shingles():
    question = "What does ICD-10-CM code E11.9 mean?"
    assert source_similarity("what does icd10cm code e119 mean", question, 5) == 1.0
    assert source_similarity("Which condition is described by the code E11.9?", question, 5) < 0.5
    assert 0 < source_similarity("What does ICD-10-CM code E11.9 mean in practice?", question, 5) < 1


@pytest.mark.parametrize("overrides, expected", [
    (["data.augment.temperature=0"], "augment.temperature = 0 (greedy) gives the same paraphrase every time"),
    (["data.augment.fields=[answer]"], "must include 'question' (allowed: question, answer)"),
    (["data.augment.fields=[title]"], "'question' or 'answer'"),
    (["data.augment.question_prompt=Rewrite it"], "augment.question_prompt must contain '{text}'"),
    (["data.augment.registry=runs/registry"], "augment.registry needs augment.adapter"),
    (["data.augment.variants=0"], "data.augment.variants = 0"),
    (["data.augment.enabled=true", "data.augment.sources=[kjv]"],
     "augment.sources: 'kjv' is not a source that can hold instruction records; those are: qa"),
    (["data.augment.enabled=true", "data.sources=[{name: k, kind: kjv}]"], "no source can hold instruction records"),
])
def test_bad_augment_settings_name_key_value_and_allowed(overrides, expected):
    base = ["data.sources=[{name: qa, kind: jsonl, path: qa.jsonl}, {name: kjv, kind: kjv, eval_only: true}]"]
    with pytest.raises(ConfigError) as err:
        load_config(PrepareConfig, None, base + overrides)
    assert expected in str(err.value)


def test_the_shipped_augment_job_turns_it_on():
    from pathlib import Path

    cfg = load_config(PrepareConfig, Path(__file__).parents[2] / "jobs" / "prepare_augment_icd10.yaml")
    assert cfg.data.augment.enabled and cfg.data.augment.variants >= 1


def config(tmp_path, tiny_model, **augment) -> PrepareConfig:
    return load_config(PrepareConfig, None, [
        f"model.name_or_path={tiny_model}", f"output_dir={tmp_path}", "data.val_fraction=0.5",
        "data.sources=[{name: qa, kind: jsonl, path: qa.jsonl, fields: {prompt: question, response: answer}}]",
        "data.augment.enabled=true", *[f"data.augment.{k}={v}" for k, v in augment.items()]])


RECORDS = [{"source": "qa", "id": record_id(0, 0, i), "origin": f"qa.jsonl:{i + 1}", "group": f"code-{i}",
            "prompt": f"What does code A{i:02d}.1 mean?", "response": f"Cholera number {i}"} for i in range(3)]


def test_paraphraser_emits_seeded_variants_with_their_source_and_group(tiny_model, tmp_path):
    aug = config(tmp_path, tiny_model, variants=2, fields="[question, answer]", max_new_tokens=8).data.augment
    paraphraser = Paraphraser((tiny_model, None), None, aug, seed=0)
    batch = {k: np.array([r[k] for r in RECORDS]) for k in RECORDS[0]}
    rows = paraphraser(batch)
    assert len(rows["id"]) == 6 and rows == paraphraser(batch)  # the same seeds give the same bytes
    assert rows["augmented_from"] == [r["id"] for r in RECORDS for _ in range(2)]
    assert rows["id"] == [variant_id(r["id"], k) for r in RECORDS for k in range(2)]
    raws = [json.loads(raw) for raw in rows["raw"]]
    assert [raw["group"] for raw in raws] == [r["group"] for r in RECORDS for _ in range(2)]
    assert (rows["source_prompt"][0], rows["source_response"][0]) == (RECORDS[0]["prompt"], RECORDS[0]["response"])
    assert rows["origin"][1] == "qa.jsonl:1 (paraphrase 2)" and set(rows["error"]) == {""}
    assert raws[0]["prompt"] != raws[1]["prompt"]  # each variant has its own seed


def test_variant_processor_drops_copies_of_the_source_and_quarantines_empty_paraphrases(tiny_model, tmp_path):
    cfg = config(tmp_path, tiny_model)
    settings = processor_settings(cfg, resolve_template("tokenizer", load_tokenizer(tiny_model)), lsh_settings(cfg))
    source = RECORDS[0]
    questions = ["WHAT does code A001 mean", "", "Which illness is coded as A00.1 in the classification?",
                 "What does code A00.1 mean, please?", "Which illness has the code A00.2?",
                 "Code A00.1 means cholera."]
    n = len(questions)
    batch = {"source": np.array(["qa"] * n), "id": np.array([variant_id(source["id"], k) for k in range(n)]),
             "origin": np.array(["x"] * n), "error": np.array([""] * n),
             "raw": np.array([json.dumps({"prompt": q, "response": source["response"], "group": source["group"]})
                              for q in questions]),
             "augmented_from": np.array([source["id"]] * n), "source_prompt": np.array([source["prompt"]] * n),
             "source_response": np.array([source["response"]] * n)}
    rules = variant_rules(cfg) | {"threshold": 0.5}
    table = VariantProcessor((tiny_model, None), settings, None, rules)(batch).to_pylist()
    assert [(r["status"], r["reason"]) for r in table] == [
        (DROPPED, "same_as_source"), (QUARANTINED, "empty_prompt"), (KEPT, ""), (DROPPED, "near_source"),
        (DROPPED, "lost_numbers"), (DROPPED, "not_a_question")]
    kept = table[2]
    assert kept["group"] == source["group"] and kept["augmented_from"] == source["id"]
    assert kept["split"] == assign_split(cfg.data.seed, "qa", source["group"], 0.5)  # beside its source
    assert kept["exact_key"] != 0 and len(kept["input_ids"]) > 0


def test_count_variants_tallies_outcomes_and_kept_per_record_across_batches():
    from honed.data.augment import count_variants

    def batch(rows):
        return {k: np.array([r[i] for r in rows]) for i, k in enumerate(("source", "augmented_from", "status",
                                                                          "reason"))}

    batches = [batch([("qa", 1, KEPT, ""), ("qa", 1, DROPPED, "near_source"), ("qa", 2, QUARANTINED, "empty_prompt")]),
               batch([("qa", 2, DROPPED, "near_source"), ("qa", 3, KEPT, ""), ("qa", 3, KEPT, ""),
                      ("web", 9, DROPPED, "exact_duplicate")])]
    counts = count_variants(batches)
    assert counts["qa"] == {"records": 3, "generated": 6, "kept": 3, "dropped": {"near_source": 2},
                            "quarantined": {"empty_prompt": 1}, "kept_per_record": {"0": 1, "1": 1, "2": 1}}
    assert counts["web"]["kept_per_record"] == {"0": 1} and counts["web"]["dropped"] == {"exact_duplicate": 1}


def test_numbered_terms_are_the_words_with_digits():
    assert numbered_terms("Is code E11.9 (type 2) in 2024's list?") == {"e11.9", "2", "2024's"}


@pytest.mark.parametrize("variant, fields, expected", [
    (("Which disease has the ICD-10-CM code E11.9?", "Type 2 diabetes"), ["question"], ""),
    (("Which disease has the ICD-10-CM code E11?", "Type 2 diabetes"), ["question"], "lost_numbers"),
    (("The ICD-10-CM code E11.9 is diabetes.", "Type 2 diabetes"), ["question"], "not_a_question"),
    (("Which disease has the ICD-10-CM code E11.9?", "Diabetes, type two"), ["question", "answer"], "lost_numbers"),
    (("Which disease has the ICD-10-CM code E11.9?", "Diabetes of type 2"), ["question", "answer"], ""),
])
def test_variant_problem_names_why_a_paraphrase_goes(variant, fields, expected):
    rules = {"fields": fields, "threshold": 0.85, "shingle_words": 5, "numbers": True, "question": True}
    assert variant_problem(variant, ("What does ICD-10-CM code E11.9 mean?", "Type 2 diabetes"), rules) == expected
    assert variant_problem(variant, ("What does ICD-10-CM code E11.9 mean?", "Type 2 diabetes"),
                           rules | {"numbers": False, "question": False}) == ""

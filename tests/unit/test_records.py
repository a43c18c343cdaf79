"""Per-record data steps on hand-made data: parse, clean, template + label mask, split, bundled sources."""

import json

import pytest

from honed.data.records import BadRecord, assign_split, clean_text, encode_example, group_key, parse_record
from honed.data.sources import icd10_records, kjv_records


@pytest.mark.parametrize("raw, reason", [
    ("{not json", "malformed_json"),
    ("", "malformed_json"),
    ("[1, 2]", "not_an_object"),
    ('{"prompt": "p"}', "missing_field"),
    ('{"response": "r"}', "missing_field"),
    ('{"other": 1}', "missing_field"),
    ('{"prompt": "p", "response": 3}', "wrong_type"),
    ('{"text": null}', "wrong_type"),
])
def test_bad_records_carry_a_reason(raw, reason):
    with pytest.raises(BadRecord) as err:
        parse_record(raw)
    assert err.value.reason == reason


def test_parse_keeps_fields_and_group():
    assert parse_record('{"prompt": "p", "response": "r", "group": 7, "x": 1}') == {
        "prompt": "p", "response": "r", "group": "7"}
    assert parse_record('{"text": "t"}') == {"text": "t", "group": None}


@pytest.mark.parametrize("raw, clean", [
    ("  a \t  b  ", "a b"),
    ("bell\x07 and nul\x00", "bell and nul"),
    ("line one  \n\n\n  line two", "line one\nline two"),
    ("cafe\u0301", "caf\u00e9"),            # NFC joins the combining accent
    ("non\u00a0breaking", "non breaking"),
    ("\x85\x9f", ""),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_instruction_example_masks_the_prompt_and_ends_with_eos(tiny_model):
    from honed.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    ex = encode_example({"prompt": "What does E11.9 mean?", "response": "Type 2 diabetes"}, tok, "Be brief.")
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    n_masked = labels.count(-100)
    assert 0 < n_masked < len(ids) and all(x == -100 for x in labels[:n_masked])
    assert labels[n_masked:] == ids[n_masked:]
    assert tok.decode(ids[:n_masked]).endswith("<|im_start|>assistant\n")
    assert "Be brief." in tok.decode(ids[:n_masked])
    assert tok.eos_token_id in labels[n_masked:]
    assert tok.decode([i for i in labels if i != -100]).startswith("Type 2 diabetes<|im_end|>")
    full = encode_example({"prompt": "q", "response": "a"}, tok, None, loss_on="all")
    assert -100 not in full["labels"]


def test_text_example_scores_every_token_plus_eos(tiny_model):
    from honed.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    ex = encode_example({"text": "In the beginning"}, tok, "ignored for text")
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tok.eos_token_id


def test_split_is_deterministic_by_group_and_near_the_fraction():
    groups = [f"g{i}" for i in range(4000)]
    first = [assign_split(0, "s", g, 0.1) for g in groups]
    assert first == [assign_split(0, "s", g, 0.1) for g in groups]
    assert 0.08 < first.count("val") / len(groups) < 0.12
    assert first != [assign_split(1, "s", g, 0.1) for g in groups]  # the seed matters
    assert set(assign_split(0, "s", g, 0.0) for g in groups) == {"train"}


def test_group_key_defaults_to_content_hash():
    assert group_key({"group": "E11.9", "prompt": "x"}) == "E11.9"
    assert group_key({"group": None, "prompt": "x"}) == group_key({"group": None, "prompt": "x"})
    assert group_key({"group": None, "text": "x"}) != group_key({"group": None, "text": "y"})


def test_icd10_records_are_grouped_by_code_with_generalisable_answers():
    records = icd10_records(["4"])
    by_code = {}
    for r in records:
        by_code.setdefault(r["group"], []).append(r)
    diabetes = {r["prompt"]: r["response"] for r in by_code["E11.9"]}
    assert diabetes["What does ICD-10-CM code E11.9 mean?"] == "Type 2 diabetes mellitus without complications"
    assert diabetes["Which ICD-10-CM chapter contains code E11.9?"].startswith("Chapter 4: Endocrine")
    assert diabetes["Which ICD-10-CM category does code E11.9 belong to?"] == "E11: Type 2 diabetes mellitus"
    assert len(by_code) > 500
    sample = icd10_records(["4"], max_records=100, seed=3)
    assert len(sample) == 100 and sample == icd10_records(["4"], max_records=100, seed=3)
    with pytest.raises(ValueError, match="chapters are 1-22"):
        icd10_records(["99"])


def test_kjv_records_are_general_text():
    verses = kjv_records(max_records=5, seed=0)
    assert len(verses) == 5 and all(v["text"] and v["group"] for v in verses)
    json.dumps(verses)

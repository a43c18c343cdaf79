"""Per-record data steps on hand-made data: parse, clean, template + label mask, split, bundled sources."""

import json

import pytest

from honed.data.records import (
    BadRecord, assign_split, empty_field, encode_example, group_key, map_texts, parse_record,
)
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
        "kind": "instruction", "prompt": "p", "response": "r", "group": "7"}
    assert parse_record('{"text": "t"}') == {"kind": "text", "text": "t", "group": None}


def test_field_mapping_and_forced_format():
    raw = '{"question": "q", "answer": "a", "body": "b", "code": "E11"}'
    fields = {"prompt": "question", "response": "answer", "text": "body", "group": "code"}
    assert parse_record(raw, fields) == {"kind": "instruction", "prompt": "q", "response": "a", "group": "E11"}
    assert parse_record(raw, fields, "text") == {"kind": "text", "text": "b", "group": "E11"}
    with pytest.raises(BadRecord, match="'question' and 'answer'") as err:
        parse_record('{"body": "b"}', fields, "instruction")
    assert err.value.reason == "missing_field"
    with pytest.raises(BadRecord, match="none of 'body', 'question', 'answer', 'messages'"):
        parse_record('{"other": 1}', fields)


@pytest.mark.parametrize("messages, reason", [
    ("not a list", "wrong_type"),
    ([], "wrong_type"),
    ([{"role": "user", "content": "hi"}], "bad_messages"),                       # nothing to learn from
    ([{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}], "bad_messages"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], "bad_messages"),
    (["hi", {"role": "assistant", "content": "y"}], "bad_messages"),
])
def test_bad_chat_records(messages, reason):
    with pytest.raises(BadRecord) as err:
        parse_record(json.dumps({"messages": messages}))
    assert err.value.reason == reason


def test_map_texts_and_empty_fields():
    chat = parse_record(json.dumps({"messages": [{"role": "user", "content": " a "},
                                                 {"role": "assistant", "content": " "}]}))
    stripped = map_texts(chat, str.strip)
    assert [m["content"] for m in stripped["messages"]] == ["a", ""]
    assert empty_field(stripped) == "response"
    assert empty_field(map_texts({"kind": "instruction", "prompt": " ", "response": "r"}, str.strip)) == "prompt"
    assert empty_field({"kind": "text", "text": "x"}) is None


def test_instruction_example_masks_the_prompt_and_ends_with_eos(tiny_model):
    from honed.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    ex = encode_example({"kind": "instruction", "prompt": "What does E11.9 mean?", "response": "Type 2 diabetes"},
                        tok, "Be brief.")
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    n_masked = labels.count(-100)
    assert 0 < n_masked < len(ids) and all(x == -100 for x in labels[:n_masked])
    assert labels[n_masked:] == ids[n_masked:]
    assert tok.decode(ids[:n_masked]).endswith("<|im_start|>assistant\n")
    assert "Be brief." in tok.decode(ids[:n_masked])
    assert tok.eos_token_id in labels[n_masked:]
    assert tok.decode([i for i in labels if i != -100]).startswith("Type 2 diabetes<|im_end|>")
    full = encode_example({"kind": "instruction", "prompt": "q", "response": "a"}, tok, None, loss_on="all")
    assert -100 not in full["labels"]


def test_text_example_scores_every_token_plus_eos(tiny_model):
    from honed.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    ex = encode_example({"kind": "text", "text": "In the beginning"}, tok, "ignored for text")
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tok.eos_token_id


def test_chat_example_labels_every_assistant_turn_and_nothing_else(tiny_model):
    from honed.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    record = {"kind": "chat", "messages": [
        {"role": "user", "content": "Code E11.9?"}, {"role": "assistant", "content": "Type 2 diabetes"},
        {"role": "user", "content": "And E10.9?"}, {"role": "assistant", "content": "Type 1 diabetes"},
        {"role": "user", "content": "trailing question with no answer"}]}
    ex = encode_example(record, tok, "Be brief.")
    learned = tok.decode([i for i in ex["labels"] if i != -100])
    assert learned == "Type 2 diabetes<|im_end|>\nType 1 diabetes<|im_end|>\n"
    assert "trailing" not in tok.decode(ex["input_ids"])        # turns after the last answer teach nothing
    assert tok.decode(ex["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    own_system = {"kind": "chat", "messages": [{"role": "system", "content": "Mine."}] + record["messages"][:2]}
    assert "Be brief." not in tok.decode(encode_example(own_system, tok, "Be brief.")["input_ids"])
    everything = encode_example(record, tok, None, loss_on="all")
    assert -100 not in everything["labels"]


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca", "plain"])
def test_named_templates_label_responses_and_stop_cleanly(tiny_model, name):
    from honed.data.templates import resolve_template
    from honed.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    template = resolve_template(name, tok)
    assert tok.eos_token in template["stop"]
    record = {"kind": "instruction", "prompt": "What does E11.9 mean?", "response": "Type 2 diabetes"}
    ex = encode_example(record, tok, "Be brief.", chat_template=template["chat_template"])
    learned = tok.decode([i for i in ex["labels"] if i != -100])
    assert learned.startswith("Type 2 diabetes") and "E11.9" not in learned
    prompt = tok.decode([i for i, y in zip(ex["input_ids"], ex["labels"]) if y == -100])
    assert "What does E11.9 mean?" in prompt and "Be brief." in prompt


def test_unknown_template_and_tokenizer_without_one(tiny_model):
    from honed.data.templates import resolve_template
    from honed.models import load_tokenizer

    tok = load_tokenizer(tiny_model)
    with pytest.raises(ValueError, match="unknown template 'vicuna'; choose 'tokenizer' or one of chatml"):
        resolve_template("vicuna", tok)
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; choose a named one"):
        resolve_template("tokenizer", tok)


def test_split_is_deterministic_by_group_and_near_the_fraction():
    groups = [f"g{i}" for i in range(4000)]
    first = [assign_split(0, "s", g, 0.1) for g in groups]
    assert first == [assign_split(0, "s", g, 0.1) for g in groups]
    assert 0.08 < first.count("val") / len(groups) < 0.12
    assert first != [assign_split(1, "s", g, 0.1) for g in groups]  # the seed matters
    assert set(assign_split(0, "s", g, 0.0) for g in groups) == {"train"}


def test_group_key_defaults_to_content_hash():
    assert group_key({"kind": "instruction", "group": "E11.9", "prompt": "x"}) == "E11.9"
    a = {"kind": "instruction", "group": None, "prompt": "x"}
    assert group_key(a) == group_key(dict(a))
    assert group_key({"kind": "text", "group": None, "text": "x"}) != group_key({"kind": "text", "group": None,
                                                                                "text": "y"})


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

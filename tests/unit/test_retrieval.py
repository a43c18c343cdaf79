"""Retrieval without Ray: chunking, prepare's cleaning on index records, the index directory (BM25 over codes
such as E11.9 that must not match their siblings), prompts with passages, configs and the missing-index errors."""

import json

import pytest

from honed.cli import main
from honed.config import ConfigError, EvalConfig, IndexConfig, ServeConfig, load_config
from honed.retrieval.index import chunk_settings, clean_text, split_words, unique_chunks
from honed.retrieval.search import (
    INDEX_META, IndexNotFound, RetrievalIndex, fill_template, resolve_index, with_passages, with_sources, write_index,
)

CODES = {"E11.9": "Type 2 diabetes mellitus without complications",
         "E11.8": "Type 2 diabetes mellitus with unspecified complications",
         "E10.9": "Type 1 diabetes mellitus without complications",
         "K35.80": "Unspecified acute appendicitis",
         "I10": "Essential (primary) hypertension"}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> str:
    chunks = [{"id": f"icd:{code}#0", "title": f"What does ICD-10-CM code {code} mean?", "source": "icd",
               "text": f"What does ICD-10-CM code {code} mean?\n{text}"} for code, text in CODES.items()]
    out = tmp_path_factory.mktemp("index") / "icd"
    write_index(chunks, {"top_k": 2}, str(out))
    return str(out)


def test_split_words_covers_the_text_with_overlap():
    text = " ".join(f"w{i}" for i in range(10))
    chunks = split_words(text, size=4, overlap=1)
    assert chunks == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]
    assert split_words("short\ntext kept as written", 8, 2) == ["short\ntext kept as written"]
    # the last chunk ends at the text's end, even where the step does not land there
    assert split_words(" ".join(f"w{i}" for i in range(11)), 4, 1)[-1] == "w7 w8 w9 w10"


def test_records_are_cleaned_as_prepare_cleans_them():
    cfg = IndexConfig(sources=[{"name": "notes", "kind": "jsonl", "path": "x.jsonl"}])
    settings = chunk_settings(cfg)
    text, status, _ = clean_text("notes", json.dumps({"prompt": "Mail  me?", "response": "at a.b@example.com"}), "",
                                 settings)
    assert (text, status) == ("Mail me?\nat <EMAIL>", "kept")  # whitespace normalised, PII redacted
    assert clean_text("notes", "{not json", "", settings)[1:] == ("quarantined", "malformed_json")
    assert clean_text("notes", "x" * 10, "too_large", settings)[1:] == ("quarantined", "too_large")
    assert clean_text("notes", json.dumps({"text": "#### ### ## #"}), "", settings)[1] == "dropped"


def test_identical_chunks_are_indexed_once_and_every_record_is_counted():
    rows = [{"id": "s:a#0", "title": "a", "source": "s", "text": "same", "status": "kept", "reason": ""},
            {"id": "s:b#0", "title": "b", "source": "s", "text": "same", "status": "kept", "reason": ""},
            {"id": "s:b#1", "title": "b", "source": "s", "text": "other", "status": "kept", "reason": ""},
            {"id": "s:c#0", "title": "", "source": "s", "text": "", "status": "dropped", "reason": "quality_x"},
            {"id": "s:d#0", "title": "", "source": "s", "text": "", "status": "quarantined", "reason": "not_utf8"}]
    chunks, counts = unique_chunks(rows)
    assert [c["id"] for c in chunks] == ["s:a#0", "s:b#1"]
    assert counts == {"read": 4, "kept_records": 2, "chunks": 2, "duplicate_chunks": 1,
                      "dropped": {"quality_x": 1}, "quarantined": {"not_utf8": 1}}


def test_search_finds_the_exact_code_not_its_siblings(index_dir):
    index = RetrievalIndex(index_dir)
    assert index.meta["chunks"] == 5 and index.meta["retriever"]["kind"] == "bm25s"
    hits = index.search("What does ICD-10-CM code E11.9 mean?")
    assert len(hits) == 2 and hits[0]["id"] == "icd:E11.9#0"  # default top_k from index.json
    assert hits[0]["score"] > hits[1]["score"]
    by_text = index.search("What is the code for essential hypertension?", top_k=1)
    assert [h["id"] for h in by_text] == ["icd:I10#0"]
    assert index.search("zebra quantum", top_k=3) == []  # no shared word: nothing, not noise
    assert len(index.search("diabetes mellitus", top_k=50)) == 3  # top_k above the corpus size is clamped


def test_passages_go_where_the_template_says(index_dir):
    index = RetrievalIndex(index_dir)
    settings = load_config(EvalConfig, None, [f"retrieval.index={index_dir}", "retrieval.top_k=1",
                                              "retrieval.template='Facts: {passages} Q: {question}'"]).retrieval
    chat = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "essential hypertension"},
                         {"role": "assistant", "content": "ok"}, {"role": "user", "content": "appendicitis code?"}],
            "max_tokens": 8}
    request, sources = with_sources(chat, settings, index)
    assert request["messages"][3]["content"].startswith("Facts: [1] What does ICD-10-CM code K35.80 mean?")
    assert request["messages"][3]["content"].endswith("Q: appendicitis code?")
    assert request["messages"][1]["content"] == "essential hypertension" and request["max_tokens"] == 8
    assert chat["messages"][3]["content"] == "appendicitis code?"  # the caller's request is not changed
    assert [s["id"] for s in sources] == ["icd:K35.80#0"] and set(sources[0]) == {"id", "title", "score"}
    completion, sources = with_sources({"prompt": "hypertension"}, settings, index)
    assert "I10" in completion["prompt"] and sources[0]["id"] == "icd:I10#0"
    asked = with_passages([{"prompt": "appendicitis code?", "response": "K35.80"}], settings)
    assert asked[0]["question"] == "appendicitis code?" and "K35.80" in asked[0]["prompt"]
    assert fill_template("{passages}|{question}", "q", []) == "|q"


def test_a_missing_index_names_its_path_and_how_to_build_it(tmp_path):
    missing = str(tmp_path / "nowhere")
    for attempt in (lambda: RetrievalIndex(missing), lambda: resolve_index(missing)):
        with pytest.raises(IndexNotFound, match=rf"no retrieval index at '{missing}' \({INDEX_META} missing\): "
                                                r"build it with `honed index jobs/index_icd10.yaml output_dir="):
            attempt()
    with pytest.raises(ValueError, match="nothing to index"):
        write_index([], {"top_k": 1}, str(tmp_path / "empty"))


@pytest.mark.parametrize("template, problem", [
    ("Context: {passages}", r"missing: \['question'\]"),
    ("{passages} {question} {extra}", r"unknown: \['extra'\]"),
    ("{passages {question}", "not a format string"),
])
def test_a_bad_template_names_the_slots_allowed(template, problem):
    with pytest.raises(ConfigError, match=rf"retrieval.template = .*{problem}"):
        load_config(EvalConfig, None, ["retrieval.index=x", f"retrieval.template={json.dumps(template)}"])


def test_index_and_serve_configs_refuse_bad_values():
    with pytest.raises(ConfigError, match="chunk_overlap = 50 must be below chunk_words = 40"):
        load_config(IndexConfig, None, ["chunk_words=40", "chunk_overlap=50"])
    with pytest.raises(ConfigError, match=r"retrieval: 'icd10' is not a served model; served: base"):
        load_config(ServeConfig, None, ["retrieval.icd10.index=x"])
    cfg = load_config(ServeConfig, None, ["adapters.icd10=a", "retrieval.icd10.index=x", "retrieval.base.index=y"])
    assert cfg.retrieval["icd10"].top_k is None and cfg.retrieval["base"].index == "y"
    with pytest.raises(ConfigError, match="retrieval.base.index: required"):
        load_config(ServeConfig, None, ["retrieval.base.top_k=2"])


def test_the_cli_stops_before_ray_on_a_missing_index_or_no_sources(tmp_path, capsys):
    missing = tmp_path / "no-index"
    assert main(["eval", f"retrieval.index={missing}"]) == 1
    assert f"no retrieval index at '{missing}'" in capsys.readouterr().err
    assert main(["serve", f"retrieval.base.index={missing}"]) == 1
    assert "honed index jobs/index_icd10.yaml" in capsys.readouterr().err
    assert main(["index", f"output_dir={tmp_path / 'out'}"]) == 1
    assert "`sources` is empty" in capsys.readouterr().err
    assert main(["index", f"sources=[{{name: notes, kind: jsonl, path: {tmp_path / 'none.jsonl'}}}]"]) == 1
    assert "source 'notes': no jsonl file at" in capsys.readouterr().err

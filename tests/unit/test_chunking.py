"""Long text documents are kept as token windows: the windows tile the document (every token labelled once, the
overlap as unlabelled context), the processor keeps a long text document whole for dedup and decontamination and
drops a long instruction example, and `split_windows` turns a processed row into its windows (no Ray here)."""

import json
import random

import numpy as np
import pytest

from honed.config import PrepareConfig, load_config
from honed.data.dedup import NgramIndex
from honed.data.pipeline import lsh_settings, processor_settings
from honed.data.processing import ExampleProcessor, split_windows
from honed.data.records import DROPPED, KEPT, token_windows, window_spans
from honed.data.templates import resolve_template
from honed.models import load_tokenizer

LIMIT = 64
WORDS = ("harbour tide lantern rope keel sail gull fog reef anchor mast stern wind shore chart compass cabin deck "
         "current island beacon storm calm wave hull oar net salt cliff bay dune rain star night dawn north").split()


def sentences(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."
                    for _ in range(n))


@pytest.mark.parametrize("n, size, overlap", [(64, 64, 0), (65, 64, 0), (320, 64, 0), (320, 64, 16), (1000, 64, 63),
                                               (129, 64, 8)])
def test_windows_tile_the_document_once_with_the_overlap_as_context(n, size, overlap):
    spans = window_spans(n, size, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(0 < end - start <= size for start, end, _ in spans)
    if n > size:
        assert all(end - start == size for start, end, _ in spans)  # the last window ends at the end, full length
    for (s0, e0, _), (s1, e1, first) in zip(spans, spans[1:]):
        assert e0 - s1 >= overlap and first == e0 < e1  # at least `overlap` tokens repeated, new ones after
    ids = list(range(n))
    windows = token_windows(ids, ids, size, overlap)
    assert [t for _, labels in windows for t in labels if t != -100] == ids  # each token trained on exactly once
    assert [x for x, _ in windows] == [ids[s:e] for s, e, _ in spans]


def settings_for(model: str, **data) -> dict:
    cfg = load_config(PrepareConfig, None, [f"model.name_or_path={model}", "data.sources=[{name: s, kind: jsonl, "
                                            "path: x.jsonl}]"] + [f"data.{k}={v}" for k, v in data.items()])
    template = resolve_template(cfg.data.template.name, load_tokenizer(model))
    return processor_settings(cfg, template, lsh_settings(cfg))


def process(model: str, records: list[dict], decontam=None, **data):
    batch = {"source": np.array(["s"] * len(records)), "raw": np.array([json.dumps(r) for r in records]),
             "error": np.array([""] * len(records)), "origin": np.array([f"x.jsonl:{i + 1}" for i in range(len(records))]),
             "id": np.arange(len(records))}
    return ExampleProcessor(model, settings_for(model, max_seq_len=LIMIT, **data), decontam)(batch)


def test_a_long_text_document_is_kept_whole_and_a_long_instruction_dropped(tiny_model):
    doc = sentences(60, seed=1)
    table = process(tiny_model, [{"text": doc}, {"prompt": doc, "response": "Yes."}, {"text": "A short note."}])
    rows = table.to_pylist()
    n_doc = len(load_tokenizer(tiny_model)(doc)["input_ids"]) + 1  # + EOS
    assert n_doc >= 5 * LIMIT
    assert rows[0]["status"] == KEPT and rows[0]["num_tokens"] == n_doc == len(rows[0]["input_ids"])
    assert rows[0]["exact_key"] != 0 and len(rows[0]["signature"]) == 128  # dedup keys of the whole document
    assert (rows[1]["status"], rows[1]["reason"]) == (DROPPED, "too_long")
    assert rows[2]["status"] == KEPT
    off = process(tiny_model, [{"text": doc}], **{"chunk.enabled": "false"}).to_pylist()[0]
    assert (off["status"], off["reason"]) == (DROPPED, "too_long")


def test_decontamination_sees_the_whole_document(tiny_model):
    doc = sentences(60, seed=2)
    late = " ".join(doc.split()[-20:])  # an eval item matching only the document's tail (past its first window)
    index = NgramIndex([late], 13)
    rows = process(tiny_model, [{"text": doc}, {"text": sentences(60, seed=3)}], decontam=index).to_pylist()
    assert (rows[0]["status"], rows[0]["reason"]) == (DROPPED, "contaminated")
    assert rows[1]["status"] == KEPT


@pytest.mark.parametrize("overlap", [0, 16])
def test_split_windows_turns_a_long_document_into_windows_of_one_group(tiny_model, overlap):
    doc = sentences(60, seed=4)
    table = process(tiny_model, [{"text": doc, "group": "g1"}, {"text": "A short note.", "group": "g2"}])
    table = table.set_column(table.schema.get_field_index("split"), "split", [["train", "val"]])
    out = split_windows(table, LIMIT, overlap, tiny_model).to_pylist()
    whole = table.to_pylist()[0]
    windows = [r for r in out if r["group"] == "g1"]
    assert len(windows) == len(window_spans(whole["num_tokens"], LIMIT, overlap)) >= 5
    assert [r["window"] for r in windows] == list(range(len(windows)))
    assert {(r["id"], r["split"], r["source"], r["kind"]) for r in windows} == {(0, "train", "s", "text")}
    assert all(len(r["input_ids"]) == len(r["labels"]) == r["num_tokens"] <= LIMIT for r in windows)
    assert [t for r in windows for t in r["labels"] if t != -100] == whole["input_ids"]  # every token, once
    assert all(r["text"] and r["text"] in doc for r in windows[:-1])  # each window's own text
    short = [r for r in out if r["group"] == "g2"]
    assert len(short) == 1 and short[0]["window"] == 0 and short[0]["text"] == "A short note."


def test_rows_that_fit_pass_through_as_window_zero(tiny_model):
    table = process(tiny_model, [{"text": "A short note."}, {"prompt": "Why?", "response": "Because."}])
    out = split_windows(table, LIMIT, 0, tiny_model)
    assert out.column("window").to_pylist() == [0, 0]
    assert out.drop_columns(["window"]).equals(table)


@pytest.mark.parametrize("overrides, expected", [
    (["data.chunk.overlap=256"], "chunk.overlap = 256 must be below max_seq_len = 256"),
    (["data.chunk.overlap=-1"], "data.chunk.overlap = -1"),
    (["data.chunk.size=3"], "data.chunk.size: unknown key; allowed here: enabled, overlap"),
])
def test_bad_chunk_settings_are_named(overrides, expected):
    from honed.config import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(PrepareConfig, None, ["data.sources=[{name: s, kind: text, path: x}]", *overrides])
    assert expected in str(err.value)


def test_chunking_is_on_by_default_without_overlap():
    cfg = load_config(PrepareConfig, None, ["data.sources=[{name: s, kind: text, path: x}]"])
    assert cfg.data.chunk.enabled and cfg.data.chunk.overlap == 0

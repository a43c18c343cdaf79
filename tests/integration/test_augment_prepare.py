"""Paraphrase augmentation inside `honed prepare` on a real local Ray: the tiny random model for the mechanics
(counts per source, groups, the split, quarantine of empty paraphrases), the embedded model (slow) for
paraphrases a reader would accept."""

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from honed.config import PrepareConfig, load_config

CODES = 12


def write_corpus(path: Path) -> Path:
    """Two questions per code (the group), under column names of their own; one exact duplicate."""
    rows = []
    for i in range(CODES):
        rows += [{"question": f"What does code K{i:02d}.1 mean?", "answer": f"Disorder number {i} of the gut",
                  "code": f"K{i:02d}.1"},
                 {"question": f"Which chapter holds code K{i:02d}.1?", "answer": "Chapter 11: digestive system",
                  "code": f"K{i:02d}.1"}]
    rows.append(dict(rows[0]))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare_with(tmp_path: Path, model: str, *overrides: str) -> dict:
    from honed.data.pipeline import prepare

    corpus = write_corpus(tmp_path / "qa.jsonl")
    cfg = load_config(PrepareConfig, None, [
        f"model.name_or_path={model}", f"output_dir={tmp_path / 'data'}", "data.val_fraction=0.3",
        f"data.sources=[{{name: qa, kind: jsonl, path: '{corpus}', "
        "fields: {prompt: question, response: answer, group: code}}]",
        # the tiny model's paraphrases are random tokens: neither English, nor questions, nor holding the codes
        "data.filters.enabled=false", "data.augment.require_numbers=false", "data.augment.require_question=false",
        "data.augment.enabled=true", "data.augment.max_new_tokens=12", "data.augment.concurrency=1", *overrides])
    manifest = prepare(cfg)
    shards = tmp_path / "data" / "shards"
    return {"manifest": manifest, "dir": tmp_path / "data", "train": pq.read_table(shards / "train").to_pylist(),
            "val": pq.read_table(shards / "val").to_pylist()}


@pytest.fixture(scope="module")
def augmented(ray_local, tiny_model, tmp_path_factory):
    return prepare_with(tmp_path_factory.mktemp("augment"), tiny_model, "data.augment.variants=2")


def test_read_counts_reconcile_and_paraphrases_are_counted_apart(augmented):
    m = augmented["manifest"]
    qa = m["counts"]["by_source"]["qa"]
    assert qa["read"] == 2 * CODES + 1 == qa["train"] + qa["val"] + sum(qa["dropped"].values())
    assert qa["dropped"] == {"exact_duplicate": 1}
    a = m["augment"]["by_source"]["qa"]
    assert a["records"] == qa["train"] and a["generated"] == 2 * qa["train"]  # every kept training record, twice
    assert a["generated"] == a["kept"] + sum(a["dropped"].values()) + sum(a["quarantined"].values())
    assert sum(a["kept_per_record"].values()) == a["records"]
    assert sum(int(k) * n for k, n in a["kept_per_record"].items()) == a["kept"]
    assert m["augment"]["total"]["kept"] == a["kept"] > 0
    assert m["shards"]["train_rows"] == qa["train"] + a["kept"]
    assert "## Augmentation" in (augmented["dir"] / "report.md").read_text()


def test_paraphrases_train_beside_their_source_and_validation_holds_originals(augmented):
    train, val = augmented["train"], augmented["val"]
    assert val and all(r["augmented_from"] == -1 for r in val)
    originals = {r["id"]: r for r in train if r["augmented_from"] == -1}
    variants = [r for r in train if r["augmented_from"] != -1]
    assert len(variants) == augmented["manifest"]["augment"]["total"]["kept"]
    assert all(originals[v["augmented_from"]]["group"] == v["group"] for v in variants)
    assert not {v["group"] for v in variants} & {r["group"] for r in val}
    assert all(v["response"] == originals[v["augmented_from"]]["response"] for v in variants)  # fields: [question]
    assert all(v["prompt"] != originals[v["augmented_from"]]["prompt"] for v in variants)


@pytest.mark.slow  # a second whole prepare run; the fast unit test checks the quarantine verdict itself
def test_empty_paraphrases_are_quarantined_with_their_origin(ray_local, tiny_model, tmp_path):
    """A model whose final norm is zero scores every token 0: greedy decoding picks token 0, a special token that
    decodes to nothing, so every paraphrase is empty."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    silent = AutoModelForCausalLM.from_pretrained(tiny_model)
    silent.model.norm.weight.data.zero_()
    silent.save_pretrained(tmp_path / "silent")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "silent")
    run = prepare_with(tmp_path, tiny_model, f"data.augment.model={tmp_path / 'silent'}", "data.augment.variants=1",
                       "data.augment.temperature=0", "data.augment.max_new_tokens=2")
    a = run["manifest"]["augment"]["by_source"]["qa"]
    assert a["quarantined"] == {"empty_prompt": a["generated"]} and a["kept"] == 0 < a["generated"]
    rows = [json.loads(line) for f in (run["dir"] / "quarantine").glob("*.json") for line in f.read_text().splitlines()]
    assert len(rows) == a["generated"] and all(r["origin"].endswith("(paraphrase 1)") for r in rows)
    assert all(json.loads(r["raw"])["prompt"] == "" for r in rows)
    assert not any(r["augmented_from"] != -1 for r in run["train"])


@pytest.mark.slow
def test_the_embedded_model_paraphrases_icd10_questions(ray_local, tmp_path):
    from honed.data.pipeline import prepare

    cfg = load_config(PrepareConfig, Path(__file__).parents[2] / "jobs" / "prepare_augment_icd10.yaml", [
        f"output_dir={tmp_path}", "data.sources.0.max_records=40", "data.augment.concurrency=1"])
    m = prepare(cfg)
    a = m["augment"]["by_source"]["icd10"]
    print(json.dumps(m["augment"], indent=1))
    assert a["generated"] == 2 * m["counts"]["by_source"]["icd10"]["train"]
    assert a["generated"] == a["kept"] + sum(a["dropped"].values()) + sum(a["quarantined"].values())
    train = pq.read_table(tmp_path / "shards" / "train").to_pylist()
    originals = {r["id"]: r for r in train if r["augmented_from"] == -1}
    code = re.compile(r"[A-Z]\d\d(\.\w+)?")
    for v in (r for r in train if r["augmented_from"] != -1):  # what stays names its code and asks
        assert code.search(originals[v["augmented_from"]]["prompt"]).group(0) in v["prompt"] and v["prompt"].endswith("?")

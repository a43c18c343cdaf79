"""`honed prepare` on a real local Ray: counts reconcile, bad records are quarantined with a reason,
validation groups never leak into training, and the shards feed the training collate."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest


def test_counts_reconcile_per_source(prepared):
    counts = prepared["manifest"]["counts"]
    for name, c in counts["by_source"].items():
        assert c["read"] == c["train"] + c["val"] + sum(c["dropped"].values()) + sum(c["quarantined"].values()), name
    total = counts["total"]
    assert total["read"] == 700 + 40 + 9
    assert total["read"] == total["train"] + total["val"] + total["dropped"] + total["quarantined"]


def test_bad_records_are_quarantined_with_reason_and_origin(prepared):
    extra = prepared["manifest"]["counts"]["by_source"]["extra"]
    assert extra["quarantined"] == {"malformed_json": 1, "missing_field": 1, "wrong_type": 1,
                                    "not_an_object": 1, "not_utf8": 1, "empty_prompt": 1}
    assert extra["dropped"] == {}
    assert extra["train"] + extra["val"] == 3
    rows = [json.loads(line) for f in Path(prepared["dir"], "quarantine").glob("*.json")
            for line in f.read_text().splitlines()]
    assert sorted(r["reason"] for r in rows) == sorted(extra["quarantined"].keys())
    assert all(r["origin"].split(":")[0].endswith("extra.jsonl") and r["source"] == "extra" and r["raw"] for r in rows)
    assert {r["origin"].split(":")[1] for r in rows} == {"4", "5", "6", "7", "8", "9"}  # 1-based line numbers
    assert any("{not json" in r["raw"] for r in rows)


def test_validation_codes_are_unseen_in_training(prepared):
    train = pq.read_table(Path(prepared["dir"], "shards", "train")).to_pylist()
    val = pq.read_table(Path(prepared["dir"], "shards", "val")).to_pylist()
    train_groups = {r["group"] for r in train if r["source"] == "icd10"}
    val_groups = {r["group"] for r in val if r["source"] == "icd10"}
    assert val_groups and train_groups and not (train_groups & val_groups)
    assert {r["source"] for r in val} >= {"icd10", "kjv"}            # per-source validation sets
    assert not any(r["source"] == "kjv" for r in train)               # eval-only probe stays out of training
    assert len(train) == prepared["manifest"]["counts"]["total"]["train"]
    assert all(len(r["input_ids"]) == len(r["labels"]) == r["num_tokens"] <= 160 for r in train)


def test_manifest_records_template_tokenizer_and_tokens(prepared):
    m = prepared["manifest"]
    assert m["template"]["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in m["template"]["chat_template"]
    assert m["template"]["system_prompt"] == prepared["config"].data.system_prompt
    assert len(m["model"]["weights_sha256"]) == 64 and len(m["model"]["tokenizer_sha256"]) == 64
    from honed.models import load_tokenizer, model_dir  # what training workers use instead of loading it
    assert m["model"]["pad_token_id"] == load_tokenizer(model_dir(prepared["config"].model)).pad_token_id
    assert m["tokens"]["train"]["examples"] == m["counts"]["total"]["train"] and m["tokens"]["train"]["max"] <= 160
    assert "| extra |" in Path(prepared["dir"], "report.md").read_text()


def test_shards_feed_the_training_collate(prepared):
    import numpy as np

    from honed.train.collate import collate

    rows = pq.read_table(Path(prepared["dir"], "shards", "train")).slice(0, 4).to_pydict()
    batch = collate({k: np.array(v, dtype=object) for k, v in rows.items()}, pad_id=0, device="cpu")
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"] != -100).any()


def test_missing_input_fails_up_front(ray_local, tiny_model, tmp_path):
    from honed.config import PrepareConfig
    from honed.data.pipeline import prepare

    cfg = PrepareConfig.model_validate({
        "model": {"name_or_path": tiny_model}, "output_dir": str(tmp_path / "out"),
        "data": {"sources": [{"name": "x", "kind": "jsonl", "path": str(tmp_path / "missing" / "*.jsonl")}]}})
    with pytest.raises(FileNotFoundError, match="source 'x': no jsonl file at .*missing"):
        prepare(cfg)


def test_processing_actors_tokenize_on_the_cpus_they_hold(ray_local):
    """A 1-CPU worker turns the tokenizer's own thread pool off; a worker holding 2 CPUs keeps it."""
    import ray

    from honed.data.pipeline import tokenizer_threads_within_allocation

    @ray.remote
    def setting() -> str | None:
        import os

        os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the library's default: every core
        tokenizer_threads_within_allocation()
        return os.environ["TOKENIZERS_PARALLELISM"]

    assert ray.get(setting.options(num_cpus=1).remote()) == "false"
    assert ray.get(setting.options(num_cpus=2).remote()) == "true"

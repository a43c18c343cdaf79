"""Decontamination check: which eval items share a word n-gram with the training shards.

    report = contamination_check(eval_items, "runs/data/shards/train", n=13)
    report["contaminated"], report["fraction"], report["examples"]

The eval items' n-grams form one `NgramIndex` (the data pipeline's, same normalisation and hashes); the training
shards are streamed in Parquet batches and only their n-grams that hit the index are kept, so the corpus is never
held in memory. An item with fewer than `n` words has no n-gram and cannot match: `too_short` counts those.
Packed shards hold token ids only; they are decoded with the tokenizer (n-grams may then span two examples).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from honed.data.dedup import NgramIndex, ngram_hashes
from honed.data.quality import text_of

TEXT_COLUMNS = ["text", "prompt", "response", "messages"]


def row_text(row: dict) -> str:
    """A shard row's words, as the pipeline's decontamination saw its record (honed.data.quality.text_of): `text`,
    else prompt + response, else the chat turns' contents. Shard rows hold "" for absent fields and chat turns
    as JSON."""
    record = {k: row[k] for k in ("text", "prompt", "response") if row.get(k)}
    messages = row.get("messages")
    if messages:
        record["messages"] = json.loads(messages) if isinstance(messages, str) else messages
    return text_of(record)


def contamination_check(items: list[dict], train_dir: str | Path, n: int, tokenizer=None, examples: int = 5,
                        batch_rows: int = 2048) -> dict:
    """`items`: `{source, text}` eval items. `tokenizer` decodes packed shards (rows without text columns)."""
    index = NgramIndex([item["text"] for item in items], n)
    hits, train_rows = [], 0
    for texts in train_texts(train_dir, tokenizer, batch_rows):
        train_rows += len(texts)
        grams = np.fromiter((h for text in texts for h in ngram_hashes(text, n)), dtype=np.int64)
        hits.append(np.unique(grams[np.isin(grams, index.hashes)]))
    hit = np.unique(np.concatenate(hits)) if hits else np.empty(0, dtype=np.int64)
    by_source: dict[str, dict] = {}
    found, too_short = [], 0
    for item in items:
        grams = np.fromiter(ngram_hashes(item["text"], n), dtype=np.int64)
        counts = by_source.setdefault(item["source"], {"checked": 0, "contaminated": 0})
        counts["checked"] += 1
        too_short += not len(grams)
        if len(grams) and np.isin(grams, hit).any():
            counts["contaminated"] += 1
            found.append({"source": item["source"], "text": item["text"][:200]})
    return {"ngram": n, "checked": len(items), "contaminated": len(found),
            "fraction": round(len(found) / len(items), 4) if items else 0.0, "too_short": too_short,
            "train_rows": train_rows, "by_source": by_source, "examples": found[:examples]}


def train_texts(train_dir: str | Path, tokenizer, batch_rows: int):
    """Lists of training texts, one per Parquet batch."""
    dataset = pads.dataset(str(train_dir), format="parquet")
    columns = [c for c in TEXT_COLUMNS if c in dataset.schema.names]
    if not columns:
        if tokenizer is None:
            raise ValueError(f"{train_dir}: packed shards (no text columns) need a tokenizer to decode input_ids")
        for batch in dataset.to_batches(columns=["input_ids"], batch_size=batch_rows):
            yield tokenizer.batch_decode(batch.column("input_ids").to_pylist(), skip_special_tokens=True)
        return
    for batch in dataset.to_batches(columns=columns, batch_size=batch_rows):
        yield [row_text(row) for row in batch.to_pylist()]


def eval_file_items(paths: list[str]) -> tuple[list[dict], list[str]]:
    """Items of extra eval sets (JSONL, as `data.decontaminate.paths` takes them) and the paths not found here."""
    from honed.data.quality import text_of
    from honed.data.records import BadRecord, parse_record

    items, missing = [], []
    for path in paths:
        if not Path(path).is_file():
            missing.append(path)
            continue
        for line in Path(path).read_text().splitlines():
            try:
                items.append({"source": f"file:{Path(path).name}", "text": text_of(parse_record(line))})
            except BadRecord:
                continue
    return items, missing

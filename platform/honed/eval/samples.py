"""Which rows an evaluation scores: validation rows per source and the questions answered by generation, picked
evenly over a stable order so two runs (and the base and tuned models) see the same items."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq


def validation_rows(data_dir: str) -> dict[str, list[dict]]:
    """Every validation row per source, in a stable order (sorted by group)."""
    table = pq.read_table(Path(data_dir) / "shards" / "val").to_pylist()
    by_source: dict[str, list[dict]] = {}
    for row in sorted(table, key=lambda r: (r["source"], r["group"], r["prompt"], r["text"])):
        by_source.setdefault(row["source"], []).append(row)
    return by_source


def validation_sets(data_dir: str, max_examples: int) -> dict[str, list[dict]]:
    """Validation rows per source, in a stable order, at most `max_examples` each (spread over the source)."""
    return {s: spread(rows, max_examples) for s, rows in validation_rows(data_dir).items()}


def pick_questions(by_source: dict[str, list[dict]], probes: set[str], n: int) -> list[dict]:
    """Up to `n` questions (rows with a prompt) from each domain source, spread over it: `{source, prompt,
    response}`, sources in name order."""
    questions = []
    for source in sorted(set(by_source) - probes):
        rows = [r for r in by_source[source] if r["prompt"]]
        questions += [{"source": source, "prompt": r["prompt"], "response": r["response"]} for r in spread(rows, n)]
    return questions


def spread(rows: list, n: int) -> list:
    """`n` rows evenly spaced over the list (all of them when there are fewer)."""
    if len(rows) <= n:
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]

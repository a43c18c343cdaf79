"""Which rows an evaluation scores: validation rows per source and the questions answered by generation, picked
evenly over a stable order so two runs (and the base and tuned models) see the same items."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq


def validation_sets(data_dir: str, max_examples: int) -> dict[str, list[dict]]:
    """Validation rows per source, in a stable order (sorted by group), at most `max_examples` each."""
    table = pq.read_table(Path(data_dir) / "shards" / "val").to_pylist()
    by_source: dict[str, list[dict]] = {}
    for row in sorted(table, key=lambda r: (r["source"], r["group"], r["prompt"], r["text"])):
        by_source.setdefault(row["source"], []).append(row)
    return {s: spread(rows, max_examples) for s, rows in by_source.items()}


def pick_questions(by_source: dict[str, list[dict]], probes: set[str], n: int) -> list[dict]:
    rows = [r for s, rs in by_source.items() if s not in probes for r in rs if r["prompt"]]
    return [{"prompt": r["prompt"], "response": r["response"]} for r in spread(rows, n)]


def spread(rows: list, n: int) -> list:
    """`n` rows evenly spaced over the list (all of them when there are fewer)."""
    if len(rows) <= n:
        return rows
    return [rows[i * len(rows) // n] for i in range(n)]

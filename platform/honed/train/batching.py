"""Length-grouped batching (numpy only, so benchmark drivers can reproduce honed's batches without torch)."""

from __future__ import annotations

import numpy as np


def length_grouped(batches, group: int, seed: tuple[int, ...]):
    """Re-cut each window of `group` consecutive batches into batches of rows of similar length: the rows are
    sorted by length (stable), cut into the same number of batches of the same size, and those run in an
    order drawn from `seed` + the window's index. Deterministic in the stream, so skipping the first k
    batches on resume skips the same rows. Packed batches (with `position_ids`) pass through unchanged."""
    pending: list[dict] = []
    window = 0
    for batch in batches:
        if group <= 1 or "position_ids" in batch:
            yield batch
            continue
        pending.append(batch)
        if len(pending) == group:
            yield from _regroup(pending, (*seed, window))
            pending, window = [], window + 1
    if pending:
        yield from _regroup(pending, (*seed, window))


def _regroup(batches: list[dict], seed: tuple[int, ...]):
    columns = {}
    for key in batches[0]:
        items = [x for b in batches for x in b[key]]
        columns[key] = np.empty(len(items), dtype=object)  # rows of any length, whatever each batch held
        for i, x in enumerate(items):
            columns[key][i] = x
    lengths = np.array([len(x) for x in columns["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    bounds = np.cumsum([0] + [len(b["input_ids"]) for b in batches])
    cuts = [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
    for c in np.random.default_rng(list(seed)).permutation(len(cuts)):
        yield {k: v[cuts[c]] for k, v in columns.items()}

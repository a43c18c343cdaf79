"""From Ray Data batches (numpy columns of token lists) to model inputs on the device.

    rows = rank_rows(global_batch, rank, world, cost)    # this worker's rows (balanced by compute), `_weight`
    inputs = collate(rows, pad_id, device, flat=True)    # padding-free: one row, boundaries as kwargs

Three layouts, one contract (`input_ids`, `labels`, optional `attention_mask` / `position_ids` / boundaries,
and `n_tokens`, the real tokens): right-padded examples, packed rows with position ids, or every example of the
batch back to back in one row (`honed.train.attention.flatten`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from honed.train.attention import flatten, packed_spans


def collate(batch: dict[str, np.ndarray], pad_id: int, device: torch.device, flat: bool = False) -> dict:
    """Right-pad a batch of variable-length examples (padding gets attention 0 and label -100), or stack a
    batch of packed rows with their position ids; `flat`: every example in one row with its boundaries
    (`honed.train.attention.flatten`). `n_tokens` counts the real (non-pad) tokens."""
    if flat:
        return flat_row(batch, device)
    if "position_ids" in batch:
        stacked = {k: torch.tensor(np.stack(batch[k]), dtype=torch.long).to(device)
                   for k in ("input_ids", "labels", "position_ids")}
        return stacked | {"n_tokens": int(np.sum(batch["num_tokens"]))}
    lengths = [len(x) for x in batch["input_ids"]]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, (x, y, n) in enumerate(zip(batch["input_ids"], batch["labels"], lengths)):
        ids[row, :n] = torch.tensor(x)
        labels[row, :n] = torch.tensor(y)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device),
            "n_tokens": sum(lengths)}


def flat_row(batch: dict[str, np.ndarray], device: torch.device) -> dict:
    """The batch's examples (or the examples inside its packed rows) as one row with their boundaries."""
    packed = "position_ids" in batch
    row, boundaries = flatten(batch["input_ids"], batch["labels"], batch["position_ids"] if packed else None,
                              batch["num_tokens"] if packed else None)
    return ({k: v.to(device) for k, v in row.items()}
            | {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in boundaries.items()}
            | {"n_tokens": int(row["input_ids"].shape[1])})


def numpy_batch(table) -> dict[str, np.ndarray]:
    """A pyarrow table as Ray Data's numpy batches hold it: token lists as object arrays of int arrays."""
    out = {}
    for name in table.column_names:
        values = table[name].to_pylist()
        if values and isinstance(values[0], list):
            out[name] = np.empty(len(values), dtype=object)
            out[name][:] = [np.asarray(v) for v in values]
        else:
            out[name] = np.asarray(values)
    return out


def row_tokens(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Each row's tokens: `num_tokens` where the rows carry it (packed rows: their non-pad tokens), else the
    summed lengths of the token-id columns (a preference pair counts both answers), else 1 per row."""
    if "num_tokens" in batch:
        return np.asarray(batch["num_tokens"], dtype=np.int64)
    tokens = _per_row(batch, "input_ids", len).astype(np.int64)
    return tokens if tokens.any() else np.ones(len(tokens), dtype=np.int64)


def _per_row(batch: dict[str, np.ndarray], suffix: str, measure) -> np.ndarray:
    """`measure` of each row's token list, summed over the columns named `suffix` or `*_suffix`: ragged rows (a
    missing rejected answer counts 0) or rows of one length, as Ray Data stacks them; a column of scalars holds
    no token lists and counts 0."""
    total = np.zeros(len(next(iter(batch.values()))), dtype=np.float64)
    for name, column in batch.items():
        if name != suffix and not name.endswith("_" + suffix):
            continue
        column = np.asarray(column)
        if column.dtype == object or column.ndim == 2:
            total += [0 if x is None else measure(x) for x in column]
    return total


class RowCost(NamedTuple):
    """A row's compute beyond its tokens, relative to one token through the model's body
    (honed.train.efficiency.row_cost): `labelled` per labelled token (the output head runs at those only),
    `squared` per squared example length (causal attention's query-key pairs). Zeros: tokens alone."""

    labelled: float = 0.0
    squared: float = 0.0


def row_costs(batch: dict[str, np.ndarray], cost: RowCost = RowCost()) -> np.ndarray:
    """Each row's compute in token units: its tokens (`row_tokens`), plus `cost.labelled` per labelled token and
    `cost.squared` per squared example length (a packed row: each example it holds; a preference pair: both
    answers)."""
    out = row_tokens(batch).astype(np.float64)
    if cost.labelled:
        out += cost.labelled * _per_row(batch, "labels", lambda y: int(np.count_nonzero(np.asarray(y)[1:] != -100)))
    if cost.squared:
        out += cost.squared * squared_lengths(batch)
    return out


def squared_lengths(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Per row, its examples' squared lengths summed: the row itself (both answers of a preference pair), or in
    a packed row (with `position_ids`) each run its positions restart at 0, up to its `num_tokens`."""
    if "position_ids" not in batch:
        return _per_row(batch, "input_ids", lambda x: float(len(x)) ** 2)
    return np.array([float(sum((hi - lo) ** 2 for lo, hi in packed_spans(positions, int(n))))
                     for positions, n in zip(batch["position_ids"], batch["num_tokens"])], dtype=np.float64)


def rank_split(costs: np.ndarray, world: int) -> list[np.ndarray]:
    """Row indices of a global batch per rank, balanced by compute (`row_costs`): costliest row first to the rank
    with the least so far (ties to the lower rank), each rank's rows kept in batch order. A step waits for its
    slowest rank, and on a corpus of 20- to 1,024-token examples contiguous slices left one rank with several
    times the other's tokens. Tokens alone are not the cost either: on a CPU (SmolLM2-135M, LoRA) one fully
    labelled 1,024-token window took 11.6 s forward and backward, eight 128-token ones 8.1 s, and 1,024 tokens
    labelled at 5 % 9.1 s. Deterministic, so every rank computes the same split."""
    load, owner = np.zeros(world, dtype=np.float64), np.empty(len(costs), dtype=np.int64)
    for i in np.argsort(-np.asarray(costs, dtype=np.float64), kind="stable"):
        rank = int(np.argmin(load))
        owner[i] = rank
        load[rank] += costs[i]
    return [np.flatnonzero(owner == rank) for rank in range(world)]


def rank_rows(batch: dict[str, np.ndarray], rank: int, world: int, cost: RowCost = RowCost()) -> dict[str, np.ndarray]:
    """This rank's rows of a global batch (`rank_split`: balanced by `row_costs`), with a `_weight` column; a rank left
    without rows gets one zero-weight copy of the first row so every rank runs the same number of forwards. The
    objective is normalised over the whole global batch (loop.objective_share), so which rank trains a row
    changes no step's loss or gradient."""
    if world == 1:
        return dict(batch) | {"_weight": np.ones(len(next(iter(batch.values()))))}
    mine = rank_split(row_costs(batch, cost), world)[rank]
    if len(mine) == 0:
        return {k: v[:1] for k, v in batch.items()} | {"_weight": np.zeros(1)}
    return {k: v[mine] for k, v in batch.items()} | {"_weight": np.ones(len(mine))}

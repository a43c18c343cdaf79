"""From Ray Data batches (numpy columns of token lists) to model inputs on the device.

    rows = rank_rows(global_batch, rank, world)          # this worker's slice, with a `_weight` column
    inputs = collate(rows, pad_id, device, flat=True)    # padding-free: one row, boundaries as kwargs

Three layouts, one contract (`input_ids`, `labels`, optional `attention_mask` / `position_ids` / boundaries,
and `n_tokens`, the real tokens): right-padded examples, packed rows with position ids, or every example of the
batch back to back in one row (`honed.train.attention.flatten`).
"""

from __future__ import annotations

import numpy as np
import torch

from honed.train.attention import flatten


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


def rank_rows(batch: dict[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    """This rank's contiguous slice of a global batch, with a `_weight` column; a rank left without rows gets
    one zero-weight copy of the first row so every rank runs the same number of forwards."""
    n = len(next(iter(batch.values())))
    per = -(-n // world)
    lo, hi = min(rank * per, n), min((rank + 1) * per, n)
    if lo == hi:
        return {k: v[:1] for k, v in batch.items()} | {"_weight": np.zeros(1)}
    return {k: v[lo:hi] for k, v in batch.items()} | {"_weight": np.ones(hi - lo)}

"""From marked examples to the files of a prepared dataset: the weighted mix, a seeded global shuffle,
best-fit packing into `seq_len`-token rows, deterministic Parquet shards and the quarantine files.

    rates = mix_rates(cfg, marked)
    final = marked.map_batches(apply_mix, fn_kwargs={"rates": rates, "seed": seed}, batch_format="pyarrow")
    train = pack_shuffled(seeded_shuffle(train, seed), seq_len=512, pad_id=0)
    write_shards(train, out / "shards" / "train", "train")

Every choice is a pure function of (seed, record ids), never of how rows fall into blocks: the same input and
seed give the same bytes.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np

from honed.config import PrepareConfig
from honed.data.batch_columns import column_values, replace_columns
from honed.data.records import DROPPED, KEPT, QUARANTINED, unit_hash
from honed.storage import absolute, is_uri

# Preference pairs keep the chosen conversation in input_ids/labels (so any method can train on them) and the
# rejected one beside it; other rows leave the rejected columns empty.
SHARD_COLUMNS = ["source", "group", "id", "kind", "prompt", "response", "text", "messages", "input_ids", "labels",
                 "num_tokens", "chosen", "rejected", "rejected_input_ids", "rejected_labels"]
QUARANTINE_COLUMNS = ["source", "origin", "reason", "detail", "raw"]


def mix_rates(cfg: PrepareConfig, marked) -> dict:
    """Sampling rate per weighted source so kept training examples follow the weights without repeating
    any: the scarcest source (relative to its weight) is used in full, the others are subsampled."""
    weighted = {s.name: s.weight for s in cfg.data.sources if s.weight and not s.eval_only}
    if not weighted:
        return {}
    available = kept_train_counts(marked)
    total_weight = sum(weighted.values())
    shares = {name: w / total_weight for name, w in weighted.items()}
    budget = min(available.get(name, 0) / share for name, share in shares.items())
    return {name: {"weight": weighted[name], "share": round(share, 4), "available": available.get(name, 0),
                   "rate": min(1.0, budget * share / available[name]) if available.get(name) else 0.0}
            for name, share in shares.items()}


def kept_train_counts(marked) -> dict[str, int]:
    """Kept training rows per source: per-block counts summed on the driver (no shuffle, unlike a groupby)."""
    def per_block(batch: dict[str, np.ndarray]) -> dict[str, list]:
        train = (batch["status"] == KEPT) & (batch["split"] == "train")
        names, counts = np.unique(batch["source"][train].astype(str), return_counts=True)
        return {"source": names.tolist(), "count": counts.tolist()}

    available: dict[str, int] = defaultdict(int)
    columns = marked.select_columns(["source", "status", "split"])
    for row in columns.map_batches(per_block, batch_format="numpy").take_all():
        available[str(row["source"])] += int(row["count"])
    return dict(available)


def apply_mix(batch, rates: dict, seed: int):
    """Drop (`mix_subsampled`) each kept training row of a weighted source with 1 − its rate, by a seeded
    hash of its id, so the choice does not depend on how rows fall into blocks."""
    if not rates:
        return batch
    status, reason, split = (column_values(batch, k) for k in ("status", "reason", "split"))
    for i, (source, rid) in enumerate(zip(column_values(batch, "source"), column_values(batch, "id"))):
        rate = rates.get(str(source), {}).get("rate", 1.0)
        if status[i] == KEPT and split[i] == "train" and unit_hash(f"{seed}:mix:{rid}") >= rate:
            status[i], reason[i] = DROPPED, "mix_subsampled"
    return replace_columns(batch, status=status, reason=reason)


def seeded_shuffle(ds, seed: int):
    """A global shuffle that is a pure function of (seed, ids): sort by a seeded hash of each id."""
    def add_key(batch):
        import pyarrow as pa

        keys = [int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") >> 1
                for i in batch.column("id").to_pylist()]
        return batch.append_column("shuffle_key", pa.array(keys, pa.int64()))

    return ds.map_batches(add_key, batch_format="pyarrow").sort("shuffle_key").drop_columns(["shuffle_key"])


PACK_GROUP = 4096  # consecutive shuffled examples best-fit packing sees at once


def pack_shuffled(train, seq_len: int, pad_id: int):
    """The shuffled training examples packed in groups of consecutive rows (≤ `PACK_GROUP`, cut by row count
    alone), materialized: the packed rows do not depend on where Ray Data cut blocks (CPUs, timing)."""
    train = train.materialize()
    groups = train.repartition(max(1, -(-train.count() // PACK_GROUP)))  # equal row counts, order kept
    return groups.map_batches(pack_examples, fn_kwargs={"seq_len": seq_len, "pad_id": pad_id}, batch_size=None,
                              batch_format="numpy").materialize()


def pack_examples(batch: dict[str, np.ndarray], seq_len: int, pad_id: int):
    """Best-fit-decreasing packing of a batch of examples into rows of `seq_len` tokens. Position ids
    restart at 0 for every example (and for the padding tail), which is how the model's attention mask
    keeps each example to itself; padding carries label -100. Rows are filled as int32 arrays, never as
    Python lists of tokens."""
    lengths = [len(x) for x in batch["input_ids"]]
    bins = best_fit(lengths, seq_len)
    ids = np.full((len(bins), seq_len), pad_id, dtype=np.int32)
    labels = np.full((len(bins), seq_len), -100, dtype=np.int32)
    positions = np.empty((len(bins), seq_len), dtype=np.int32)
    steps = np.arange(seq_len, dtype=np.int32)
    used = np.zeros(len(bins), dtype=np.int32)
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            n = lengths[i]
            ids[b, at:at + n] = batch["input_ids"][i]
            labels[b, at:at + n] = batch["labels"][i]
            positions[b, at:at + n] = steps[:n]
            at += n
        positions[b, at:] = steps[:seq_len - at]
        used[b] = at
    return packed_table(ids, labels, positions, used, np.array([len(m) for m in bins], dtype=np.int32))


def best_fit(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, goes to the bin with the least room that holds it
    (ties: the lowest bin, as a scan in bin order finds), found by bisection over the sorted free room."""
    bins: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (free room, bin), sorted: the best fit is the first with room ≥ length
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        at = bisect.bisect_left(rooms, (lengths[i], -1))
        if at < len(rooms):
            room, b = rooms.pop(at)
            bins[b].append(i)
        else:
            room, b = seq_len, len(bins)
            bins.append([i])
        bisect.insort(rooms, (room - lengths[i], b))
    return bins


def packed_table(ids, labels, positions, num_tokens, num_examples):
    """Plain Arrow lists of int32 (not Ray's tensor extension type), so any Parquet reader loads the shards."""
    import pyarrow as pa

    rows, seq_len = ids.shape
    offsets = pa.array(np.arange(0, (rows + 1) * seq_len, seq_len, dtype=np.int32))
    lists = {k: pa.ListArray.from_arrays(offsets, pa.array(v.reshape(-1)))
             for k, v in (("input_ids", ids), ("labels", labels), ("position_ids", positions))}
    return pa.table(lists | {"num_tokens": pa.array(num_tokens), "num_examples": pa.array(num_examples)})


def packing_stats(packed, seq_len: int, n_examples: int) -> dict:
    """Rows, examples and the share of non-pad tokens of materialized packed rows (block sums, no shuffle)."""
    used = sum(int(r["used"]) for r in packed.select_columns(["num_tokens"]).map_batches(
        lambda b: {"used": [int(b["num_tokens"].sum())]}, batch_format="numpy").take_all())
    rows = packed.count()
    return {"seq_len": seq_len, "rows": rows, "examples": n_examples,
            "efficiency": round(used / max(rows * seq_len, 1), 4)}


TOKENS_PER_SHARD = 8_000_000  # ~100 MB of token columns: shards written (and later read) in parallel


def write_shards(ds, path: str | Path, prefix: str, tokens: int = 0, rows_per_shard: int = 50_000) -> int:
    """Write deterministic Parquet shards (`prefix-00000.parquet`, ...) under `path` (a local dir or a URI) and
    return the row count. The shard count is a function of the data alone (rows, and the `tokens` they hold,
    padding included), never of the CPUs: the same input gives the same files."""
    import ray.data
    from ray.data.datasource import FilenameProvider

    class Names(FilenameProvider):  # the default names hold random write ids
        def get_filename_for_task(self, write_uuid, task_index):
            return f"{prefix}-{task_index:05d}.parquet"

    ds = ds.materialize()  # counted and written from one execution
    n = ds.count()
    if not is_uri(path):
        Path(path).mkdir(parents=True, exist_ok=True)
    if n:
        ds.repartition(max(1, -(-n // rows_per_shard), -(-tokens // TOKENS_PER_SHARD))).write_parquet(
            absolute(path), filename_provider=Names(), mode=ray.data.SaveMode.OVERWRITE)
    return n


def write_quarantine(final, path: str | Path) -> None:
    """The quarantined rows as JSON lines ({source, origin, reason, detail, raw}); no files when there are none."""
    from ray.data.expressions import col

    quarantined = final.filter(expr=col("status") == QUARANTINED).select_columns(QUARANTINE_COLUMNS).materialize()
    if quarantined.count():
        quarantined.write_json(absolute(path))

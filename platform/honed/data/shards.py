"""From marked examples to the files of a prepared dataset: the weighted mix, a seeded global shuffle,
best-fit packing into `seq_len`-token rows, deterministic Parquet shards and the quarantine files.

    rates = mix_rates(cfg, marked)
    final = marked.map_batches(apply_mix, fn_kwargs={"rates": rates, "seed": seed}, batch_format="pyarrow")
    train = seeded_order(train, partial(seed_keys, seed=seed), partial(pack_group, seq_len=512, pad_id=0))
    write_shards(train, out / "shards" / "train", "train")

Every choice is a pure function of (seed, record ids), never of how rows fall into blocks: the same input and
seed give the same bytes.
"""

from __future__ import annotations

import bisect
import functools
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


SHUFFLE_KEY = "_shuffle_key"
PACK_GROUP = 4096  # consecutive shuffled examples best-fit packing sees at once (about: a group is a key range)
GROUPS_PER_TASK = 4  # packing groups one reduce task of the shuffle finishes
SORT_TASK_ROWS = 65_536  # rows one reduce task sorts when nothing is packed


def seed_keys(table, seed: int) -> np.ndarray:
    """A seeded 63-bit hash of each row's `id`: the shuffle order (a pure function of seed and ids)."""
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big") >> 1
                     for i in table.column("id").to_pylist()], dtype=np.int64)


def seeded_order(ds, keys, finish=None, group_rows: int = PACK_GROUP):
    """The rows of `ds` sorted by `keys(table)` (int64 in [0, 2^63): a seeded hash per row, e.g. `seed_keys`); with
    `finish` (packing), cut into groups of about `group_rows` consecutive rows, each group through `finish(table)`.

    The keys are uniform, so the sort needs no sampling: group g holds the keys in [g·w, (g+1)·w) with w = 2^63 /
    groups; a map task cuts its blocks by group into one piece per reduce task (a run of consecutive groups), a
    reduce task sorts its rows by key and finishes group after group (honed.data.exchange). With `finish`,
    groups = ⌈rows / group_rows⌉ and a reduce task finishes `GROUPS_PER_TASK` of them; without, a reduce task
    sorts a key range of ~`SORT_TASK_ROWS` rows. Groups, tasks and the blocks that come out (hence the shards'
    bytes, row groups included) depend on the rows alone, never on the input's blocks or the CPUs."""
    from honed.data.exchange import exchange

    ds = ds.materialize()
    rows = ds.count()
    if not rows:
        return ds
    if finish is None:
        groups = tasks = -(-rows // SORT_TASK_ROWS)
    else:
        groups = -(-rows // group_rows)
        tasks = -(-groups // GROUPS_PER_TASK)
    width = np.uint64((2**63 - 1) // groups + 1)
    split = functools.partial(_by_group, keys=keys, width=width, groups=groups, tasks=tasks)
    return exchange(ds, split, functools.partial(_finish_groups, width=width, finish=finish), tasks)


def _by_group(table, keys, width, groups: int, tasks: int):
    import pyarrow as pa

    key = keys(table)
    group = key.astype(np.uint64) // width
    return table.append_column(SHUFFLE_KEY, pa.array(key, pa.int64())), (group * tasks // groups).astype(np.int64)


def _finish_groups(table, width, finish):
    """A reduce task's rows in key order, cut into their groups, each through `finish`."""
    import pyarrow as pa

    if not table.num_rows:  # a key range no row fell in: still the output's schema
        table = table.drop_columns([SHUFFLE_KEY]) if SHUFFLE_KEY in table.column_names else table
        return finish(table) if finish is not None and table.num_columns else table
    key = table.column(SHUFFLE_KEY).to_numpy()
    order = np.argsort(key, kind="stable")
    table = table.take(pa.array(order)).drop_columns([SHUFFLE_KEY])
    if finish is None:
        return table
    group = key[order].astype(np.uint64) // width
    cuts = np.flatnonzero(np.diff(group)) + 1
    bounds = [0, *cuts.tolist(), table.num_rows]
    return pa.concat_tables([finish(table.slice(lo, hi - lo)) for lo, hi in zip(bounds[:-1], bounds[1:])])


def pack_group(table, seq_len: int, pad_id: int):
    """`pack_examples` of one group of shuffled examples (an Arrow table)."""
    batch = {k: table.column(k).to_numpy(zero_copy_only=False) for k in ("input_ids", "labels")}
    return pack_examples(batch, seq_len, pad_id)


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
    from honed.data.exchange import select_rows

    quarantined = select_rows(final, "status", QUARANTINED, QUARANTINE_COLUMNS).materialize()
    if quarantined.count():
        quarantined.write_json(absolute(path))

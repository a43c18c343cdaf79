"""An all-to-all exchange of a materialized dataset's blocks as plain Ray tasks: each map task cuts its blocks'
rows into one piece per reduce task, each reduce task concatenates its pieces and makes its output from them.

    out = exchange(ds, split=by_key_range, reduce=sort_and_pack, tasks=8)   # → a Dataset of the reduce outputs

Ray Data's `sort` and keyed `repartition` do the same, but on two cores their fixed costs were most of the work:
a sort samples the input in a pass of its own, then exchanges one piece per (block × block) pair (81 × 81 for a
75 MB corpus); a hash shuffle starts aggregator actors. Here the map tasks take several blocks each, the reduce
outputs come back in reduce order, and nothing depends on how the input was cut into blocks unless `split` or
`reduce` make it so: the two callers (the seeded shuffle with packing, dedup's keyed buckets) sort inside each
reduce by a key of the rows, so their outputs are a function of the data alone.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TASK_BYTES = 64 << 20  # input bytes one map or reduce task aims at (more tasks when the cluster has more CPUs)


def exchange(ds, split: Callable, reduce: Callable, tasks: int | None = None):
    """`reduce(table)` of every reduce task's rows, in reduce order, as a Dataset. `split(table)` → (table, an int
    array of each row's reduce task in [0, tasks)) runs on every input block (it may add or drop columns);
    `tasks`: reduce tasks (default: by the input's size and the cluster's CPUs)."""
    import ray.data

    ds = ds.materialize()
    refs = ds.to_arrow_refs()
    if not refs:
        return ds
    maps = task_count(ds)
    return ray.data.from_arrow_refs(exchange_blocks(refs, split, reduce, tasks or maps, maps))


def exchange_blocks(refs: list, split: Callable, reduce: Callable, tasks: int, maps: int | None = None) -> list:
    """`exchange` on blocks already in the object store (Arrow tables): the reduce outputs' refs, in reduce order.
    `maps`: map tasks (default: one per CPU of the cluster), each reading consecutive blocks."""
    import ray

    if not refs:
        return []
    cut = ray.remote(cut_blocks).options(num_returns=tasks)
    pieces = [cut.remote(split, tasks, *run) for run in runs(refs, maps)]
    if tasks == 1:
        pieces = [[p] for p in pieces]
    merge = ray.remote(merge_pieces)
    return [merge.remote(reduce, *[p[t] for p in pieces]) for t in range(tasks)]


def map_blocks(refs: list, fn: Callable, maps: int | None = None, fetch: bool = True) -> list:
    """`fn(table)` of consecutive runs of blocks, one Ray task per run (default: one per CPU of the cluster), in
    block order: the results (`fetch`) or their refs. A pass without a Ray Data execution's fixed cost."""
    import ray

    if not refs:
        return []
    apply = ray.remote(lambda *blocks: fn(concat(blocks)))
    out = [apply.remote(*run) for run in runs(refs, maps)]
    return ray.get(out) if fetch else out


def runs(refs: list, maps: int | None = None) -> list[list]:
    """`refs` cut into at most `maps` runs of consecutive blocks (default: one per CPU of the cluster)."""
    per_map = -(-len(refs) // min(len(refs), maps or cluster_cpus()))
    return [refs[i:i + per_map] for i in range(0, len(refs), per_map)]


def block_rows(ds, fn: Callable, columns: list[str], **kwargs) -> list[dict]:
    """`fn(batch, **kwargs)` (a numpy batch of `columns` → a dict of equal-length lists: a few rows of partial
    results) of every run of blocks of `ds`, as rows: what `map_batches(fn).take_all()` gives, by plain tasks."""
    def rows_of(table) -> list[dict]:
        out = fn({c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}, **kwargs)
        return [dict(zip(out, values)) for values in zip(*out.values())]

    return [row for rows in map_blocks(ds.to_arrow_refs(), rows_of) for row in rows]


def select_rows(ds, column: str, value, columns: list[str]):
    """The rows of `ds` whose `column` equals `value`, with `columns` only, as a Dataset of as many blocks as `ds`
    had (each block filtered by a task of its own, so what is written from it does not depend on the CPUs)."""
    import pyarrow.compute as pc
    import ray.data

    refs = ds.to_arrow_refs()

    def select(table):
        return table.filter(pc.equal(table.column(column), value)).select(columns)

    if not refs:
        return ds
    return ray.data.from_arrow_refs(map_blocks(refs, select, maps=len(refs), fetch=False))


def cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def task_count(ds) -> int:
    """Map (and default reduce) tasks for a materialized dataset: one per CPU of the cluster, more for large inputs."""
    return max(cluster_cpus(), -(-ds.size_bytes() // TASK_BYTES))


def cut_blocks(split: Callable, tasks: int, *blocks):
    """Map task: the rows of `blocks`, through `split`, as one table per reduce task (in block and row order)."""
    import pyarrow as pa

    table, target = split(concat(blocks))
    order = np.argsort(target, kind="stable")
    bounds = np.searchsorted(target[order], np.arange(tasks + 1))
    table = table.take(pa.array(order))
    parts = [table.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]
    return parts[0] if tasks == 1 else tuple(parts)


def merge_pieces(reduce: Callable, *pieces):
    """Reduce task: one table of every map task's piece (in map order), through `reduce`."""
    return reduce(concat(pieces))


def concat(tables):
    """Tables whose schemas may differ where a block held only nulls in a column: promoted to one schema."""
    import pyarrow as pa

    tables = [t for t in tables if t.num_columns]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]

"""Deduplication across the whole corpus: exact keys and LSH band keys are exchanged by key so equal keys meet
in one task, only the resulting edges reach the driver, and the duplicates found are marked
dropped. The MinHash/LSH math itself is `honed.data.dedup`; this module runs it at corpus scale.

    duplicates, stats = find_duplicates(processed, cfg, lsh_settings(cfg))
    marked = processed.map_batches(mark_duplicates, fn_kwargs={"table": ray.put(duplicate_table(duplicates))},
                                   batch_format="pyarrow")
"""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np

from honed.config import PrepareConfig
from honed.data.batch_columns import column_values, replace_columns
from honed.data.dedup import band_keys, estimated_jaccard, resolve_clusters
from honed.data.records import DROPPED, KEPT


def find_duplicates(processed, cfg: PrepareConfig, params: dict) -> tuple[dict[int, tuple[int, str]], dict]:
    """`{id: (kept representative id, reason)}` for every exact or near duplicate of an earlier record.

    Each kept record's keys (its exact hash, its LSH band keys) become rows of one table; one exchange by key
    (honed.data.exchange, plain Ray tasks over the processed blocks) puts equal keys in one task, where every
    member of a bucket is linked to the bucket's smallest id (star edges, linear in the bucket). Only these
    edges reach the driver. LSH candidates are then verified: an edge stands
    only when the two MinHash signatures agree on at least `threshold` of their entries (the estimated Jaccard
    similarity), which removes band collisions of unrelated records. Union-find turns the edges into
    clusters whose smallest (first-read) id is kept."""
    dd = cfg.data.dedup
    stats = {"exact": dd.exact, "near": dd.near, "threshold": dd.threshold, "num_perm": dd.num_perm,
             "shingle_words": dd.shingle_words}
    blocks = processed.to_arrow_refs()  # a materialized dataset's blocks: read by plain tasks, no new execution
    exact_edges, candidates = bucket_edges(blocks, dd.exact, params if dd.near else None,
                                           shuffle=processed.count() >= SHUFFLE_FROM_RECORDS)
    dups = {rid: (rep, "exact_duplicate") for rid, rep in resolve_clusters(exact_edges).items()}
    wanted = {i for pair in candidates + exact_edges for i in pair}
    rows = pick_rows(blocks, wanted, ["id", "signature", "origin"] if dd.near else ["id", "origin"])
    if dd.near:
        near_edges = verify_edges(rows, candidates, dd.threshold)
        stats |= {"bands": params["bands"], "rows": params["rows"], "candidate_pairs": len(set(candidates)),
                  "verified_pairs": len(set(near_edges))}
        for rid, rep in resolve_clusters(near_edges + exact_edges).items():
            dups.setdefault(rid, (rep, "near_duplicate"))
    clusters = Counter(rep for rep, _ in dups.values())
    stats |= {
        "exact_removed": sum(1 for _, r in dups.values() if r == "exact_duplicate"),
        "near_removed": sum(1 for _, r in dups.values() if r == "near_duplicate"),
        "clusters": len(clusters),
        "largest_cluster": (max(clusters.values()) + 1) if clusters else 0,
        "examples": cluster_examples({i: r["origin"] for i, r in rows.items()}, dups),
    }
    return dups, stats


def key_rows(batch: dict[str, np.ndarray], exact: bool, lsh: dict | None) -> dict[str, np.ndarray]:
    """One `{id, key}` row per record for its exact key and one per LSH band. Exact keys are stored as
    −key − 1 (negative; band keys are ≥ 0), so both kinds share one shuffle without ever meeting."""
    ids, keys = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if exact and len(batch["id"]):
        ids.append(batch["id"].astype(np.int64))
        keys.append(-batch["exact_key"].astype(np.int64) - 1)
    if lsh and len(batch["id"]):
        bands = lsh["bands"]
        ids.append(np.repeat(batch["id"].astype(np.int64), bands))
        keys.append(band_keys(np.stack(batch["signature"]), bands, lsh["rows"]).ravel())
    return {"id": np.concatenate(ids), "key": np.concatenate(keys)}


# Below this many records the keys (8 B each, 1 + bands a record: ~1 MB at 10k records) meet in one task; above,
# in one task per CPU. Either way the same buckets, the same edges.
SHUFFLE_FROM_RECORDS = 100_000


def bucket_edges(blocks: list, exact: bool, lsh: dict | None, shuffle: bool = True) -> tuple[list, list]:
    """(exact edges, LSH candidate edges): (id, smallest id of its bucket) for every non-smallest member of
    every bucket of the kept rows in `blocks` (Arrow tables in the object store), from one exchange of all keys
    by key: over one reduce task per CPU (`shuffle`), or one."""
    import ray

    from honed.data.exchange import cluster_cpus, exchange_blocks

    if not exact and not lsh:
        return [], []
    tasks = cluster_cpus() if shuffle else 1
    split = functools.partial(keys_by_task, exact=exact, lsh=lsh, tasks=tasks)
    parts = ray.get(exchange_blocks(blocks, split, star_edge_table, tasks))
    ids, reps, of_exact = (np.concatenate([np.zeros(0, np.int64)] + [p.column(k).to_numpy() for p in parts]).tolist()
                           for k in ("id", "rep", "exact"))
    pairs = list(zip(ids, reps))
    return [p for p, e in zip(pairs, of_exact) if e], [p for p, e in zip(pairs, of_exact) if not e]


def kept_rows(table):
    """The rows still kept (a processed block's; a table without `status` is all kept)."""
    import pyarrow.compute as pc

    return table.filter(pc.equal(table.column("status"), KEPT)) if "status" in table.column_names else table


def keys_by_task(table, exact: bool, lsh: dict | None, tasks: int):
    """Map side of the keys' exchange: a block's kept rows' `key_rows`, each to the reduce task of its key."""
    import pyarrow as pa

    table = kept_rows(table)
    columns = ["id"] + (["exact_key"] if exact else []) + (["signature"] if lsh else [])
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}
    keys = key_rows(batch, exact, lsh)
    return pa.table(keys), np.mod(keys["key"], tasks)


def star_edge_table(table):
    """Reduce side: `star_edges` of every key that met in this task."""
    import pyarrow as pa

    if not table.num_rows:
        return pa.table(star_edges({"key": np.zeros(0, np.int64)}))
    return pa.table(star_edges({"id": table.column("id").to_numpy(), "key": table.column("key").to_numpy()}))


def pick_rows(blocks: list, ids: set[int], columns: list[str]) -> dict[int, dict]:
    """`columns` of the kept rows in `blocks` whose id is in `ids` (the duplicates' edges: a small part), by id."""
    from honed.data.exchange import map_blocks

    if not ids:
        return {}
    wanted = np.array(sorted(ids), dtype=np.int64)

    def pick(table):
        table = kept_rows(table)
        return table.filter(np.isin(table.column("id").to_numpy(), wanted)).select(columns)

    return {int(r["id"]): r for t in map_blocks(blocks, pick) for r in t.to_pylist()}


def verify_edges(rows: dict[int, dict], edges: list[tuple[int, int]], threshold: float) -> list[tuple[int, int]]:
    """The candidate edges whose two records' signatures (`rows`, by id) estimate a Jaccard similarity
    ≥ threshold."""
    return [(a, b) for a, b in sorted(set(edges))
            if estimated_jaccard(np.asarray(rows[a]["signature"]), np.asarray(rows[b]["signature"])) >= threshold]


def star_edges(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Within one hash partition: every row whose bucket holds a smaller id, linked to that smallest id, and
    whether the bucket is an exact key's (negative, see `key_rows`)."""
    if len(block["key"]) == 0:
        empty = np.array([], dtype=np.int64)
        return {"id": empty, "rep": empty, "exact": np.array([], dtype=bool)}
    order = np.lexsort((block["id"], block["key"]))
    key, ids = block["key"][order], block["id"][order].astype(np.int64)
    starts = np.r_[True, key[1:] != key[:-1]]
    first = ids[np.maximum.accumulate(np.where(starts, np.arange(len(ids)), 0))]
    linked = ids != first
    return {"id": ids[linked], "rep": first[linked], "exact": key[linked] < 0}  # see `key_rows`


DUP_REASONS = ("exact_duplicate", "near_duplicate")


def duplicate_table(dups: dict[int, tuple[int, str]]) -> dict[str, np.ndarray]:
    """The duplicate map as sorted arrays: shipped once through the object store, read without copying."""
    ids = np.array(sorted(dups), dtype=np.int64)
    codes = np.array([DUP_REASONS.index(dups[int(i)][1]) for i in ids], dtype=np.int8)
    return {"id": ids, "reason": codes}


def mark_duplicates(batch, table):
    """Drop (status, reason) the kept rows listed in the duplicate table; works on Arrow batches (the
    pipeline) and on dicts of arrays (tests)."""
    import ray

    table = ray.get(table) if isinstance(table, ray.ObjectRef) else table
    ids, status, reason = (column_values(batch, k) for k in ("id", "status", "reason"))
    ids = ids.astype(np.int64)
    pos = np.minimum(np.searchsorted(table["id"], ids), max(len(table["id"]) - 1, 0))
    hit = (table["id"][pos] == ids) & (status == KEPT) if len(table["id"]) else np.zeros(len(ids), bool)
    status[hit] = DROPPED
    reason[hit] = [DUP_REASONS[c] for c in table["reason"][pos[hit]]]
    return replace_columns(batch, status=status, reason=reason)


def cluster_examples(origins: dict[int, str], dups: dict[int, tuple[int, str]], limit: int = 3) -> list[dict]:
    """A few near-duplicate pairs (origins, by id) for the report, so a reader can judge the threshold."""
    near = sorted((rid, rep) for rid, (rep, r) in dups.items() if r == "near_duplicate")[:limit]
    return [{"duplicate": origins.get(rid), "kept": origins.get(rep)} for rid, rep in near]

"""Deduplication across the whole corpus on Ray Data: exact keys and LSH band keys are hash-shuffled so equal
keys meet in one block, only the resulting edges reach the driver, and the duplicates found are marked
dropped. The MinHash/LSH math itself is `honed.data.dedup`; this module runs it at corpus scale.

    duplicates, stats = find_duplicates(processed, cfg, lsh_settings(cfg))
    marked = processed.map_batches(mark_duplicates, fn_kwargs={"table": ray.put(duplicate_table(duplicates))},
                                   batch_format="pyarrow")
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from honed.config import PrepareConfig
from honed.data.batch_columns import column_values, replace_columns
from honed.data.dedup import band_keys, estimated_jaccard, resolve_clusters
from honed.data.records import DROPPED, KEPT


def find_duplicates(processed, cfg: PrepareConfig, params: dict) -> tuple[dict[int, tuple[int, str]], dict]:
    """`{id: (kept representative id, reason)}` for every exact or near duplicate of an earlier record.

    Each record's keys (its exact hash, its LSH band keys) become rows; a hash shuffle puts equal keys in one
    block, where every member of a bucket is linked to the bucket's smallest id (star edges, linear in the
    bucket). Only these edges reach the driver. LSH candidates are then verified: an edge stands only when
    the two MinHash signatures agree on at least `threshold` of their entries (the estimated Jaccard
    similarity), which removes band collisions of unrelated records. Union-find turns the edges into
    clusters whose smallest (first-read) id is kept."""
    from ray.data.expressions import col

    dd = cfg.data.dedup
    stats = {"exact": dd.exact, "near": dd.near, "threshold": dd.threshold, "num_perm": dd.num_perm,
             "shingle_words": dd.shingle_words}
    dups: dict[int, tuple[int, str]] = {}
    kept = processed.filter(expr=col("status") == KEPT)
    n_blocks = max(2, processed.num_blocks())
    exact_edges: list[tuple[int, int]] = []
    if dd.exact:
        keys = kept.select_columns(["id", "exact_key"]).rename_columns({"exact_key": "key"})
        exact_edges = bucket_edges(keys, n_blocks)
        for rid, rep in resolve_clusters(exact_edges).items():
            dups[rid] = (rep, "exact_duplicate")
    near_edges: list[tuple[int, int]] = []
    if dd.near:
        keys = kept.select_columns(["id", "signature"]).map_batches(
            band_rows, fn_kwargs={"bands": params["bands"], "rows": params["rows"]}, batch_format="numpy")
        candidates = bucket_edges(keys, n_blocks)
        near_edges = verify_edges(kept, candidates, dd.threshold)
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
        "examples": cluster_examples(processed, dups),
    }
    return dups, stats


def band_rows(batch: dict[str, np.ndarray], bands: int, rows: int) -> dict[str, np.ndarray]:
    """One `{id, key}` row per LSH band of each record."""
    if len(batch["id"]) == 0:
        return {"id": np.array([], dtype=np.int64), "key": np.array([], dtype=np.int64)}
    keys = band_keys(np.stack(batch["signature"]), bands, rows)
    return {"id": np.repeat(batch["id"].astype(np.int64), bands), "key": keys.ravel()}


def verify_edges(kept, edges: list[tuple[int, int]], threshold: float) -> list[tuple[int, int]]:
    """The candidate edges whose two records' signatures estimate a Jaccard similarity ≥ threshold."""
    import ray

    if not edges:
        return []
    wanted = ray.put(np.unique(np.array(edges, dtype=np.int64)))

    def pick(batch: dict[str, np.ndarray], ids) -> dict[str, np.ndarray]:
        hit = np.isin(batch["id"].astype(np.int64), ray.get(ids))
        return {"id": batch["id"][hit], "signature": batch["signature"][hit]}

    rows = kept.select_columns(["id", "signature"]).map_batches(
        pick, fn_kwargs={"ids": wanted}, batch_format="numpy").take_all()
    signatures = {int(r["id"]): np.asarray(r["signature"]) for r in rows}
    return [(a, b) for a, b in sorted(set(edges))
            if estimated_jaccard(signatures[a], signatures[b]) >= threshold]


def bucket_edges(keys, n_blocks: int) -> list[tuple[int, int]]:
    """(id, smallest id of its bucket) for every non-smallest member of every bucket."""
    edges = keys.repartition(n_blocks, keys=["key"]).map_batches(
        star_edges, batch_size=None, batch_format="numpy").take_all()
    return [(int(e["id"]), int(e["rep"])) for e in edges]


def star_edges(block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Within one hash partition: every row whose bucket holds a smaller id, linked to that smallest id."""
    if len(block["key"]) == 0:
        return {"id": np.array([], dtype=np.int64), "rep": np.array([], dtype=np.int64)}
    order = np.lexsort((block["id"], block["key"]))
    key, ids = block["key"][order], block["id"][order].astype(np.int64)
    starts = np.r_[True, key[1:] != key[:-1]]
    first = ids[np.maximum.accumulate(np.where(starts, np.arange(len(ids)), 0))]
    linked = ids != first
    return {"id": ids[linked], "rep": first[linked]}


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



def cluster_examples(processed, dups: dict[int, tuple[int, str]], limit: int = 3) -> list[dict]:
    """A few near-duplicate pairs (origins) for the report, so a reader can judge the threshold."""
    near = sorted((rid, rep) for rid, (rep, r) in dups.items() if r == "near_duplicate")[:limit]
    if not near:
        return []
    wanted = {i for pair in near for i in pair}
    origins = {int(r["id"]): r["origin"] for r in processed.filter(
        lambda row: int(row["id"]) in wanted).select_columns(["id", "origin"]).take_all()}
    return [{"duplicate": origins.get(rid), "kept": origins.get(rep)} for rid, rep in near]


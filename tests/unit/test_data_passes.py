"""The prepare path's one-pass pieces on hand-made data: exact and LSH keys share one shuffle without meeting,
per-block tallies give the manifest's counts, the faster best-fit packing places every example where the plain
scan over bins did, packed rows do not depend on how Ray Data cut the blocks, and the seeded order is the sort by
key whatever the blocks and tasks."""

import json
from functools import partial

import numpy as np

from honed.config import PII_TYPES
from honed.data.corpus_dedup import key_rows, star_edges
from honed.data.manifest import block_tally
from honed.data.shards import pack_examples


def test_exact_and_band_keys_share_one_shuffle_without_meeting():
    signature = np.arange(8, dtype=np.int64)
    batch = {"id": np.array([1, 2, 3]), "exact_key": np.array([7, 7, 5]),
             "signature": np.stack([signature, signature, signature + 100])}
    rows = key_rows(batch, exact=True, lsh={"bands": 2, "rows": 4})
    assert len(rows["id"]) == 3 + 3 * 2 and (rows["key"][:3] < 0).all() and (rows["key"][3:] >= 0).all()
    edges = star_edges(rows)
    found = sorted(zip(edges["id"].tolist(), edges["rep"].tolist(), edges["exact"].tolist()))
    assert found == [(2, 1, False), (2, 1, False), (2, 1, True)]  # both bands and the exact key; 3 alone
    only_exact = key_rows(batch, exact=True, lsh=None)
    assert only_exact["key"].tolist() == [-8, -8, -6]


def test_block_tally_counts_read_rows_and_kept_kinds():
    batch = {"source": np.array(["a", "a", "a", "b"], dtype=object),
             "status": np.array(["kept", "dropped", "kept", "quarantined"], dtype=object),
             "reason": np.array(["", "exact_duplicate", "", "malformed_json"], dtype=object),
             "split": np.array(["train", "train", "train", ""], dtype=object),
             "kind": np.array(["instruction", "instruction", "text", ""], dtype=object),
             "num_tokens": np.array([10, 10, 25, 0]), "augmented_from": np.array([-1, -1, 0, -1])}
    batch |= {f"pii_{t}": np.array([1, 0, 1, 0]) for t in PII_TYPES}
    tally = json.loads(block_tally(batch, read_only=True, size=20, overlap=5)["tally"][0])
    assert sorted(tally["counts"]) == [[["a", "dropped", "exact_duplicate", "train"], 1],
                                       [["a", "kept", "", "train"], 1], [["b", "quarantined", "malformed_json", ""], 1]]
    assert sorted(tally["kinds"]) == [[["train", "a", "instruction"], 1], [["train", "a", "text"], 1]]
    assert tally["pii"] == dict.fromkeys(PII_TYPES, 1)  # the paraphrase (augmented_from 0) is not a read record
    assert tally["chunk"] == {"a": {"documents": 2, "chunked": 1, "windows": 2}}


def scan_best_fit(lengths: list[int], seq_len: int) -> list[list[int]]:
    """The plain best-fit-decreasing scan over every bin (the first version of `pack_examples`)."""
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [b for b, room in enumerate(free) if room >= lengths[i]]
        if fits:
            b = min(fits, key=lambda b: free[b])
            bins[b].append(i)
            free[b] -= lengths[i]
        else:
            bins.append([i])
            free.append(seq_len - lengths[i])
    return bins


def test_packing_places_examples_as_the_plain_scan_does():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 64, size=500).tolist()
    ids = [list(range(n)) for n in lengths]
    batch = {"input_ids": np.array(ids, dtype=object), "labels": np.array(ids, dtype=object)}
    packed = pack_examples(batch, seq_len=128, pad_id=0).to_pydict()
    expected = scan_best_fit(lengths, 128)
    assert packed["num_examples"] == [len(b) for b in expected]
    assert packed["num_tokens"] == [sum(lengths[i] for i in b) for b in expected]


def test_packed_rows_do_not_depend_on_how_blocks_were_cut(ray_local):
    import ray.data

    from honed.data.shards import PACK_GROUP, pack_group, seed_keys, seeded_order

    rng = np.random.default_rng(1)
    rows = [{"id": i, "input_ids": list(range(n)), "labels": list(range(n))}
            for i, n in enumerate(rng.integers(1, 300, 2 * PACK_GROUP + 900))]
    keys, pack = partial(seed_keys, seed=3), partial(pack_group, seq_len=512, pad_id=0)
    packed = [seeded_order(ray.data.from_items(rows, override_num_blocks=blocks), keys, pack).to_pandas()
              for blocks in (1, 7)]
    assert packed[0].equals(packed[1])
    assert packed[0]["num_examples"].sum() == len(rows)
    assert packed[0]["num_tokens"].sum() == sum(len(r["input_ids"]) for r in rows)


def test_the_seeded_order_is_the_sort_by_key_whatever_the_blocks_and_tasks(ray_local, monkeypatch):
    import ray
    import ray.data

    from honed.data import exchange, shards
    from honed.data.shards import seed_keys, seeded_order

    rows = [{"id": i, "text": f"row {i}", "window": i % 3} for i in range(5000)]
    expected = [r["id"] for r in sorted(rows, key=lambda r: seed_keys(pa_table([r["id"]]), 7)[0])]
    for blocks, task_rows, task_bytes in ((1, 65_536, 64 << 20), (9, 700, 1_000)):  # by rows and by input size
        monkeypatch.setattr(shards, "SORT_TASK_ROWS", task_rows)
        monkeypatch.setattr(exchange, "TASK_BYTES", task_bytes)
        tables = ray.get(seeded_order(ray.data.from_items(rows, override_num_blocks=blocks),
                                      partial(seed_keys, seed=7)).to_arrow_refs())
        assert [i for t in tables for i in t.column("id").to_pylist()] == expected
        assert set(tables[0].column_names) == {"id", "text", "window"}  # the key column is gone
        assert len(tables) == -(-len(rows) // task_rows)  # reduce tasks: by rows alone, whatever the maps


def pa_table(ids: list[int]):
    import pyarrow as pa

    return pa.table({"id": pa.array(ids, pa.int64())})


def test_shards_are_cut_by_tokens_too_and_keep_row_order(ray_local, tmp_path, monkeypatch):
    import pyarrow.dataset as pads
    import ray.data

    from honed.data import shards

    monkeypatch.setattr(shards, "TOKENS_PER_SHARD", 100)
    rows = [{"input_ids": [i] * 40, "n": i} for i in range(10)]  # 400 tokens: 4 shards of ≤ 100 tokens' worth
    written = shards.write_shards(ray.data.from_items(rows, override_num_blocks=3), tmp_path, "train", tokens=400)
    files = sorted(p.name for p in tmp_path.glob("*.parquet"))
    assert written == 10 and len(files) == 4 and files[0].startswith("train-00000")
    assert pads.dataset(sorted(str(p) for p in tmp_path.glob("*.parquet"))).to_table()["n"].to_pylist() == list(range(10))


def test_small_corpus_keys_meet_on_the_driver_as_in_the_shuffle(ray_local):
    import ray.data

    from honed.data.corpus_dedup import bucket_edges

    rng = np.random.default_rng(2)
    base = rng.integers(0, 2**40, size=(60, 8))
    rows = [{"id": i, "exact_key": 10 * i, "signature": base[i % 25] if i % 3 else base[i]}
            for i in range(60)]  # shared signatures (band collisions), one shared exact key
    rows[9]["exact_key"] = rows[4]["exact_key"]
    ds = ray.data.from_items(rows, override_num_blocks=4)
    lsh = {"bands": 2, "rows": 4}
    shuffled, driver = (bucket_edges(ds.to_arrow_refs(), True, lsh, shuffle=s) for s in (True, False))
    assert sorted(shuffled[0]) == sorted(driver[0]) == [(9, 4)]
    assert sorted(shuffled[1]) == sorted(driver[1]) and len(driver[1]) > 10

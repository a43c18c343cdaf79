"""The prepare path's one-pass pieces on hand-made data: exact and LSH keys share one shuffle without meeting,
per-block tallies give the manifest's counts, the faster best-fit packing places every example where the plain
scan over bins did, and packed rows do not depend on how Ray Data cut the blocks."""

import json

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

    from honed.data.shards import PACK_GROUP, pack_shuffled

    rng = np.random.default_rng(1)
    rows = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in rng.integers(1, 300, PACK_GROUP + 900)]
    packed = [pack_shuffled(ray.data.from_items(rows, override_num_blocks=blocks), 512, 0).to_pandas()
              for blocks in (1, 7)]
    assert packed[0].equals(packed[1])
    assert packed[0]["num_examples"].sum() == len(rows)


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
    shuffled, driver = (bucket_edges(ds, True, lsh, 4, shuffle=s) for s in (True, False))
    assert sorted(shuffled[0]) == sorted(driver[0]) == [(9, 4)]
    assert sorted(shuffled[1]) == sorted(driver[1]) and len(driver[1]) > 10

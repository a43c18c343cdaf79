"""Exact / near-duplicate detection and n-gram decontamination on hand-made data and the synthetic corpus."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from honed.data.dedup import (
    MinHasher, NgramIndex, band_keys, bucket_pairs, estimated_jaccard, exact_key, lsh_params, near_duplicates,
    ngram_hashes, resolve_clusters, shingle_hashes, verify_bucket,
)
from honed.data.synthetic import iter_synthetic_text, synthetic_corpus


def _shingle_jaccard(a: str, b: str, k: int = 5) -> float:
    sa, sb = set(shingle_hashes(a, k).tolist()), set(shingle_hashes(b, k).tolist())
    return len(sa & sb) / len(sa | sb)


@pytest.fixture(scope="module")
def paragraph() -> str:
    """One 200-word original of the synthetic corpus, with sentences, commas and line breaks."""
    return synthetic_corpus(1, seed=11, words_per_doc=(200, 200))[0]["text"]


def test_exact_key_folds_case_whitespace_and_punctuation():
    key = exact_key("The quick brown fox.")
    assert key == exact_key("the  QUICK\nbrown fox") == exact_key("  The quick, brown fox!!! ")
    assert key == exact_key("The ｑｕｉｃｋ brown fox.")  # full-width letters fold under NFKC
    assert key != exact_key("The quick brown dog.")
    assert key != exact_key("The quick brown fox jumps.")
    assert 0 <= key < 2**63
    assert exact_key("") == exact_key(" ... ")


def test_shingle_hashes_shapes():
    assert shingle_hashes("a b c d e f g", 5).dtype == np.uint32
    assert len(shingle_hashes("a b c d e f g", 5)) == 3
    assert len(shingle_hashes("a b c", 5)) == 1  # shorter than k: one shingle of every word
    assert len(shingle_hashes("", 5)) == len(shingle_hashes("?!", 5)) == 0
    assert np.array_equal(shingle_hashes("One, two three. Four five six", 5), shingle_hashes("one two three four five six", 5))
    assert not np.array_equal(shingle_hashes("a b c d e", 5), shingle_hashes("a b c d f", 5))
    assert not np.array_equal(shingle_hashes("a b c d e", 5), shingle_hashes("b a c d e", 5))  # order matters


def test_minhash_is_the_mersenne_universal_hash():
    hasher = MinHasher(16, seed=3)
    hashes = shingle_hashes("one two three four five six seven eight nine ten", 3)
    a, b, p = [int(x) for x in hasher.a], [int(x) for x in hasher.b], (1 << 61) - 1
    expected = [min(((ai * int(h) + bi) % p) & 0xFFFFFFFF for h in hashes) for ai, bi in zip(a, b)]
    assert hasher.signature(hashes).tolist() == expected
    assert all(x % 2 == 1 and x < 2**32 for x in a) and all(x < 2**32 for x in b)


def test_minhash_signatures_rows_and_empty_documents():
    hasher = MinHasher(64)
    texts = ["alpha beta gamma delta epsilon zeta eta", "", "word " * 2000]
    signatures = hasher.signatures(texts, 5)
    assert signatures.shape == (3, 64) and signatures.dtype == np.uint32
    assert np.array_equal(signatures[0], hasher.signature(shingle_hashes(texts[0], 5)))
    assert (signatures[1] == 0xFFFFFFFF).all()
    assert hasher.signatures([], 5).shape == (0, 64)
    assert np.array_equal(MinHasher(64).a, hasher.a) and not np.array_equal(MinHasher(64, seed=2).a, hasher.a)


def test_estimated_jaccard_tracks_the_true_one(paragraph):
    words = paragraph.split()
    edited = " ".join(words[:100] + ["zzz"] + words[100:150] + ["yyy"] + words[150:])
    hasher = MinHasher(256)
    estimate = estimated_jaccard(*hasher.signatures([paragraph, edited], 5))
    assert abs(estimate - _shingle_jaccard(paragraph, edited)) < 0.08
    assert estimated_jaccard(*hasher.signatures([paragraph, "something else entirely, not shared"], 5)) < 0.05


def test_lsh_params_separate_near_from_far():
    bands, rows = lsh_params(0.85, 128)
    assert bands * rows <= 128

    def candidate(s):
        return 1 - (1 - s**rows) ** bands

    # candidates are verified afterwards, so the default leans to recall: few misses above the threshold
    assert candidate(0.95) > 0.99 and candidate(0.9) > 0.97
    assert candidate(0.7) < 0.25 and candidate(0.5) < 0.01
    balanced = lsh_params(0.85, 128, false_negative_weight=0.5)
    assert 1 - (1 - 0.9 ** balanced[1]) ** balanced[0] < candidate(0.9)
    assert lsh_params(0.5, 128)[1] < rows  # a lower threshold needs shorter (easier to match) bands


def test_band_keys_are_per_band_and_stable():
    signatures = np.tile(np.arange(8, dtype=np.uint32), (3, 2))  # bands 0 and 1 hold the same values
    signatures[2, 5] = 99  # third document differs in band 1 (values 4..7) only
    keys = band_keys(signatures, 4, 4)
    assert keys.shape == (3, 4) and keys.dtype == np.int64 and (keys >= 0).all()
    assert keys[0, 0] != keys[0, 2]  # same values, different bands
    assert np.array_equal(keys[0], keys[1])
    assert keys[2, 1] != keys[0, 1] and np.array_equal(keys[2, [0, 2, 3]], keys[0, [0, 2, 3]])
    with pytest.raises(ValueError, match="exceeds"):
        band_keys(signatures, 5, 4)


def test_hashes_do_not_depend_on_the_process():
    code = ("import numpy as np; from honed.data.dedup import exact_key, band_keys, ngram_hashes, MinHasher;"
            "s = MinHasher(16).signatures(['a b c d e f'], 3);"
            "print(exact_key('Hello, world'), band_keys(s, 4, 4).tolist(), sorted(ngram_hashes('a b c d e', 3)))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)]
    signatures = MinHasher(16).signatures(["a b c d e f"], 3)
    here = f"{exact_key('Hello, world')} {band_keys(signatures, 4, 4).tolist()} {sorted(ngram_hashes('a b c d e', 3))}\n"
    assert runs[0] == runs[1] == here


def test_bucket_pairs_are_star_edges_to_the_smallest_id():
    assert bucket_pairs([7, 3, 9, 3, 7]) == [(7, 3), (9, 3)]
    assert bucket_pairs(np.array([5, 5])) == []
    assert bucket_pairs([4]) == []


def test_verify_bucket_drops_members_that_only_share_a_band():
    base = np.arange(100, dtype=np.uint32)
    close = base.copy()
    close[:5] += 1000  # 95 % agreement
    far = base.copy()
    far[:60] += 1000  # 40 % agreement: a band collision, not a duplicate
    far_twin = far.copy()
    edges = verify_bucket([10, 12, 11, 13, 12], np.stack([base, close, far, far_twin, close]), 0.85)
    assert sorted(edges) == [(12, 10), (13, 11)]  # the far pair forms its own star
    assert verify_bucket([1], base[None], 0.85) == []


def test_resolve_clusters_gives_the_smallest_id_of_each_component():
    assert resolve_clusters([(2, 1), (3, 2), (4, 3)]) == {2: 1, 3: 1, 4: 1}  # chain
    assert resolve_clusters([(9, 5), (7, 5), (5, 8)]) == {7: 5, 8: 5, 9: 5}  # star, either edge order
    assert resolve_clusters([(20, 30), (10, 40), (40, 30)]) == {20: 10, 30: 10, 40: 10}  # joins through 40
    assert resolve_clusters([(1, 2), (3, 4), (2, 1)]) == {2: 1, 4: 3}
    assert resolve_clusters([]) == {}


def test_resolve_clusters_matches_a_plain_union_find():
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, 3000, (2500, 2))
    parent: dict[int, int] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for u, v in pairs.tolist():
        ru, rv = find(u), find(v)
        parent[max(ru, rv)] = min(ru, rv)
    expected = {x: find(x) for x in list(parent) if find(x) != x}
    assert resolve_clusters(pairs) == resolve_clusters(map(tuple, pairs.tolist())) == expected


def test_near_duplicates_finds_edited_copies_and_leaves_unrelated_texts(paragraph):
    words = paragraph.split()
    reformatted = paragraph.replace(". ", "!\n").replace(",", "").upper()
    two_words_changed = " ".join(words[:50] + ["qwerty"] + words[51:140] + ["asdf"] + words[141:])
    unrelated = synthetic_corpus(1, seed=12, words_per_doc=(200, 200))[0]["text"]
    texts = [paragraph, unrelated, reformatted, two_words_changed, "short text", "Short, text!"]
    dups = near_duplicates([10, 11, 12, 13, 14, 15], texts, threshold=0.85, num_perm=128, shingle_words=5)
    assert dups == {12: 10, 13: 10, 15: 14}


def test_ngram_index_hits_misses_and_pickles():
    eval_texts = ["What is the capital of France? Paris is the capital.", "too short"]
    index = NgramIndex(eval_texts, n=5)
    assert len(index) == 6 and len(ngram_hashes("too short", 5)) == 0
    assert index.contaminated("Q: what is THE capital of france -- asked again")
    assert not index.contaminated("What was the capital city of Spain? Madrid.")
    assert not index.contaminated("too short")  # fewer than n words never match
    copy = pickle.loads(pickle.dumps(index))
    assert len(copy) == len(index) and copy.contaminated("the capital of France, Paris")
    assert not NgramIndex([], n=5).contaminated("what is the capital of france")
    assert all(0 <= h < 2**63 for h in ngram_hashes("a b c d e f g", 3))


def test_synthetic_corpus_is_deterministic_and_plants_duplicates():
    corpus = synthetic_corpus(400, seed=5)
    assert corpus == synthetic_corpus(400, seed=5) and corpus != synthetic_corpus(400, seed=6)
    assert [r["id"] for r in corpus] == list(range(400))
    by_id = {r["id"]: r for r in corpus}
    for record in corpus:
        if record["kind"] == "original":
            assert record["dup_of"] is None and 80 <= len(record["text"].split()) <= 300
            continue
        original = by_id[record["dup_of"]]
        assert original["kind"] == "original" and original["id"] < record["id"]
        if record["kind"] == "exact":
            assert exact_key(record["text"]) == exact_key(original["text"])
        else:
            assert exact_key(record["text"]) != exact_key(original["text"])
            assert _shingle_jaccard(record["text"], original["text"]) > 0.85
    assert {r["kind"] for r in corpus} == {"original", "near", "exact"}


def test_iter_synthetic_text_streams_the_same_records():
    records = list(iter_synthetic_text(50_000, seed=5))
    assert records == synthetic_corpus(len(records), seed=5)
    assert 50_000 <= sum(len(r["text"]) for r in records) < 50_000 + 4_000


def test_near_duplicates_recall_and_precision_on_the_synthetic_corpus():
    corpus = synthetic_corpus(3000, seed=2024)
    dups = near_duplicates([r["id"] for r in corpus], [r["text"] for r in corpus],
                           threshold=0.85, num_perm=128, shingle_words=5)
    cluster = {r["id"]: r["id"] if r["dup_of"] is None else r["dup_of"] for r in corpus}
    planted = {r["id"] for r in corpus if r["kind"] != "original"}
    correct = {i for i, kept in dups.items() if i in planted and cluster[i] == cluster[kept]}
    assert len(planted) > 300
    assert len(correct) / len(planted) >= 0.9  # recall
    assert len(correct) / len(dups) >= 0.95  # precision

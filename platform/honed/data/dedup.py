"""Exact and near-duplicate detection and n-gram decontamination: pure building blocks over numpy.

On Ray Data (`honed.data.corpus_dedup`) they run as signatures and band keys per batch, a hash shuffle over
band keys that links each bucket's members to its smallest id, a signature check of those candidate edges, and
`resolve_clusters` on the edges; `near_duplicates` is the same composition in memory, for tests and small inputs:

    dups = near_duplicates(ids, texts, threshold=0.85, num_perm=128, shingle_words=5)
    kept = [i for i in ids if i not in dups]   # dups maps each dropped id to the id it duplicates

Every hash here is deterministic across processes and machines (crc32, blake2b and fixed integer mixing,
never Python's salted `hash()`), so workers agree on keys without coordination.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
import zlib
from collections.abc import Iterable

import numpy as np

_PUNCTUATION = re.compile(r"[^\w\s]|_")  # punctuation and symbols; `_` counts as a word character in `\w`
_MERSENNE_61 = np.uint64((1 << 61) - 1)
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: `acc * _MULTIPLIER` is a bijection on uint64
_ROWS_PER_CHUNK = 512  # shingles per MinHash block: larger blocks fall out of cache and run slower


def normalized_words(text: str) -> list[str]:
    """NFKC, casefold, punctuation and symbols removed (not replaced: "don't" → "dont"), split on whitespace."""
    return _PUNCTUATION.sub("", unicodedata.normalize("NFKC", text).casefold()).split()


def exact_key(text: str) -> int:
    """63-bit key of the normalised text: texts that differ only in case, whitespace or punctuation share it."""
    digest = hashlib.blake2b(" ".join(normalized_words(text)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, a bijection that spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(33))
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def _word_ngrams(words: list[str], n: int) -> np.ndarray:
    """uint64 hash of each run of `n` consecutive words (crc32 per word, then a polynomial over the run)."""
    word_hashes = np.fromiter(map(zlib.crc32, " ".join(words).encode().split(b" ")), np.uint64, len(words))
    count = len(words) - n + 1
    acc = np.full(count, n, dtype=np.uint64)
    for offset in range(n):
        acc = acc * _MULTIPLIER + word_hashes[offset : offset + count] + np.uint64(1)
    return _mix64(acc)


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """uint32 hash of every word k-shingle of the normalised text; fewer than `k` words give one shingle of
    them all, so short texts still have a signature; empty text gives an empty array."""
    words = normalized_words(text)
    if not words:
        return np.empty(0, dtype=np.uint32)
    return (_word_ngrams(words, min(k, len(words))) >> np.uint64(32)).astype(np.uint32)


class MinHasher:
    """`num_perm` universal hashes (a·h + b) mod (2^61 − 1); a signature holds each one's minimum over a
    document's shingle hashes (low 32 bits). Plain numpy attributes, so it pickles to Ray workers."""

    def __init__(self, num_perm: int, seed: int = 1):
        rng = np.random.default_rng(seed)
        # a, b < 2^32 and h < 2^32, so a·h + b < 2^64: exact in uint64 before the modulo.
        self.a = rng.integers(1, 1 << 32, num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64)

    @property
    def num_perm(self) -> int:
        return len(self.a)

    def _permuted(self, hashes: np.ndarray) -> np.ndarray:
        """[len(hashes), num_perm] uint32 values of every hash function on every shingle hash."""
        values = np.multiply.outer(hashes.astype(np.uint64), self.a)
        values += self.b
        # x mod (2^61 − 1) without division: fold the top 3 bits down, then one conditional subtraction.
        high = values >> np.uint64(61)
        values &= _MERSENNE_61
        values += high
        np.subtract(values, _MERSENNE_61, out=values, where=values >= _MERSENNE_61)
        return values.astype(np.uint32)  # the cast keeps the low 32 bits

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """uint32 [num_perm]; all 0xFFFFFFFF for no shingles."""
        signature = np.full(self.num_perm, 0xFFFFFFFF, dtype=np.uint32)
        for start in range(0, len(hashes), _ROWS_PER_CHUNK):
            np.minimum(signature, self._permuted(hashes[start : start + _ROWS_PER_CHUNK]).min(axis=0), out=signature)
        return signature

    def signatures(self, texts: list[str], k: int) -> np.ndarray:
        """uint32 [len(texts), num_perm] over word k-shingles."""
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        for row, text in enumerate(texts):
            out[row] = self.signature(shingle_hashes(text, k))
        return out


def _candidate_probability(similarity: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Chance that two documents of this Jaccard similarity share at least one band."""
    return 1 - (1 - similarity**rows) ** bands


def lsh_params(threshold: float, num_perm: int, false_negative_weight: float = 0.9) -> tuple[int, int]:
    """(bands, rows) with bands × rows <= num_perm minimising the weighted false-positive area (candidate
    chance below `threshold`) plus false-negative area (missed chance above it).

    Candidates are verified against their signatures afterwards, so a false positive costs only a
    comparison while a false negative is a duplicate kept for good: misses weigh 0.9 by default. For 0.85
    and 128 permutations that gives 11 bands × 11 rows, whose chance to pair two records is ~0.98 at a
    similarity of 0.9 and ~0.005 at 0.5 (equal weights would give 8 × 16: only ~0.81 at 0.9)."""
    steps = 512  # midpoint rule; the areas are smooth, so this is far finer than the choice needs
    below = (np.arange(steps) + 0.5) / steps * threshold
    above = threshold + (np.arange(steps) + 0.5) / steps * (1 - threshold)
    best, best_error = (1, 1), np.inf
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            false_positive = _candidate_probability(below, bands, rows).mean() * threshold
            false_negative = (1 - _candidate_probability(above, bands, rows)).mean() * (1 - threshold)
            error = (1 - false_negative_weight) * false_positive + false_negative_weight * false_negative
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """int64 [n, bands], non-negative: one key per band over the band index and its `rows` signature values,
    so documents sharing a key agree on a whole band, and equal values in different bands never collide."""
    if bands * rows > signatures.shape[1]:
        raise ValueError(f"bands × rows = {bands * rows} exceeds the signature length {signatures.shape[1]}")
    values = signatures[:, : bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    acc = np.broadcast_to(_mix64(np.arange(bands, dtype=np.uint64) + np.uint64(1)), values.shape[:2])
    for row in range(rows):
        acc = acc * _MULTIPLIER + values[:, :, row]
    return (_mix64(acc) >> np.uint64(1)).astype(np.int64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal MinHash entries: an estimate of the Jaccard similarity of the two shingle sets."""
    return float(np.mean(sig_a == sig_b))


def bucket_pairs(ids: list[int] | np.ndarray) -> list[tuple[int, int]]:
    """Star edges (member, smallest id) for one bucket's distinct members: enough to connect the bucket."""
    members = np.unique(np.asarray(ids, dtype=np.int64)).tolist()
    return [(member, members[0]) for member in members[1:]]


def verify_bucket(ids: list[int] | np.ndarray, signatures: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Star edges of one bucket, kept only where the signatures agree: the smallest id leads, every member
    with estimated Jaccard >= `threshold` to it joins it; the smallest member left leads the next star.

    Sharing one band is weak evidence (a pair at similarity 0.5 still collides now and then); checking the
    whole signature drops those false candidates before they can chain unrelated clusters together. A
    member close only to a non-leader is not linked here, but such pairs share other buckets too.
    Cost is members × leaders × num_perm; leaders are few because a bucket's members share a whole band."""
    ids = np.asarray(ids, dtype=np.int64)
    members, first = np.unique(ids, return_index=True)  # sorted ids; repeats collapse to one member
    signatures = np.asarray(signatures)[first]
    edges: list[tuple[int, int]] = []
    left = np.arange(len(members))
    while len(left) > 1:
        agreement = (signatures[left] == signatures[left[0]]).mean(axis=1)
        joins = agreement >= threshold
        joins[0] = True
        leader = int(members[left[0]])
        edges.extend((member, leader) for member in members[left[joins][1:]].tolist())
        left = left[~joins]
    return edges


def resolve_clusters(pairs: Iterable[tuple[int, int]] | np.ndarray) -> dict[int, int]:
    """{id: representative} for every id linked to a smaller one; the representative is the smallest id of
    its connected component (ids follow reading order, so the first record seen is the one kept).

    Union-find with union by min and path compression, run on all edges at once in numpy: each round
    hooks every edge's larger root under the smaller one, then pointer-jumps every node to its root.
    A million pairs take about half a second, a few times faster than a per-pair Python union-find."""
    edges = np.asarray(pairs, dtype=np.int64) if isinstance(pairs, np.ndarray) else np.fromiter(
        itertools.chain.from_iterable(pairs), dtype=np.int64)
    edges = edges.reshape(-1, 2)
    if not len(edges):
        return {}
    nodes, index = np.unique(edges, return_inverse=True)  # dense indices in id order: smaller index, smaller id
    left, right = index.reshape(-1, 2).T
    parent = np.arange(len(nodes))
    while True:
        root_left, root_right = parent[left], parent[right]
        crossing = root_left != root_right
        if not crossing.any():
            break
        low = np.minimum(root_left[crossing], root_right[crossing])
        high = np.maximum(root_left[crossing], root_right[crossing])
        np.minimum.at(parent, high, low)  # parent[i] <= i always, so no cycles can form
        while not np.array_equal(grand := parent[parent], parent):
            parent = grand
    linked = parent != np.arange(len(nodes))
    return dict(zip(nodes[linked].tolist(), nodes[parent[linked]].tolist()))


def near_duplicates(
    ids: list[int] | np.ndarray,
    texts: list[str],
    threshold: float,
    num_perm: int,
    shingle_words: int,
    bands: int | None = None,
    rows: int | None = None,
    seed: int = 1,
) -> dict[int, int]:
    """{duplicate id: kept id} by MinHash LSH: signatures → band keys → buckets → `verify_bucket` →
    `resolve_clusters`. The in-memory reference for the Ray Data path, which runs the same steps."""
    if bands is None or rows is None:
        bands, rows = lsh_params(threshold, num_perm)
    ids = np.asarray(ids, dtype=np.int64)
    signatures = MinHasher(num_perm, seed).signatures(texts, shingle_words)
    keys = band_keys(signatures, bands, rows).ravel()
    docs = np.repeat(np.arange(len(ids)), bands)
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    edges: list[tuple[int, int]] = []
    for bucket in np.split(docs[order], bounds):
        if len(bucket) > 1:
            edges.extend(verify_bucket(ids[bucket], signatures[bucket], threshold))
    return resolve_clusters(edges)


def ngram_hashes(text: str, n: int) -> set[int]:
    """63-bit hashes of the normalised text's word n-grams. A text of fewer than `n` words has none, so it
    can never match: choose `n` no longer than the shortest eval item that should count."""
    return set(_ngram_array(text, n).tolist())


def _ngram_array(text: str, n: int) -> np.ndarray:
    words = normalized_words(text)
    if len(words) < n:
        return np.empty(0, dtype=np.int64)
    return (_word_ngrams(words, n) >> np.uint64(1)).astype(np.int64)


class NgramIndex:
    """The word n-grams of a set of eval texts, as one sorted int64 array (8 bytes per n-gram, cheap to pickle
    to Ray actors); `contaminated(text)` says whether a text shares any of them.

        index = NgramIndex(eval_texts, n=13)
        keep = not index.contaminated(record_text)
    """

    def __init__(self, texts: Iterable[str], n: int):
        self.n = n
        arrays = [_ngram_array(text, n) for text in texts]
        self.hashes = np.unique(np.concatenate(arrays)) if arrays else np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.hashes)

    def contaminated(self, text: str) -> bool:
        query = _ngram_array(text, self.n)
        if not len(query) or not len(self.hashes):
            return False
        found = np.searchsorted(self.hashes, query).clip(max=len(self.hashes) - 1)
        return bool((self.hashes[found] == query).any())

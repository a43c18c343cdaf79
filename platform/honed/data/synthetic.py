"""Deterministic synthetic corpus with planted duplicates, for dedup tests and benchmarks.

    records = synthetic_corpus(3000, seed=0)            # [{"id", "text", "dup_of", "kind"}, ...]
    for record in iter_synthetic_text(200 * 2**20):     # ~200 MB of text, streamed
        sink.write(json.dumps(record) + "\\n")

Originals are sentences of pseudo-words with Zipf-like frequencies, commas, sentence ends and paragraph
breaks. A `near` record copies an earlier original with formatting changes (case, whitespace, punctuation)
and a few word replacements, insertions or deletions; an `exact` record copies one verbatim or with only case
or whitespace changed. `dup_of` names the original. `synthetic_corpus(n)` is the first n records of the
stream `iter_synthetic_text` yields for the same arguments.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import numpy as np

_VOCABULARY_SIZE = 4000
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
           "br", "ch", "cl", "dr", "fr", "gl", "pl", "pr", "sh", "st", "th", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"]
_CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]
# Separator after each word; ends of sentences also end lines and paragraphs now and then.
_SPACE, _COMMA, _FINAL = 0, 1, 2
_SEPARATORS = np.array([" ", ", ", ".", ". ", "? ", "! ", ".\n", ".\n\n"], dtype=object)
_SENTENCE_ENDS = np.arange(3, len(_SEPARATORS))
_SENTENCE_END_WEIGHTS = [0.6, 0.08, 0.07, 0.15, 0.1]
_WORDS_PER_SENTENCE = 13  # mean; sentence lengths are geometric
_COMMA_RATE = 0.06
# Word edits per near-duplicate, as a share of its 5-shingles they disturb (each edit disturbs about 5).
# 1-4 % keeps the true 5-shingle Jaccard near 0.92-0.98; at least one edit is made, so short documents
# can dip to ~0.88. Editing 1-5 % of *words* would disturb up to a quarter of the shingles (Jaccard ~0.6).
_SHINGLES_DISTURBED = (0.01, 0.04)
_FORMAT_EDITS = (1, 6)
_ORIGINALS_KEPT = 10_000  # pool that duplicates copy from; bounds memory on long streams
_BLOCK_DOCS = 256  # fresh documents generated per vectorised draw


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[np.ndarray, np.ndarray]:
    """(words, cumulative probabilities): pseudo-words, shorter ones mostly more frequent, Zipf(1.05) over rank.
    The words are lower case; index + size gives the capitalised form."""
    rng = np.random.default_rng(20240611)
    words: dict[str, None] = {}
    while len(words) < _VOCABULARY_SIZE:
        syllables = rng.integers(1, 4)
        words["".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                      + _CODAS[rng.integers(len(_CODAS))] for _ in range(syllables))] = None
    ranked = sorted(words, key=lambda word: len(word) + rng.uniform(0, 4))  # short words mostly frequent
    weights = 1.0 / (np.arange(len(ranked)) + 2.7) ** 1.05
    both_cases = np.array(ranked + [word.capitalize() for word in ranked], dtype=object)
    return both_cases, np.cumsum(weights) / weights.sum()


def _draw_words(rng: np.random.Generator, count: int) -> np.ndarray:
    return np.searchsorted(_vocabulary()[1], rng.random(count)).clip(max=_VOCABULARY_SIZE - 1)


def _fresh_documents(rng: np.random.Generator, words_per_doc: tuple[int, int]) -> Iterator[list[str]]:
    """Endless original documents as token lists (word, separator, word, separator, ...), drawn in blocks."""
    vocabulary, _ = _vocabulary()
    while True:
        lengths = rng.integers(words_per_doc[0], words_per_doc[1] + 1, _BLOCK_DOCS)
        ends = np.cumsum(lengths)
        total = int(ends[-1])
        draw = rng.random(total)
        separators = np.where(draw < _COMMA_RATE, _COMMA, _SPACE)
        sentence_end = draw > 1 - 1 / _WORDS_PER_SENTENCE
        separators[sentence_end] = rng.choice(_SENTENCE_ENDS, sentence_end.sum(), p=_SENTENCE_END_WEIGHTS)
        separators[ends - 1] = _FINAL
        capital = np.roll(sentence_end, 1)
        capital[ends - lengths] = True
        tokens = np.empty(2 * total, dtype=object)
        tokens[0::2] = vocabulary[_draw_words(rng, total) + _VOCABULARY_SIZE * capital]
        tokens[1::2] = _SEPARATORS[separators]
        for start, end in zip((ends - lengths).tolist(), ends.tolist()):
            yield tokens[2 * start : 2 * end].tolist()


def _reformat(rng: np.random.Generator, tokens: list[str]) -> None:
    """Case, whitespace and punctuation changes that text normalisation undoes."""
    for _ in range(rng.integers(*_FORMAT_EDITS, endpoint=True)):
        position = int(rng.integers(len(tokens) // 2))
        change = rng.integers(4)
        if change == 0:
            tokens[2 * position] = tokens[2 * position].upper()
        elif change == 1:
            tokens[2 * position] = tokens[2 * position].lower()
        elif tokens[2 * position + 1] != _SEPARATORS[_FINAL]:  # keep the whitespace between words
            tokens[2 * position + 1] = [" ", "  ", ", ", "\n", " - ", "! "][rng.integers(6)]


def _edit_words(rng: np.random.Generator, tokens: list[str]) -> None:
    """Replace, insert or delete a few words (at least one), each somewhere at random."""
    vocabulary, _ = _vocabulary()
    shingles = max(len(tokens) // 2 - 4, 1)
    edits = max(1, round(rng.uniform(*_SHINGLES_DISTURBED) * shingles / 5))
    for operation, position in zip(rng.integers(3, size=edits), rng.random(edits)):
        word = 2 * int(position * (len(tokens) // 2))
        if operation == 2 and len(tokens) > 4:
            del tokens[word : word + 2]
            continue
        new = vocabulary[_draw_words(rng, 1)[0]]
        while new.casefold() == tokens[word].casefold():
            new = vocabulary[_draw_words(rng, 1)[0]]
        if operation == 0:
            tokens[word] = new
        else:
            tokens[word:word] = [new, " "]


def _exact_copy(rng: np.random.Generator, text: str) -> str:
    """Verbatim, or differing only in case or whitespace."""
    variant = rng.integers(4)
    if variant == 1:
        return text.lower()
    if variant == 2:
        return text.replace("\n", " ").replace(" ", "  ")
    if variant == 3:
        return "\n" + text.upper() + " \n"
    return text


def _records(
    seed: int, near_dup_rate: float, exact_dup_rate: float, words_per_doc: tuple[int, int]
) -> Iterator[dict]:
    rng = np.random.default_rng(seed)
    fresh = _fresh_documents(rng, words_per_doc)
    originals: list[tuple[int, list[str]]] = []
    for doc_id in itertools.count():
        draw = rng.random()
        if not originals or draw >= near_dup_rate + exact_dup_rate:
            tokens = next(fresh)
            if len(originals) < _ORIGINALS_KEPT:
                originals.append((doc_id, tokens))
            else:
                originals[rng.integers(_ORIGINALS_KEPT)] = (doc_id, tokens)
            yield {"id": doc_id, "text": "".join(tokens), "dup_of": None, "kind": "original"}
            continue
        source, tokens = originals[rng.integers(len(originals))]
        if draw < near_dup_rate:
            tokens = list(tokens)
            _reformat(rng, tokens)
            _edit_words(rng, tokens)
            yield {"id": doc_id, "text": "".join(tokens), "dup_of": source, "kind": "near"}
        else:
            yield {"id": doc_id, "text": _exact_copy(rng, "".join(tokens)), "dup_of": source, "kind": "exact"}


def synthetic_corpus(
    n_docs: int,
    seed: int = 0,
    near_dup_rate: float = 0.1,
    exact_dup_rate: float = 0.05,
    words_per_doc: tuple[int, int] = (80, 300),
) -> list[dict]:
    """`n_docs` records `{"id", "text", "dup_of", "kind"}`; ids count from 0 and duplicates follow their
    original. `kind` is `original`, `near` or `exact`; `dup_of` is the original's id (None for originals)."""
    return list(itertools.islice(_records(seed, near_dup_rate, exact_dup_rate, words_per_doc), n_docs))


def iter_synthetic_text(
    total_bytes: int,
    seed: int = 0,
    near_dup_rate: float = 0.1,
    exact_dup_rate: float = 0.05,
    words_per_doc: tuple[int, int] = (80, 300),
) -> Iterator[dict]:
    """The same records as `synthetic_corpus`, streamed until their texts hold at least `total_bytes`
    characters (bytes, since the text is ASCII)."""
    produced = 0
    for record in _records(seed, near_dup_rate, exact_dup_rate, words_per_doc):
        if produced >= total_bytes:
            return
        produced += len(record["text"])
        yield record

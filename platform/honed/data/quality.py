"""Text normalisation and Gopher / C4-style quality rules. Pure functions over one string, run per record
inside Ray Data, so they lean on `re` and `str` methods rather than loops over characters.

    text = normalize_text(raw, unicode="NFKC", strip_html=True)
    reason = quality_reason(text_of(record), FilterConfig())   # None = keep, else the failed rule's name
"""

from __future__ import annotations

import html
import itertools
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from functools import cache

from honed.config import FilterConfig

# ------------------------------------------------------------------------------------------ normalisation
_SCRIPT_STYLE_COMMENT = re.compile(   # an unclosed one runs to the end of the text
    r"<(script|style)\b[^<>]*>.*?(?:</\1\s*>|\Z)|<!--.*?(?:-->|\Z)", re.IGNORECASE | re.DOTALL)
# Tags stop at the next `<` too, so a page of stray `<` costs linear time, not quadratic.
_BLOCK_TAGS = re.compile(   # a run of block tags (and the whitespace between them) is one line break
    r"(?:</?(?:p|div|br|li|ul|ol|dl|dt|dd|h[1-6]|tr|table|thead|tbody|blockquote|pre|section|article"
    r"|header|footer|nav|aside|hr)\b[^<>]*>\s*)+", re.IGNORECASE)
_CELL_TAG = re.compile(r"</?t[dh]\b[^<>]*>", re.IGNORECASE)
_ANY_TAG = re.compile(r"<[A-Za-z/!?][^<>]*>")
_LINE_BREAK = re.compile(r"\r\n?|[\v\f\x85\u2028\u2029]")
_INVISIBLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_INLINE_SPACE = re.compile(r"[^\S\n]+")   # any whitespace but \n: tab, NBSP, U+2000-200A, U+3000, ...
_LINE_EDGE_SPACE = re.compile(r" ?\n ?")
_BLANK_RUN = re.compile(r"\n{3,}")


def remove_html(text: str) -> str:
    """Drop scripts, styles and comments; each run of block tags (p, div, br, li, h1-h6, tr, ...) becomes one
    line break, table cells a space, other tags nothing; then decode entities (`&amp;` → `&`, `&nbsp;` → NBSP)."""
    text = _SCRIPT_STYLE_COMMENT.sub("", text)
    text = _CELL_TAG.sub(" ", _BLOCK_TAGS.sub("\n", text))
    return html.unescape(_ANY_TAG.sub("", text))


def normalize_text(text: str, unicode: str = "NFC", strip_html: bool = False) -> str:
    """Clean one text, in this order:

    1. `strip_html=True`: `remove_html()` above.
    2. Line breaks: `\\r\\n`, `\\r`, `\\v`, `\\f`, NEL (U+0085), U+2028 and U+2029 become `\\n`.
    3. Invisible characters are removed: C0/C1 controls other than `\\n` and `\\t`, zero-width space /
       non-joiner / joiner (U+200B-U+200D), word joiner (U+2060) and BOM (U+FEFF). Done before step 4 so a
       combining accent behind a zero-width space still composes.
    4. Unicode normal form `unicode`: "NFC", "NFKC" (also folds ﬁ → fi, full-width → ASCII) or "none".
    5. Every run of whitespace other than `\\n` (tabs, NBSP, other Unicode spaces) becomes one space, and
       each line is stripped.
    6. Two or more blank lines in a row become exactly one (`\\n\\n`), so single line breaks and paragraph
       breaks survive; then the whole text is stripped.
    """
    if strip_html:
        text = remove_html(text)
    text = _INVISIBLE.sub("", _LINE_BREAK.sub("\n", text))
    if unicode != "none":
        text = unicodedata.normalize(unicode, text)
    text = _LINE_EDGE_SPACE.sub("\n", _INLINE_SPACE.sub(" ", text))
    return _BLANK_RUN.sub("\n\n", text).strip()


def text_of(record: dict) -> str:
    """The text the quality rules see: `text`, else `prompt` + newline + `response`, else the chat turns'
    contents, one per line (a preference record's question, then its chosen and rejected answers)."""
    if record.get("text") is not None:
        return record["text"]
    if record.get("prompt") is not None:
        return f"{record['prompt']}\n{record.get('response') or ''}"
    turns = [turn["content"] for turn in record.get("messages") or []]
    return "\n".join(turns + [record[k] for k in ("chosen", "rejected") if k in record])


# ------------------------------------------------------------------------------------------ quality rules
# Each rule gets the text, its lower-cased whitespace-separated words and the config, and says whether the
# text breaks it. Words are lower-cased so "The cat" and "the cat" count as the same n-gram.
_LETTER = re.compile(r"[^\W\d_]")          # a Unicode letter (word character, not digit or underscore)
_NON_LETTERS = re.compile(r"[\W\d_]+")
_ASCII_WORD = re.compile(r"[a-z]+")
STOPWORDS = frozenset({
    "the", "be", "to", "of", "and", "that", "have", "with", "a", "an", "in", "is", "it", "for", "on", "as", "was",
    "are", "this", "by", "not", "or", "from", "at",
})
"""Gopher's eight (the, be, to, of, and, that, have, with) plus other very common English function words."""
_SCRIPT_BY_NAME_PREFIX = {
    "LATIN": "latin", "GREEK": "greek", "CYRILLIC": "cyrillic", "ARABIC": "arabic", "HEBREW": "hebrew",
    "DEVANAGARI": "devanagari", "CJK": "cjk", "HIRAGANA": "cjk", "KATAKANA": "cjk", "HANGUL": "cjk",
}


@cache
def script_of(char: str) -> str | None:
    """Writing system of a letter from its Unicode name ('LATIN SMALL LETTER E', 'CJK UNIFIED IDEOGRAPH-4E00',
    'FULLWIDTH LATIN ...'); None for anything outside the scripts `FilterConfig.scripts` can name."""
    name = unicodedata.name(char, "").removeprefix("FULLWIDTH ").removeprefix("HALFWIDTH ")
    return _SCRIPT_BY_NAME_PREFIX.get(name.split(" ", 1)[0].split("-", 1)[0])


def _too_short(text: str, words: list[str], rules: FilterConfig) -> bool:
    return len(text) < rules.min_chars


def _too_long(text: str, words: list[str], rules: FilterConfig) -> bool:
    return len(text) > rules.max_chars


def _duplicate_lines(text: str, words: list[str], rules: FilterConfig) -> bool:
    lines = [line for line in map(str.strip, text.splitlines()) if line]
    repeats = len(lines) - len(set(lines))
    return bool(lines) and repeats / len(lines) > rules.max_duplicate_line_fraction


def _top_ngram(text: str, words: list[str], rules: FilterConfig) -> bool:
    if len(words) < max(2, rules.repetition_min_words):
        return False
    (first, second), count = Counter(itertools.pairwise(words)).most_common(1)[0]
    return count > 1 and count * (len(first) + len(second)) / sum(map(len, words)) > rules.max_top_ngram_fraction


def _duplicate_ngrams(text: str, words: list[str], rules: FilterConfig, n: int = 5) -> bool:
    if len(words) < max(n, rules.repetition_min_words):
        return False
    grams = list(zip(*(words[i:] for i in range(n))))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return False
    covered = bytearray(len(words))      # a word inside several repeated 5-grams counts once
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = b"\x01" * n
    repeated_chars = sum(len(word) for word, hit in zip(words, covered) if hit)
    return repeated_chars / sum(map(len, words)) > rules.max_duplicate_ngram_fraction


def _symbol_heavy(text: str, words: list[str], rules: FilterConfig) -> bool:
    symbols = text.count("#") + text.count("...") + text.count("…")
    return symbols / max(len(words), 1) > rules.max_symbol_ratio


def _few_alpha_words(text: str, words: list[str], rules: FilterConfig) -> bool:
    alpha_words = sum(map(bool, map(_LETTER.search, words)))
    return alpha_words / max(len(words), 1) < rules.min_alpha_word_fraction


def _off_script(text: str, words: list[str], rules: FilterConfig) -> bool:
    letters = _NON_LETTERS.sub("", text)
    allowed = set(rules.scripts)
    if not letters or ("latin" in allowed and letters.isascii()):
        return False
    in_scripts = sum(n for char, n in Counter(letters).items() if script_of(char) in allowed)
    return in_scripts / len(letters) < rules.min_script_fraction


def _few_stopwords(text: str, words: list[str], rules: FilterConfig) -> bool:
    return len(STOPWORDS.intersection(_ASCII_WORD.findall(text.lower()))) < rules.min_stopwords


RULES: dict[str, tuple[str, Callable[[str, list[str], FilterConfig], bool]]] = {
    "min_chars": ("min_chars", _too_short),
    "max_chars": ("max_chars", _too_long),
    "duplicate_lines": ("max_duplicate_line_fraction", _duplicate_lines),
    "top_ngram": ("max_top_ngram_fraction", _top_ngram),
    "duplicate_ngrams": ("max_duplicate_ngram_fraction", _duplicate_ngrams),
    "symbol_ratio": ("max_symbol_ratio", _symbol_heavy),
    "alpha_words": ("min_alpha_word_fraction", _few_alpha_words),
    "script": ("scripts", _off_script),
    "stopwords": ("min_stopwords", _few_stopwords),
}
"""Rule name → (the `FilterConfig` field that sets it, `None` = off; the check), in the order they run."""


def quality_reason(text: str, rules: FilterConfig) -> str | None:
    """None when `text` passes every rule that is on, else the name of the first rule it fails (a key of
    `RULES`), used as the drop reason.

    - min_chars / max_chars: `len(text)` bounds.
    - duplicate_lines: share of non-empty (stripped) lines equal to an earlier line.
    - top_ngram: characters of the most frequent word 2-gram × its count / characters of all words, when that
      2-gram occurs more than once (texts of at least `repetition_min_words` words only).
    - duplicate_ngrams: share of word characters inside word 5-grams that occur more than once (same limit).
    - symbol_ratio: (`#` + `...` + `…`) per word.
    - alpha_words: share of words holding at least one letter; a text without words fails it.
    - script: share of letters whose script is in `scripts`; a text without letters passes it.
    - stopwords: distinct `STOPWORDS` found.
    """
    if not rules.enabled:
        return None
    words = text.lower().split()
    for name, (field, breaks) in RULES.items():
        if getattr(rules, field) is not None and breaks(text, words, rules):
            return name
    return None

"""Text normalisation and quality rules on hand-made text: each rule passes and fails, and switches off."""

import pytest

from honed.config import FilterConfig
from honed.data.quality import RULES, normalize_text, quality_reason, script_of, text_of
from honed.data.sources import icd10_records, kjv_records

ALL_OFF = {"min_chars": None, "max_chars": None, "max_duplicate_line_fraction": None, "max_top_ngram_fraction": None,
           "max_duplicate_ngram_fraction": None, "max_symbol_ratio": None, "min_alpha_word_fraction": None,
           "scripts": None, "min_stopwords": None}
ICD_PAIR = "What does ICD-10-CM code E11.9 mean?\nType 2 diabetes mellitus without complications"
VERSE = "In the beginning God created the heaven and the earth."


def only(**rule) -> FilterConfig:
    """A config with every rule off except the given ones."""
    return FilterConfig(**(ALL_OFF | rule))


# ------------------------------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("raw, form, clean", [
    ("ﬁne ﬂow", "NFKC", "fine flow"),                        # ligatures fold under NFKC ...
    ("ﬁne ﬂow", "NFC", "ﬁne ﬂow"),                           # ... and stay under NFC
    ("ＡＢＣ１２３！", "NFKC", "ABC123!"),                     # full-width → ASCII
    ("x²", "NFKC", "x2"),
    ("cafe\u0301", "NFC", "caf\u00e9"),                       # decomposed accent composes
    ("cafe\u0301", "none", "cafe\u0301"),
    ("caf\u00e9", "NFC", "caf\u00e9"),
    ("cafe\u200b\u0301", "NFC", "caf\u00e9"),                 # zero-width space removed before composing
    ("\ufeffhello", "NFC", "hello"),                          # BOM
    ("zero\u200bwidth\u200c\u200djoin\u2060er", "NFC", "zerowidthjoiner"),
    ("a\r\nb\rc\u2028d\u2029e\x85f\x0bg\x0ch", "NFC", "a\nb\nc\nd\ne\nf\ng\nh"),
    ("bell\x07 and nul\x00 and del\x7f and c1\x9b", "NFC", "bell and nul and del and c1"),
    ("a\u00a0b\u2003c\u3000d\u202fe\t\tf   g", "NFC", "a b c d e f g"),
    ("  line one  \n\t line two\t", "NFC", "line one\nline two"),
    ("p1\n\n\n\n   \n\np2\n\np3\nl4", "NFC", "p1\n\np2\n\np3\nl4"),   # blank runs → one blank line
    ("\n\n  \n", "NFC", ""),
    ("שלום  world 123", "NFC", "שלום world 123"),           # RTL text mixed with LTR
    ("\u202bمرحبا\u202c", "NFC", "\u202bمرحبا\u202c"),        # bidi embeddings are format chars, not C0/C1
    ("ok 👍🏽 🇩🇪", "NFC", "ok 👍🏽 🇩🇪"),
    ("👨\u200d👩\u200d👧", "NFC", "👨👩👧"),                    # documented: ZWJ sequences fall apart
])
def test_normalize_text(raw, form, clean):
    assert normalize_text(raw, unicode=form) == clean


def test_normalize_is_idempotent():
    raw = "  ﬁrst\u00a0line\r\n\r\n\r\n\u200bsecond\tline  "
    once = normalize_text(raw, "NFKC")
    assert once == "first line\n\nsecond line" and normalize_text(once, "NFKC") == once


def test_strip_html_removes_scripts_styles_comments_and_tags():
    page = ("<!DOCTYPE html><html><head><title>T</title><style>p { color: red }</style>"
            "<script type='text/javascript'>if (a < b) { alert('x') }</script></head><body>"
            "<h1>Heading</h1>\n  <p>Fish &amp; chips&nbsp;&mdash; &lt;b&gt; &#39;quoted&#39;</p>"
            "<!-- secret comment --><ul><li>one</li><li>two</li></ul>"
            "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>"
            "x<br/>y <b>bold</b> <a href='/z'>link</a><SCRIPT>never()</SCRIPT></body></html>")
    assert normalize_text(page, strip_html=True) == (
        "T\nHeading\nFish & chips — <b> 'quoted'\none\ntwo\na b\nc\nx\ny bold link")


def test_strip_html_drops_an_unclosed_script_and_is_off_by_default():
    assert normalize_text("keep<script>var x = 1;", strip_html=True) == "keep"
    assert normalize_text("<p>a &amp; b</p>") == "<p>a &amp; b</p>"


@pytest.mark.parametrize("record, text", [
    ({"text": "t", "group": None}, "t"),
    ({"prompt": "p", "response": "r", "group": "g"}, "p\nr"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "hi\nyo"),
    ({"text": None, "prompt": "p", "response": "r"}, "p\nr"),    # a missing column read as null
])
def test_text_of(record, text):
    assert text_of(record) == text


# ------------------------------------------------------------------------------------------ quality rules
def test_rule_names_and_order():
    assert list(RULES) == ["min_chars", "max_chars", "duplicate_lines", "top_ngram", "duplicate_ngrams",
                           "symbol_ratio", "alpha_words", "script", "stopwords"]


@pytest.mark.parametrize("text", [ICD_PAIR, VERSE, "Chapter 4: Endocrine, nutritional and metabolic diseases (E00-E89)"])
def test_ordinary_records_pass_the_defaults(text):
    assert quality_reason(text, FilterConfig()) is None


def test_every_bundled_record_passes_the_defaults():
    records = icd10_records(["4"]) + kjv_records(max_records=200, seed=0)
    failed = [(text_of(r), quality_reason(text_of(r), FilterConfig())) for r in records]
    assert [f for f in failed if f[1] is not None] == []


def test_disabled_filter_keeps_everything():
    assert quality_reason("", FilterConfig(enabled=False)) is None
    assert quality_reason("", FilterConfig()) == "min_chars"


def test_all_rules_off_keeps_anything():
    assert quality_reason("", only()) is None
    assert quality_reason("### ... ### …\n" * 50, only()) is None


WORDS_60 = " ".join(f"w{i}x" for i in range(60))            # 60 distinct words, no repetition
WORDS_50 = " ".join(f"w{i}x" for i in range(50))
SENTENCE_TWICE = "the quick brown fox jumps over the lazy dog now " * 2


@pytest.mark.parametrize("rule, text, verdict", [
    ({"min_chars": 5}, "abcd", "min_chars"),
    ({"min_chars": 5}, "abcde", None),
    ({"max_chars": 10}, "a" * 11, "max_chars"),
    ({"max_chars": 10}, "a" * 10, None),
    # 2 of 4 non-empty lines repeat an earlier one (blank lines ignored) → 0.5
    ({"max_duplicate_line_fraction": 0.3}, "buy now\n\nbuy now\nhello\nbuy now", "duplicate_lines"),
    ({"max_duplicate_line_fraction": 0.5}, "buy now\n\nbuy now\nhello\nbuy now", None),
    ({"max_duplicate_line_fraction": 0.0}, "one\ntwo\nthree", None),
    # "click here" 20 times in 60 words: 20 × 9 of 240 word characters
    ({"max_top_ngram_fraction": 0.2}, "click here aaa " * 20, "top_ngram"),
    ({"max_top_ngram_fraction": 0.2}, WORDS_60, None),
    ({"max_top_ngram_fraction": 0.2, "repetition_min_words": 100}, "click here aaa " * 20, None),  # too short to judge
    # a 2-gram seen once is never "top", however long its words
    ({"max_top_ngram_fraction": 0.01}, "supercalifragilistic expialidocious", None),
    ({"max_top_ngram_fraction": 0.01, "repetition_min_words": 1}, "supercalifragilistic expialidocious", None),
    # the same 10-word sentence twice after 50 distinct words: 2 × 38 of 266 word characters are repeated
    ({"max_duplicate_ngram_fraction": 0.15}, f"{WORDS_50} {SENTENCE_TWICE}", "duplicate_ngrams"),
    ({"max_duplicate_ngram_fraction": 0.3}, f"{WORDS_50} {SENTENCE_TWICE}", None),
    ({"max_duplicate_ngram_fraction": 0.15}, WORDS_60, None),
    ({"max_duplicate_ngram_fraction": 0.15, "repetition_min_words": 200}, "a b c d e " * 30, None),
    ({"max_duplicate_ngram_fraction": 0.15}, "a b c d e " * 30, "duplicate_ngrams"),
    ({"max_symbol_ratio": 0.1}, "#tag #tag more words here ... and …", "symbol_ratio"),   # 4 / 8
    ({"max_symbol_ratio": 0.1}, "one # in a sentence of about ten words or so", None),   # 1 / 10
    ({"min_alpha_word_fraction": 0.5}, "12 34 56 78 ab", "alpha_words"),
    ({"min_alpha_word_fraction": 0.5}, "12 34 ab cd é5", None),
    ({"min_alpha_word_fraction": 0.5}, "12 34 -- 99.9", "alpha_words"),   # no letters at all
    ({"min_alpha_word_fraction": 0.5}, "", "alpha_words"),
    ({"scripts": ["latin"]}, "Привет мир, как дела?", "script"),
    ({"scripts": ["latin"]}, "Naïve café façade, Straße, Ångström", None),
    ({"scripts": ["latin"]}, "ＦＵＬＬＷＩＤＴＨ latin", None),
    ({"scripts": ["latin", "cyrillic"]}, "Привет мир, как дела?", None),
    ({"scripts": ["latin"], "min_script_fraction": 0.5}, "Hello world and Привет", None),   # 13 of 19 latin
    ({"scripts": ["latin"], "min_script_fraction": 0.8}, "Hello world and Привет", "script"),
    ({"scripts": ["cjk"]}, "東京タワーはきれいです。한국어", None),
    ({"scripts": ["arabic"]}, "مرحبا بالعالم", None),
    ({"scripts": ["hebrew"]}, "שלום עולם", None),
    ({"scripts": ["greek"]}, "Καλημέρα κόσμε", None),
    ({"scripts": ["devanagari"]}, "नमस्ते दुनिया", None),
    ({"scripts": ["latin"]}, "नमस्ते दुनिया", "script"),
    ({"scripts": ["latin"]}, "12 + 34 = 46 🙂", None),             # no letters: nothing to judge
    ({"min_stopwords": 2}, "The cat sat on the mat.", None),       # the, on
    ({"min_stopwords": 2}, "THE cat, THE mat.", "stopwords"),      # one distinct stop word
    ({"min_stopwords": 2}, "Buy cheap pills online now", "stopwords"),
    ({"min_stopwords": 0}, "", None),
])
def test_each_rule_passes_and_fails(rule, text, verdict):
    assert quality_reason(text, only(**rule)) == verdict


def test_the_first_failed_rule_is_reported():
    text = "### ...\n### ...\n### ..."
    assert quality_reason(text, FilterConfig()) == "duplicate_lines"
    assert quality_reason(text, FilterConfig(max_duplicate_line_fraction=None)) == "symbol_ratio"
    assert quality_reason(text, FilterConfig(max_duplicate_line_fraction=None, max_symbol_ratio=None)) == "alpha_words"


def test_script_rule_skips_textless_records_only_when_alpha_rule_is_off():
    assert quality_reason("123 456", FilterConfig()) == "alpha_words"
    assert quality_reason("123 456", FilterConfig(min_alpha_word_fraction=None)) is None


@pytest.mark.parametrize("char, script", [
    ("a", "latin"), ("É", "latin"), ("ß", "latin"), ("Ａ", "latin"), ("α", "greek"), ("ж", "cyrillic"),
    ("ب", "arabic"), ("א", "hebrew"), ("न", "devanagari"), ("中", "cjk"), ("あ", "cjk"), ("ア", "cjk"),
    ("ｱ", "cjk"), ("ー", "cjk"), ("한", "cjk"), ("ª", None), ("1", None), ("ก", None),
])
def test_script_of(char, script):
    assert script_of(char) == script

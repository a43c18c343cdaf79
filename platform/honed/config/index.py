"""`honed index`'s config (a retrieval index over a domain corpus) and `retrieval:`, the section that attaches an
index to a served model or to `honed eval`."""

from __future__ import annotations

from string import Formatter

from pydantic import Field, field_validator, model_validator

from honed.config.base import Section
from honed.config.data import FilterConfig, NormalizeConfig, PIIConfig, SourceConfig

DEFAULT_RETRIEVAL_TEMPLATE = "Context:\n{passages}\n\nQuestion: {question}"
RETRIEVAL_SLOTS = ("passages", "question")


class IndexConfig(Section):
    """`honed index`: sources → Ray Data (prepare's readers and cleaning) → chunks → a BM25 index in `output_dir`
    (chunks.jsonl, the bm25s files, index.json). Lexical only: no dense vectors."""

    sources: list[SourceConfig] = []
    """The corpus, as prepare's `data.sources` (same kinds and keys); `honed index` refuses an empty list."""
    normalize: NormalizeConfig = NormalizeConfig()
    filters: FilterConfig = FilterConfig()
    """Prepare's quality rules; a record failing one is not indexed (counted in index.json)."""
    pii: PIIConfig = PIIConfig()
    """PII is redacted before indexing, as in prepare: served passages never carry it."""
    chunk_words: int = Field(default=120, ge=8)
    """Words per chunk (passage); a record with fewer words is one chunk. Words, not model tokens: the index is
    model-independent, and 120 words stay near 160-200 tokens for English."""
    chunk_overlap: int = Field(default=20, ge=0)
    """Words each chunk repeats from the one before, so a fact cut at a boundary is whole in one of them."""
    top_k: int = Field(default=3, gt=0)
    """Passages a search returns by default (a `retrieval.top_k` of serve or eval overrides it)."""
    max_record_bytes: int = Field(default=1_000_000, gt=0)
    """Records larger than this are skipped (`too_large`), as in prepare."""
    seed: int = 0
    """Seeds a bundled source's `max_records` subsample (as prepare's `data.seed`)."""
    output_dir: str = "runs/index"
    """The index directory: local, or a pyarrow filesystem URI (`s3://bucket/index`)."""

    @model_validator(mode="after")
    def _check(self) -> "IndexConfig":
        if self.chunk_overlap >= self.chunk_words:
            raise ValueError(f"chunk_overlap = {self.chunk_overlap} must be below chunk_words = {self.chunk_words} "
                             "(each chunk must bring new words)")
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return self


class RetrievalSettings(Section):
    """Retrieval beside a model: the question is searched in `index`, and the prompt sent to the model is
    `template` filled with the top passages and the question (for chat: the last user message's content)."""

    index: str
    """Index directory written by `honed index` (local or URI)."""
    top_k: int | None = Field(default=None, gt=0)
    """Passages put into the prompt; default: the index's own `top_k`."""
    template: str = DEFAULT_RETRIEVAL_TEMPLATE
    """Where the passages go: must hold `{passages}` (numbered `[1] text`, blank-line separated) and
    `{question}` (the user's text); other text is kept as written."""

    @field_validator("template")
    @classmethod
    def _check_template(cls, template: str) -> str:
        try:
            slots = {name for _, name, _, _ in Formatter().parse(template) if name is not None}
        except ValueError as err:
            raise ValueError(f"template {template!r} is not a format string ({err}); write braces as {{{{ }}}}") \
                from None
        missing, unknown = set(RETRIEVAL_SLOTS) - slots, slots - set(RETRIEVAL_SLOTS)
        if missing or unknown:
            raise ValueError(f"template {template!r} must hold {{passages}} and {{question}} and no other slot "
                             f"(missing: {sorted(missing) or 'none'}, unknown: {sorted(unknown) or 'none'})")
        return template

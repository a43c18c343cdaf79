"""`honed prepare`'s config: sources, cleaning, dedup, decontamination, template and packing (`data:`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from honed.config.base import Section
from honed.config.model import ModelConfig

DEFAULT_SYSTEM_PROMPT: str | None = None
"""No system prompt unless a config gives one: the model's chat template decides (its own default, if any)."""


SOURCE_KINDS = ("icd10", "icd10_pairs", "kjv", "jsonl", "parquet", "csv", "text", "feedback")
FILE_KINDS = ("jsonl", "parquet", "csv", "text")
PATH_KINDS = FILE_KINDS + ("feedback",)
ICD10_KINDS = ("icd10", "icd10_pairs")


class FieldMap(Section):
    """Which input column holds each part of a record (the defaults are the honed names)."""

    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    """A list of `{role, content}` chat turns."""
    group: str = "group"
    """Optional: records sharing a group never straddle train and validation (e.g. one ICD code)."""
    chosen: str = "chosen"
    """Preference records: the preferred answer (with `prompt` or `messages` as the question)."""
    rejected: str = "rejected"
    """Preference records: the dispreferred answer to the same question."""


class SourceConfig(Section):
    name: str = Field(pattern=r"^[a-z0-9_-]+$")
    """Name of the source; per-source validation sets and counts are keyed by it."""
    kind: Literal["icd10", "icd10_pairs", "kjv", "jsonl", "parquet", "csv", "text", "feedback"]
    """`icd10`: instruction pairs built from ICD-10-CM; `icd10_pairs`: preference pairs derived from ICD-10-CM
    (chosen: the code's own description or category, rejected: a sibling code's); `kjv`: King James Bible
    verses (general text);
    `jsonl` / `parquet` / `csv`: records with the fields in `fields`; `text`: plain-text files; `feedback`:
    preference pairs from the judgements in a serve feedback store (`path`: serve's `feedback.store`; the pair
    rule: honed.data.feedback_source)."""
    path: str | None = None
    """For file kinds: a file, directory or glob; local or a pyarrow filesystem URI (`s3://`, `gs://`)."""
    format: Literal["auto", "text", "instruction", "chat", "preference"] = "auto"
    """`text` (continued pre-training), `instruction` (prompt + response), `chat` (messages), `preference`
    (prompt or messages + chosen + rejected, for DPO); `auto` picks per record from the fields present
    (chosen/rejected, then messages, then prompt/response, then text)."""
    fields: FieldMap = FieldMap()
    text_unit: Literal["file", "paragraph", "line"] = "paragraph"
    """For `text` files: what one record is (a blank-line separated paragraph by default)."""
    chapters: list[str] | None = None
    """For `icd10` and `icd10_pairs` only, and required there: chapter numbers (1-22) to draw codes from."""
    max_records: int | None = Field(default=None, gt=0)
    """Bundled sources: keep at most this many records (a seeded, deterministic subsample)."""
    val_fraction: float | None = Field(default=None, ge=0.0, le=1.0)
    """Share of groups held out for validation; defaults to `data.val_fraction`."""
    eval_only: bool = False
    """All records go to validation (a probe such as general text for forgetting)."""
    weight: float | None = Field(default=None, gt=0)
    """Share of the training mix (relative to the other weighted sources); unset = every kept record once."""

    @model_validator(mode="after")
    def _check_kind(self) -> "SourceConfig":
        if self.kind in PATH_KINDS and not self.path:
            raise ValueError(f"source '{self.name}': kind '{self.kind}' needs `path` (a file, directory, glob or URI; "
                             "for feedback the store's dir or URI)")
        if self.kind not in PATH_KINDS and self.path:
            raise ValueError(f"source '{self.name}': kind '{self.kind}' is bundled and takes no `path`; "
                             f"kinds with a path are {', '.join(PATH_KINDS)}")
        if self.kind in ICD10_KINDS and not self.chapters:
            raise ValueError(f"source '{self.name}': kind '{self.kind}' needs `chapters`, ICD-10-CM chapter numbers "
                             "1-22 (the demo uses [\"4\", \"9\", \"10\"])")
        if self.kind not in ICD10_KINDS and self.chapters is not None:
            raise ValueError(f"source '{self.name}': `chapters` is for kinds {' and '.join(ICD10_KINDS)} only, "
                             f"not '{self.kind}'")
        return self


class NormalizeConfig(Section):
    unicode: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normal form; NFKC also folds compatibility forms (ﬁ → fi, full-width → ASCII)."""
    strip_html: bool = False
    """Remove HTML tags, scripts and styles and decode entities (for scraped pages)."""


class FilterConfig(Section):
    """Gopher / C4-style quality rules on a record's text (all its fields joined); `null` switches a rule off.
    A record failing a rule is dropped with the rule's name as reason."""

    enabled: bool = True
    min_chars: int | None = Field(default=2, ge=0)
    max_chars: int | None = Field(default=100_000, gt=0)
    min_tokens: int | None = Field(default=None, ge=0)
    """On the templated example (`data.max_seq_len` is the upper bound)."""
    max_duplicate_line_fraction: float | None = Field(default=0.3, ge=0, le=1)
    """Share of lines that repeat an earlier line of the same record."""
    max_top_ngram_fraction: float | None = Field(default=0.2, ge=0, le=1)
    """Share of characters covered by the most frequent word 2-gram (Gopher uses 0.2/0.18/0.16 for 2/3/4)."""
    max_duplicate_ngram_fraction: float | None = Field(default=0.15, ge=0, le=1)
    """Share of characters in word 5-grams that occur more than once."""
    repetition_min_words: int = Field(default=50, ge=1)
    """The two n-gram rules above apply only to records with at least this many words."""
    max_symbol_ratio: float | None = Field(default=0.1, ge=0)
    """`#` and `...`/`…` per word."""
    min_alpha_word_fraction: float | None = Field(default=0.5, ge=0, le=1)
    """Share of words holding at least one letter."""
    scripts: list[Literal["latin", "greek", "cyrillic", "arabic", "hebrew", "cjk", "devanagari"]] | None = ["latin"]
    """Language/charset heuristic: the allowed writing systems of letters; `null` accepts any."""
    min_script_fraction: float = Field(default=0.8, ge=0, le=1)
    """Share of a record's letters that must be in `scripts`."""
    min_stopwords: int | None = Field(default=None, ge=0)
    """English stop words a record must hold (Gopher uses 2 for web text; off by default)."""


PII_TYPES = ("email", "phone", "ip", "credit_card", "api_key")


class PIIConfig(Section):
    enabled: bool = True
    types: list[Literal["email", "phone", "ip", "credit_card", "api_key"]] = list(PII_TYPES)
    """Each match is replaced by a typed placeholder such as `<EMAIL>`; counts per type go to the manifest."""


class DedupConfig(Section):
    exact: bool = True
    """Drop records whose normalised text (case, whitespace, punctuation folded) was seen earlier."""
    near: bool = True
    """Drop near-duplicates: MinHash over word shingles, LSH banding, clusters across the whole corpus."""
    threshold: float = Field(default=0.85, gt=0, lt=1)
    """Estimated Jaccard similarity above which two records are near-duplicates."""
    num_perm: int = Field(default=128, ge=16, le=1024)
    shingle_words: int = Field(default=5, ge=1)
    bands: int | None = Field(default=None, gt=0)
    """LSH bands; by default chosen with `rows` to balance false positives and negatives at `threshold`."""
    rows: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check_bands(self) -> "DedupConfig":
        if (self.bands is None) != (self.rows is None):
            raise ValueError("dedup: give both `bands` and `rows` or neither")
        if self.bands and self.bands * self.rows > self.num_perm:
            raise ValueError(f"dedup: bands × rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self


class DecontamConfig(Section):
    """Training records sharing a word n-gram with an eval set are dropped (reason `contaminated`)."""

    paths: list[str] = []
    """Eval sets (JSONL files with `text`, `prompt`/`response` or `messages`)."""
    sources: list[str] = []
    """Names of configured `eval_only` sources to treat as eval sets too."""
    ngram: int = Field(default=13, ge=3)
    """Words per n-gram (13, as in GPT-3's decontamination)."""


class TemplateConfig(Section):
    name: Literal["tokenizer", "chatml", "llama3", "alpaca", "plain"] = "tokenizer"
    """`tokenizer`: the model's own chat template; the others are named templates shipped with honed.
    The template used is stored in the manifest and applied again in training, eval and serving."""


class PackConfig(Section):
    enabled: bool = False
    """Pack training examples into rows of `seq_len` tokens; position ids restart per example, so attention
    never crosses example boundaries. Validation rows stay unpacked (per-source scores)."""
    seq_len: int | None = Field(default=None, ge=8)
    """Packed row length; defaults to `data.max_seq_len`."""


class ChunkConfig(Section):
    """Text (continued pre-training) documents longer than `data.max_seq_len` tokens are cut into windows of
    `max_seq_len` tokens instead of being dropped. Instruction, chat and preference examples are never cut: one
    that is too long is dropped (`too_long`). Dedup and decontamination see the whole document, and its windows
    share its group, so they land in one split; the manifest's `chunk` entry counts documents and windows."""

    enabled: bool = True
    overlap: int = Field(default=0, ge=0)
    """Tokens each window repeats from the one before, as context: they carry no loss there, so every token of
    the document is trained on once. The last window ends at the document's end (it may repeat more)."""


AUGMENT_FIELDS = ("question", "answer")


class AugmentConfig(Section):
    """Paraphrase augmentation of instruction records (`honed.data.augment`): a model rewrites each kept
    training record's question (and optionally its answer) `variants` times in Ray Data batch inference; the
    variants go through the same cleaning, filters, decontamination and corpus dedup as read records, a variant
    equal or near (dedup's Jaccard threshold) to its own source is dropped, and each keeps its source's group, so
    it lands in training with it. Validation records are never paraphrased: validation holds originals only."""

    enabled: bool = False
    model: str | None = None
    """The paraphrasing model (builtin name or HF directory); default: the prepare model (`model.name_or_path`)."""
    adapter: str | None = None
    """Optional PEFT adapter on that model: a directory, or with `registry` a ref (`name`, `name@N`)."""
    registry: str | None = None
    """Adapter registry (dir or URI) that `adapter` names a version of."""
    sources: list[str] | None = None
    """Names of the sources to augment; default: every source that is not `eval_only`."""
    variants: int = Field(default=2, ge=1, le=32)
    """Paraphrases generated per record (each with its own seed); duplicates among them are dropped by dedup."""
    fields: list[Literal["question", "answer"]] = ["question"]
    """What is rewritten: the question only (the answer is kept word for word), or question and answer."""
    question_prompt: str = ("Rewrite this question in other words. Keep its meaning and every code, name and "
                            "number. Reply with the rewritten question only.\n\n{text}")
    """The user message asking for a paraphrase of a question; `{text}` is replaced by the question."""
    answer_prompt: str = ("Rewrite this answer in other words. Keep its meaning and every code, name and number. "
                          "Reply with the rewritten answer only.\n\n{text}")
    """The same for an answer (with `fields: [question, answer]`)."""
    temperature: float = Field(default=0.8, ge=0.0)
    """Sampling temperature; 0 (greedy) gives one paraphrase only, so it needs `variants: 1`."""
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=64, ge=1)
    """Longest paraphrase in tokens; only its first non-empty line is kept."""
    require_numbers: bool = True
    """Drop a paraphrase missing a word with a digit (a code, number, date) of its source (`lost_numbers`)."""
    require_question: bool = True
    """Drop a paraphrase of a question that is not a question (`not_a_question`): small models answer instead."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences decoded together by one actor (records × variants × fields are cut into such batches)."""
    concurrency: int = Field(default=1, ge=1)
    """Generation actors (each loads the model once); scale it with the cluster's CPUs or GPUs."""
    num_gpus: float = Field(default=0, ge=0)
    """GPUs per actor (0: CPU, fp32); on a GPU cluster 1 (or a fraction to share one GPU between actors)."""

    @model_validator(mode="after")
    def _check(self) -> "AugmentConfig":
        if "question" not in self.fields:
            raise ValueError(f"augment.fields = {self.fields}: must include 'question' (allowed: question, answer)")
        if self.temperature == 0 and self.variants > 1:
            raise ValueError(f"augment.temperature = 0 (greedy) gives the same paraphrase every time; use "
                             f"variants: 1 or a temperature > 0 (variants = {self.variants})")
        for key in ("question_prompt", "answer_prompt"):
            if "{text}" not in getattr(self, key):
                raise ValueError(f"augment.{key} must contain '{{text}}' (where the text to rewrite goes)")
        if self.registry and not self.adapter:
            raise ValueError("augment.registry needs augment.adapter set to a ref in it (name, name@N or name@latest)")
        return self


class DataConfig(Section):
    sources: list[SourceConfig] = Field(min_length=1)
    """Inputs, each with a name and a kind; honed ships no default corpus (`honed demo` brings its own)."""
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    """System message put before every instruction, chat and preference example unless the record has its own,
    stored in the manifest and used again in eval and serving; null: none (the chat template's own default)."""
    max_seq_len: int = Field(default=256, ge=8)
    """Longest example in tokens: longer text documents are cut into windows (`chunk`), longer instruction and
    chat examples are dropped (`too_long`, counted in the manifest)."""
    val_fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    """Share of groups (e.g. ICD codes) held out; a group's records never straddle train and validation."""
    seed: int = 0
    """Seeds sub-sampling, the split, mixing and the shuffle of the training shards."""
    loss_on: Literal["response", "all"] = "response"
    """Train on response (assistant) tokens only, for instruction and chat data, or on every token."""
    normalize: NormalizeConfig = NormalizeConfig()
    filters: FilterConfig = FilterConfig()
    pii: PIIConfig = PIIConfig()
    dedup: DedupConfig = DedupConfig()
    decontaminate: DecontamConfig = DecontamConfig()
    template: TemplateConfig = TemplateConfig()
    pack: PackConfig = PackConfig()
    chunk: ChunkConfig = ChunkConfig()
    augment: AugmentConfig = AugmentConfig()
    """Paraphrase augmentation of the kept training instruction records (off by default)."""
    max_record_bytes: int = Field(default=1_000_000, gt=0)
    """Records larger than this are quarantined (`too_large`) before parsing."""
    num_workers: int | None = Field(default=None, gt=0)
    """Ray Data actors that clean and tokenize; default: the cluster's CPUs."""

    @model_validator(mode="after")
    def _check_sources(self) -> "DataConfig":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        for name in self.decontaminate.sources:
            match = [s for s in self.sources if s.name == name]
            if not match or not match[0].eval_only:
                allowed = ", ".join(s.name for s in self.sources if s.eval_only) or "none"
                raise ValueError(f"decontaminate.sources: '{name}' is not an eval_only source; those are: {allowed}")
        if self.chunk.overlap >= self.max_seq_len:
            raise ValueError(f"chunk.overlap = {self.chunk.overlap} must be below max_seq_len = {self.max_seq_len} "
                             "(each window must bring new tokens)")
        if self.pack.seq_len and self.pack.seq_len < self.max_seq_len:
            raise ValueError(f"pack.seq_len = {self.pack.seq_len} is below max_seq_len = {self.max_seq_len}; "
                             "an example must fit in one packed row")
        if self.augment.enabled:
            self._check_augment()
        return self

    def _check_augment(self) -> None:
        """Augmented sources exist and can hold instruction records; variant ids need fewer than 128 sources."""
        eligible = [s.name for s in self.sources if not s.eval_only and s.kind not in ("kjv", "icd10_pairs", "text", "feedback")
                    and s.format in ("auto", "instruction")]
        for name in self.augment.sources or []:
            if name not in eligible:
                raise ValueError(f"augment.sources: '{name}' is not a source that can hold instruction records; "
                                 f"those are: {', '.join(eligible) or 'none'}")
        if not eligible:
            raise ValueError("augment.enabled: no source can hold instruction records (augmented: sources not "
                             "eval_only, of kind icd10, jsonl, parquet or csv, format auto or instruction)")
        if len(self.sources) >= 128:
            raise ValueError(f"augment.enabled takes at most 127 sources, got {len(self.sources)} (paraphrase "
                             "ids sort after every read record's)")


class PrepareConfig(Section):
    """`honed prepare`: sources → Ray Data → `output_dir/{shards,quarantine}`, `manifest.json`."""

    model: ModelConfig = ModelConfig()
    data: DataConfig
    """Needs `data.sources`; every other key has a default."""
    output_dir: str = "runs/data"


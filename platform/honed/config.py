"""Typed job configs: YAML gives values, `a.b=c` overrides win, validation happens before any Ray work.

    cfg = load_config(TrainConfig, "jobs/train_lora.yaml", ["optim.lr=3e-4"])

Every field is documented where it is defined. A bad key, type or value raises `ConfigError` naming the
key, the value and what is allowed.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_SYSTEM_PROMPT = "You are a medical coding assistant. Answer with ICD-10-CM facts only."


class ConfigError(ValueError):
    """A config could not be loaded; the message names each bad key, its value and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


# ----------------------------------------------------------------------------------------------- model
class ModelConfig(Section):
    name_or_path: str = DEFAULT_MODEL
    """`smollm2-135m-instruct` (the embedded default) or a local Hugging Face model directory."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype; `auto` is float32 on CPU and bfloat16 on GPU."""


# ------------------------------------------------------------------------------------------------ data
SOURCE_KINDS = ("icd10", "icd10_pairs", "kjv", "jsonl", "parquet", "csv", "text")
FILE_KINDS = ("jsonl", "parquet", "csv", "text")


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
    kind: Literal["icd10", "icd10_pairs", "kjv", "jsonl", "parquet", "csv", "text"]
    """`icd10`: instruction pairs built from ICD-10-CM; `icd10_pairs`: preference pairs derived from ICD-10-CM
    (chosen: the code's own description or category, rejected: a sibling code's); `kjv`: King James Bible
    verses (general text);
    `jsonl` / `parquet` / `csv`: records with the fields in `fields`; `text`: plain-text files."""
    path: str | None = None
    """For file kinds: a file, directory or glob; local or a pyarrow filesystem URI (`s3://`, `gs://`)."""
    format: Literal["auto", "text", "instruction", "chat", "preference"] = "auto"
    """`text` (continued pre-training), `instruction` (prompt + response), `chat` (messages), `preference`
    (prompt or messages + chosen + rejected, for DPO); `auto` picks per record from the fields present
    (chosen/rejected, then messages, then prompt/response, then text)."""
    fields: FieldMap = FieldMap()
    text_unit: Literal["file", "paragraph", "line"] = "paragraph"
    """For `text` files: what one record is (a blank-line separated paragraph by default)."""
    chapters: list[str] = ["4", "9", "10"]
    """For `icd10` and `icd10_pairs`: chapter numbers (1-22) to draw codes from."""
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
        if self.kind in FILE_KINDS and not self.path:
            raise ValueError(f"source '{self.name}': kind '{self.kind}' needs `path` (a file, directory, glob or URI)")
        if self.kind not in FILE_KINDS and self.path:
            raise ValueError(f"source '{self.name}': kind '{self.kind}' is bundled and takes no `path`; "
                             f"file kinds are {', '.join(FILE_KINDS)}")
        return self


def _default_sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="icd10", kind="icd10"),
        SourceConfig(name="kjv", kind="kjv", max_records=200, eval_only=True),
    ]


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


class DataConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=_default_sources, min_length=1)
    """Inputs, each with a name and a kind."""
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    """System message put before every instruction example (and used again at serve time)."""
    max_seq_len: int = Field(default=256, ge=8)
    """Examples with more tokens are dropped (counted in the manifest)."""
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
        if self.pack.seq_len and self.pack.seq_len < self.max_seq_len:
            raise ValueError(f"pack.seq_len = {self.pack.seq_len} is below max_seq_len = {self.max_seq_len}; "
                             "an example must fit in one packed row")
        return self


class PrepareConfig(Section):
    """`honed prepare`: sources → Ray Data → `output_dir/{shards,quarantine}`, `manifest.json`."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    output_dir: str = "runs/data"


# ---------------------------------------------------------------------------------------------- method
METHODS = ("full", "lora", "qlora", "prefix", "ia3", "dpo")
# The settings sections each method reads; setting another one is a mistake worth naming.
METHOD_SECTIONS = {"full": {"deepspeed"}, "lora": {"lora", "deepspeed"}, "qlora": {"lora", "quant"},
                   "prefix": {"prefix"}, "ia3": {"ia3"}, "dpo": {"lora", "dpo"}}
METHOD_SECTION_NAMES = {"lora", "quant", "prefix", "ia3", "deepspeed", "dpo"}


class LoraSettings(Section):
    """Handed to `peft.LoraConfig` (methods `lora`, `qlora` and `dpo` without an SFT adapter)."""

    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (Liu et al. 2024): a learned magnitude per output feature."""
    lr: float | None = Field(default=None, gt=0)
    """Learning rate of the adapter matrices; default `optim.lr` (which then applies to any other trainable
    weights, e.g. DoRA magnitudes)."""


class QuantSettings(Section):
    """4-bit base weights through bitsandbytes (method `qlora`), handed to `BitsAndBytesConfig`."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    """Quantize the quantization constants too (~0.4 bit/parameter saved)."""
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the 4-bit weights are dequantized to for each matmul; `auto` follows `model.dtype`."""


class PrefixSettings(Section):
    """Handed to `peft.PrefixTuningConfig` (method `prefix`)."""

    num_virtual_tokens: int = Field(default=16, gt=0)
    prefix_projection: bool = False
    """Reparametrise the prefix through an MLP during training (Li & Liang 2021)."""


class IA3Settings(Section):
    """Handed to `peft.IA3Config` (method `ia3`); null = peft's defaults for the architecture."""

    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None


class DPOSettings(Section):
    """Direct Preference Optimization (Rafailov et al. 2023) on preference pairs, with a LoRA adapter as the
    trained policy. The reference model is the starting point: the base with the adapter switched off (no second
    copy of the weights), or, when starting from an SFT adapter, the base with a frozen copy of that adapter
    (a few MB) while its trainable copy learns."""

    adapter: str | None = None
    """SFT adapter dir (`honed train` output_dir/adapter, LoRA) to start from and to use as the reference;
    null: a fresh LoRA adapter (`lora` settings) on the base, which is then the reference."""
    beta: float = Field(default=0.1, gt=0)
    """Strength of the pull towards the reference (the KL weight; IPO's tau)."""
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """`sigmoid`: DPO's -log σ(β·Δ); `ipo`: (Δ − 1/(2β))² on per-token mean log-ratios (Azar et al. 2023);
    `hinge`: max(0, 1 − β·Δ) (SLiC). Δ = chosen log-ratio − rejected log-ratio against the reference."""
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    """sigmoid only: the share of pairs assumed mislabelled (conservative DPO, cDPO)."""

    @model_validator(mode="after")
    def _check_loss(self) -> "DPOSettings":
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss sigmoid only (loss is '{self.loss}')")
        return self


class DeepSpeedSettings(Section):
    """DeepSpeed ZeRO for `full` (and `lora` on large bases). The DeepSpeed config is generated from these
    keys and the optim section; `config` is merged over it for anything else DeepSpeed offers."""

    zero_stage: Literal[0, 1, 2, 3] | None = None
    """null = no DeepSpeed (plain DDP); 0 = DeepSpeed without ZeRO partitioning."""
    offload_optimizer: bool = False
    """Optimizer states (and the Adam step) on CPU: ZeRO-Offload, stages 1-3."""
    offload_params: bool = False
    """Parameters on CPU between uses: ZeRO-Infinity style, stage 3 only."""
    config: dict[str, Any] = {}
    """Raw DeepSpeed config keys merged (recursively) over the generated config, e.g.
    `{zero_optimization: {reduce_bucket_size: 5e7}}`. Batch-size keys come from `optim` and may not be set."""

    @model_validator(mode="after")
    def _check_stage(self) -> "DeepSpeedSettings":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got {self.zero_stage})")
        if self.offload_optimizer and not self.zero_stage:
            raise ValueError(f"offload_optimizer needs zero_stage 1, 2 or 3 (got {self.zero_stage})")
        fixed = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
        if fixed & set(self.config):
            raise ValueError(f"config may not set {sorted(fixed & set(self.config))}: they come from "
                             "optim.batch_size, optim.grad_accum_steps and scaling.num_workers")
        if self.config and self.zero_stage is None:
            raise ValueError("config is given but zero_stage is null (DeepSpeed off); set zero_stage")
        return self

    @property
    def enabled(self) -> bool:
        return self.zero_stage is not None


class MethodConfig(Section):
    name: Literal["full", "lora", "qlora", "prefix", "ia3", "dpo"] = "lora"
    """full: every weight (DDP or DeepSpeed ZeRO); lora: low-rank adapters; qlora: LoRA over a 4-bit base;
    prefix: trained virtual key/value tokens; ia3: learned activation scalings; dpo: preference tuning of a
    LoRA adapter (from scratch or from an SFT adapter) on preference pairs."""
    lora: LoraSettings = LoraSettings()
    quant: QuantSettings = QuantSettings()
    prefix: PrefixSettings = PrefixSettings()
    ia3: IA3Settings = IA3Settings()
    deepspeed: DeepSpeedSettings = DeepSpeedSettings()
    dpo: DPOSettings = DPOSettings()
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30 % more compute."""

    @model_validator(mode="after")
    def _check_sections(self) -> "MethodConfig":
        used = METHOD_SECTIONS[self.name]
        stray = sorted((self.model_fields_set & METHOD_SECTION_NAMES) - used)
        for section in stray:
            users = [m for m, s in METHOD_SECTIONS.items() if section in s]
            raise ValueError(f"'{section}' settings apply to method {' / '.join(users)}, not '{self.name}'; "
                             f"remove them or change method.name")
        if self.name == "prefix" and self.activation_checkpointing:
            raise ValueError("prefix tuning cannot use activation_checkpointing (peft refuses the combination)")
        if self.name == "dpo" and self.dpo.adapter and "lora" in self.model_fields_set:
            raise ValueError("dpo: the LoRA settings come from the SFT adapter in dpo.adapter; remove `lora` "
                             "(or drop dpo.adapter to start a fresh adapter)")
        return self

    @model_serializer(mode="wrap")
    def _only_used_sections(self, handler, info):
        """The YAML/JSON form (`--print-config`, the train.yaml a run writes) names only the sections the
        method uses, so it loads back; the Python form keeps every section for the code that reads them."""
        data = handler(self)
        if info.mode_is_json():
            for section in METHOD_SECTION_NAMES - METHOD_SECTIONS[self.name]:
                data.pop(section, None)
        return data

    @property
    def peft(self) -> bool:
        return self.name != "full"


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


class OptimConfig(Section):
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = "adamw"
    """torch AdamW, or bitsandbytes 8-bit / paged AdamW (paged falls back to non-paged on CPU)."""
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after `warmup_steps` of linear warm-up."""
    warmup_steps: int = Field(default=10, ge=0)
    epochs: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    """Stop after this many optimizer steps (overrides `epochs` when smaller)."""
    batch_size: int = Field(default=8, gt=0)
    """Examples (or packed rows) per worker per micro-step."""
    grad_accum_steps: int = Field(default=1, gt=0)
    """Micro-steps per optimizer step: global batch = batch_size x grad_accum_steps x num_workers."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    group_by_length: int = Field(default=1, ge=1)
    """Windows of this many global micro-batches have their rows sorted by length before the batches are cut
    (the window's batches then run in a seeded random order): less padding for unpacked data, more tokens/s.
    Off (1) by default: where length tracks the kind of example, grouped batches are also batches of one kind
    (on the demo corpus, 8 cut padding from 9.3 % to 1.8 % but the tuned model's exact match fell from ~0.3 to
    0.21). Packed rows (all one length) are left as they are."""
    padding_free: bool | None = None
    """Run each micro-batch as one row: its examples (or the examples inside packed rows) back to back, position
    ids restarting, attention kept inside each example (`honed.train.attention`). The same losses and gradients
    as padded batches without the compute spent on padding (and, for packed rows, without attention across the
    whole row): 1.09-1.11x the non-pad tokens/s of padded batches on the demo corpus (9 % padding). `null`
    (default): on for every method but prefix (virtual tokens belong to each row) and dpo (a pair's two answers
    are scored side by side), and off under `compile`; `true` with those is an error, `false` keeps padded rows."""
    compile: bool = False
    """`torch.compile` the decoder stack (inductor, dynamic shapes) before training; the vocabulary projection
    and loss stay eager. Fuses the norms, activations and rotary embeddings that a small model spends a fifth of
    its step on. Costs minutes of compilation at the first steps of every worker (inductor's cache shortens
    later runs), so it pays on long runs only; off by default. Methods full and lora on the PyTorch backend
    (no DeepSpeed), with padded batches (padding_free then defaults to off) and without activation checkpointing
    (either would break the compiled graph)."""


class ScalingSettings(Section):
    """Handed to `ray.train.ScalingConfig` and `FailureConfig`."""

    num_workers: int = Field(default=2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=0.5, gt=0)
    """Fractional on small machines so Ray Data keeps CPU budget to stream the shards."""
    torch_threads: int = Field(default=1, gt=0)
    """Intra-op threads per worker; more than cores/workers thrashes."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How workers are placed on nodes; STRICT_SPREAD puts each worker on its own node."""
    max_failures: int = Field(default=0, ge=-1)
    """Worker-group failures survived by restarting from the latest checkpoint (-1: unlimited)."""


class EarlyStopping(Section):
    metric: str = "val_loss"
    """A validation metric (lower is better): `val_loss` (domain sources) or `val_loss/<source>`."""
    patience: int = Field(default=3, gt=0)
    """Validations without an improvement of at least `min_delta` before training stops."""
    min_delta: float = Field(default=0.0, ge=0)


# Adapter registry names (`honed registry`, `register.name`): they become one directory level of the registry.
ADAPTER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def check_adapter_name(name: str) -> str:
    """The name if it is a valid adapter name (`ADAPTER_NAME`, without `..`), else ValueError saying what is allowed."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"adapter name {name!r} is not allowed: use 1-64 characters of a-z 0-9 . _ -, starting "
                         "with a letter or digit, without '..'")
    return name


class RegisterConfig(Section):
    """Register the exported adapter in an adapter registry (`honed registry`) once training succeeded."""

    registry: str = "runs/registry"
    """Registry directory: a local path or a cloud URI (s3://bucket/registry, gs://...)."""
    name: str
    """Adapter name; the run becomes version `name@N`, one after the last registered version."""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return check_adapter_name(value)


def is_val_metric(name: str) -> bool:
    return name == "val_loss" or (name.startswith("val_loss/") and len(name) > len("val_loss/"))


# `register` shadows only ABCMeta.register, a class-level method nobody calls on a config; instances read the field.
warnings.filterwarnings("ignore", message='Field name "register" in "TrainConfig" shadows', category=UserWarning)


class TrainConfig(Section):
    """`honed train`: a prepared dataset dir → Ray Train → `output_dir/{adapter|model, metrics.jsonl,
    efficiency.json}`."""

    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingSettings = ScalingSettings()
    data_dir: str = "runs/data"
    output_dir: str = "runs/train"
    storage_path: str | None = None
    """Ray Train storage (local path or cloud URI); defaults to `output_dir/checkpoints`."""
    name: str = Field(default="honed-train", pattern=r"^[A-Za-z0-9._-]+$")
    """Run name under `storage_path`: rerunning the same name continues from its latest checkpoint."""
    seed: int = 0
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=50, gt=0)
    keep_checkpoints: int = Field(default=2, gt=0)
    checkpoint_metric: str | None = None
    """Keep the best `keep_checkpoints` by this validation metric (lower is better, e.g. `val_loss`) instead of
    the most recent; turns on validation at every checkpoint."""
    val_max_examples: int = Field(default=256, gt=0)
    """Validation rows per source used during training (`honed eval` scores its own sample)."""
    validate_at_checkpoints: bool = False
    """Compute per-source validation loss at every checkpoint (always done at the end)."""
    early_stopping: EarlyStopping | None = None
    """Stop when the validation metric stops improving (validates at every checkpoint)."""
    peak_flops: float | None = Field(default=None, gt=0)
    """Peak FLOP/s of one worker's device for MFU; default: measured (fp32/bf16 matmul) at the start."""
    register: RegisterConfig | None = None
    """Register the exported adapter (PEFT methods only) in an adapter registry, e.g. {name: icd10-lora}."""

    @model_validator(mode="after")
    def _check_method(self) -> "TrainConfig":
        m = self.method
        if self.model.dtype == "float16" and not self.scaling.use_gpu:
            raise ValueError("model.dtype float16 needs scaling.use_gpu: true (CPUs have no fast fp16 path)")
        if m.deepspeed.enabled and self.optim.optimizer != "adamw":
            raise ValueError(f"optim.optimizer '{self.optim.optimizer}' cannot be combined with DeepSpeed, which "
                             "builds its own AdamW (CPU Adam when offloading); use adamw")
        if self.checkpoint_metric and not is_val_metric(self.checkpoint_metric):
            raise ValueError(f"checkpoint_metric '{self.checkpoint_metric}' is not a validation metric; "
                             "use val_loss or val_loss/<source>")
        if self.early_stopping and not is_val_metric(self.early_stopping.metric):
            raise ValueError(f"early_stopping.metric '{self.early_stopping.metric}' is not a validation metric; "
                             "use val_loss or val_loss/<source>")
        if self.optim.padding_free is None:  # auto: wherever the method trains on rows it may flatten
            self.optim.padding_free = m.name not in ("prefix", "dpo") and not self.optim.compile
        if m.name in ("prefix", "dpo") and self.optim.padding_free:
            raise ValueError(f"optim.padding_free cannot be used with method {m.name}, which trains on padded rows "
                             "(prefix: virtual tokens per row; dpo: the two answers of a pair side by side); remove it")
        if self.optim.compile:
            blockers = [why for bad, why in [
                (m.name not in ("full", "lora"), f"method {m.name} (compiled: full, lora)"),
                (m.deepspeed.enabled, "DeepSpeed (its ZeRO hooks gather and partition parameters around the "
                                      "forward); set method.deepspeed.zero_stage: null"),
                (self.optim.padding_free, "optim.padding_free: true (one attention call per example breaks the "
                                          "graph in every layer; leave it unset or false)"),
                (m.activation_checkpointing, "method.activation_checkpointing")] if bad]
            if blockers:
                raise ValueError(f"optim.compile cannot be combined with {'; '.join(blockers)}")
        if self.register and not m.peft:
            raise ValueError("register: method full exports a whole model, which is served as a merged model, not "
                             "registered as an adapter; remove `register` or use lora / qlora / prefix / ia3 / dpo")
        return self


# ------------------------------------------------------------------------------------------------ eval
class GateSettings(Section):
    """Forgetting gate: base vs tuned checks; when one fails `honed eval` exits 3 and a registry version under
    test is marked not promotable. `null` switches a check off."""

    enabled: bool = False
    """Also `honed eval --gate`."""
    max_general_ppl_increase: float | None = Field(default=0.10, ge=0, allow_inf_nan=False)
    """Relative perplexity rise allowed on each eval-only (general-text) source: 0.10 = tuned ≤ 1.10 × base."""
    domain_metric: Literal["token_f1", "exact_match", "rouge_l", "loss"] = "token_f1"
    """`token_f1`, `exact_match`, `rouge_l` on the generated answers (must rise), or `loss` on each domain source
    (must fall)."""
    min_domain_gain: float | None = Field(default=0.0, allow_inf_nan=False)
    """How much `domain_metric` must improve, absolute: tuned − base ≥ it (for `loss`: base − tuned ≥ it)."""

    @model_validator(mode="after")
    def _check_any(self) -> "GateSettings":
        if self.enabled and self.max_general_ppl_increase is None and self.min_domain_gain is None:
            raise ValueError("the gate has no check: set max_general_ppl_increase and/or min_domain_gain")
        return self


class BiasSettings(Section):
    """Bias probe (`honed.eval.bias`): sentence pairs differing only in a demographic term, scored by both models."""

    enabled: bool = True
    path: str | None = None
    """A probe set of your own (JSONL: category, template with `{term}`, terms: [a, b]); default the shipped one."""
    max_shift: float = Field(default=0.2, gt=0, allow_inf_nan=False)
    """Flag a category when tuning moved its pairs' gaps by more than this on average (nats per token). The demo's
    LoRA on SmolLM2-135M moved them by 0.06-0.12 against base gaps of 0.17-0.45: 0.2 flags well beyond that."""


class EvalConfig(Section):
    """`honed eval`: base vs tuned (adapter, registry version or merged model) on the prepared validation sets
    → `output_dir/{eval.json, eval.md, plots/}`."""

    model: ModelConfig = ModelConfig()
    adapter: str | None = None
    """Adapter dir to compare against the base, or with `registry` a ref (`name`, `name@N`); without a tuned
    model only the base is measured."""
    registry: str | None = None
    """Adapter registry (dir or URI) that `adapter` names a version of; a gate result sets its `promotable`."""
    merged: str | None = None
    """A merged (or fully fine-tuned) model dir to compare against the base, instead of an adapter."""
    data_dir: str = "runs/data"
    output_dir: str = "runs/eval"
    max_examples: int = Field(default=200, gt=0)
    """Per validation source, for loss/perplexity."""
    generate_examples: int = Field(default=48, ge=0)
    """Domain examples answered by greedy generation for exact match, token F1 and ROUGE-L."""
    max_new_tokens: int = Field(default=32, gt=0)
    batch_size: int = Field(default=16, gt=0)
    gate: GateSettings = GateSettings()
    bias: BiasSettings = BiasSettings()
    decontamination: bool = True
    """Report word n-gram overlap of the eval sets with the training shards (streams them once)."""

    @model_validator(mode="after")
    def _check_tuned(self) -> "EvalConfig":
        if self.adapter and self.merged:
            raise ValueError("set `adapter` or `merged`, not both: one tuned model is compared with the base")
        if self.registry and not self.adapter:
            raise ValueError("`registry` needs `adapter` set to a ref in it (name, name@N or name@latest)")
        if self.registry:
            from honed.registry import parse_ref  # late: the registry module imports this one

            parse_ref(self.adapter)
        if self.gate.enabled and not (self.adapter or self.merged):
            raise ValueError("the gate (--gate, gate.enabled) compares a tuned model with the base: set `adapter` "
                             "(a dir, or a ref with `registry`) or `merged`")
        if self.gate.enabled and self.gate.min_domain_gain is not None and self.gate.domain_metric != "loss" \
                and not self.generate_examples:
            raise ValueError(f"gate.domain_metric {self.gate.domain_metric} is measured on generated answers: "
                             "set generate_examples > 0, or use domain_metric loss")
        return self


# ----------------------------------------------------------------------------------------------- merge
class MergeConfig(Section):
    """`honed merge`: base + adapter → one HF model dir, verified against the adapter's logits."""

    model: ModelConfig = ModelConfig()
    adapter: str = "runs/train/adapter"
    output_dir: str = "runs/merged"
    tolerance: float = Field(default=1e-3, gt=0)
    """Max |merged logits − adapter logits| allowed. Merging in fp32 reorders the arithmetic (x·(W+BA) vs
    x·W + (x·A)·B): on SmolLM2-135M, with logits of magnitude ~20, that is ~1e-4, so 1e-3 flags real bugs
    (a wrong scaling or a missed module moves logits by >0.1) without flagging rounding."""


# ----------------------------------------------------------------------------------------------- serve
class AutoscalingSettings(Section):
    """Ray Serve autoscaling of the model replicas (each replica holds the base and its hot adapters)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, gt=0)
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    """Requests in flight per replica the autoscaler aims for; about `max_batch_size` keeps batches full."""
    upscale_delay_s: float = Field(default=10.0, ge=0)
    downscale_delay_s: float = Field(default=120.0, ge=0)

    @model_validator(mode="after")
    def _check_bounds(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class ServeConfig(Section):
    """Arguments of the Serve app `honed.serve.app:build_app` (`honed serve` and `serve run`)."""

    model: ModelConfig = ModelConfig()
    base_name: str = Field(default="base", pattern=r"^[a-z0-9._-]+$")
    """`model` value that selects the base model without adapter."""
    adapters: dict[str, str] = {}
    """Adapter name → adapter dir, selected by the request's `model` field."""
    registry: str | None = None
    """Adapter registry (local dir or cloud URI, see `honed registry`): each adapter in it is served as `name`
    (its latest version) and `name@N`, loaded on first use; adapters registered later appear without a redeploy."""
    merged: dict[str, str] = {}
    """Name → merged model dir (`honed merge`, or a full fine-tune's model/): each its own deployment."""
    max_adapters_per_replica: int = Field(default=8, gt=0)
    """Adapters kept loaded per replica (LRU); requests are routed to replicas that hold their adapter."""
    max_batch_size: int = Field(default=8, gt=0)
    """Concurrent requests decoded together in one batch, whatever adapter each asks for (1: one at a time)."""
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    """How long an idle replica waits for more requests before it starts a batch (later ones join it)."""
    max_ongoing_requests: int | None = Field(default=None, gt=0)
    """Requests a model replica accepts at once (decoding + queued inside it); beyond, Serve queues them at
    the router and retries. Default 2 × max_batch_size: a full batch decoding and the next one waiting."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_tokens: int = Field(default=256, gt=0)
    """Upper bound for a request's `max_tokens`; larger requests are refused with 400."""
    num_replicas: int = Field(default=1, gt=0)
    """Model replicas per served model when `autoscaling` is not set."""
    autoscaling: AutoscalingSettings | None = None
    num_cpus: float = Field(default=1.0, gt=0)
    """CPUs per model replica."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs per model replica (a replica decodes on CUDA when it has one)."""
    torch_threads: int = Field(default=1, gt=0)
    api_keys_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of an environment variable holding comma-separated API keys (read where the app is built);
    when set, every request needs `Authorization: Bearer <key>` or gets 401. Keys never enter the config."""

    @model_validator(mode="after")
    def _check_names(self) -> "ServeConfig":
        seen = {self.base_name: "base_name"}
        for kind, names in (("adapters", self.adapters), ("merged", self.merged)):
            for name in names:
                try:
                    check_adapter_name(name)  # the registry's names: one rule for every `model` a request names
                except ValueError as err:
                    raise ValueError(f"{kind}: {err}") from None
                if name in seen:
                    raise ValueError(f"{kind} name '{name}' collides with {seen[name]}")
                seen[name] = kind
        return self


# ------------------------------------------------------------------------------------------------ demo
class DemoDPOOptim(OptimConfig):
    """The demo's DPO optimizer: a subclass, not a default instance, so overriding one key keeps the others."""

    lr: float = Field(default=1e-4, gt=0)
    """At 5e-4 the 40 steps drifted further (held-out preference accuracy 0.71 vs 0.73, KJV loss up 0.015)."""
    warmup_steps: int = Field(default=4, ge=0)
    max_steps: int | None = Field(default=40, gt=0)
    batch_size: int = Field(default=4, gt=0)
    """Pairs per worker per micro-step (each pair runs two sequences)."""


class DemoOptim(OptimConfig):
    max_steps: int | None = Field(default=80, gt=0)


class DemoData(DataConfig):
    decontaminate: DecontamConfig = DecontamConfig(sources=["kjv"])


class DemoDPOSettings(Section):
    """`honed demo --with-dpo`: after SFT, DPO from the SFT adapter on preference pairs derived from the same
    ICD-10-CM chapters (source `icd10_pairs`, split by code exactly as the SFT data), then preference accuracy
    on held-out pairs for the base, SFT and DPO models; the DPO adapter is registered and served as `icd10-dpo`."""

    enabled: bool = False
    dpo: DPOSettings = DPOSettings()
    optim: DemoDPOOptim = DemoDPOOptim()
    max_pairs: int | None = Field(default=2000, gt=0)
    """Pairs drawn from the chapters (seeded subsample); null: all of them."""
    eval_pairs: int = Field(default=120, gt=0)
    """Held-out pairs scored before and after."""


class DemoConfig(Section):
    """`honed demo`: prepare → train → eval → merge → serve in one run dir (+ DPO with `dpo.enabled`)."""

    run_dir: str = "runs/demo"
    model: ModelConfig = ModelConfig()
    data: DemoData = DemoData()
    method: MethodConfig = MethodConfig()
    optim: DemoOptim = DemoOptim()
    scaling: ScalingSettings = ScalingSettings()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig(port=8000)
    question: str = "Which ICD-10-CM chapter contains code E11.9?"
    """Sent through the endpoint to the adapter at the end."""
    dpo: DemoDPOSettings = DemoDPOSettings()


# ------------------------------------------------------------------------------------------------ tune
SEARCH_DOMAINS = ("loguniform", "uniform", "randint", "choice", "grid")
PER_TRIAL_KEYS = ("output_dir", "storage_path", "name", "register")
"""Train keys `honed tune` sets for each trial; tuning or setting them in `train` is refused."""


class SearchDomain(Section):
    """One dimension of the search space: exactly one of these keys, handed to the `ray.tune` function of its name."""

    loguniform: tuple[float, float] | None = None
    """[lo, hi] with 0 < lo < hi, sampled uniformly in log space (learning rates)."""
    uniform: tuple[float, float] | None = None
    """[lo, hi], lo < hi."""
    randint: tuple[int, int] | None = None
    """[lo, hi): an integer, hi excluded (as `tune.randint`)."""
    choice: list[Any] | None = Field(default=None, min_length=1)
    """Values sampled with equal probability."""
    grid: list[Any] | None = Field(default=None, min_length=1)
    """Every value is run (`tune.grid_search`); crossed with the other grid keys and, for `random`, the samples."""

    @model_validator(mode="after")
    def _one_domain(self) -> "SearchDomain":
        given = [k for k in SEARCH_DOMAINS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SEARCH_DOMAINS)} (got {', '.join(given) or 'none'})")
        bounds = self.loguniform or self.uniform or self.randint
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError(f"{self.kind}: lo must be below hi (got {list(bounds)})")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: lo must be > 0 (got {self.loguniform[0]})")
        return self

    @model_serializer(mode="wrap")
    def _only_the_domain(self, handler, info):
        return {self.kind: handler(self)[self.kind]}

    @property
    def kind(self) -> str:
        return next(k for k in SEARCH_DOMAINS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def extremes(self) -> list[Any]:
        """The values to check against the train config before any trial runs: every listed value, or the bounds."""
        if self.kind == "randint":
            return [self.randint[0], self.randint[1] - 1]
        return list(self.args)


class SearchSettings(Section):
    algorithm: Literal["random", "grid", "optuna"] = "random"
    """`random`: each trial samples every domain (`grid` keys are crossed with the samples); `grid`: every
    combination of the space's `grid` values (only `grid` domains allowed); `optuna`: Optuna's TPE sampler
    (`ray.tune.search.optuna.OptunaSearch`; `grid` not allowed)."""
    num_samples: int = Field(default=8, gt=0)
    """Trials for random and optuna; for grid, how many times the whole grid is run."""
    seed: int | None = 0
    """Seeds the sampler (null: a different search every run)."""


class SchedulerSettings(Section):
    """Stopping weak trials early on `metric`; time is counted in validations (one every `train.checkpoint_every`
    steps, and one at the end)."""

    name: Literal["asha", "fifo"] = "asha"
    """`asha`: `ray.tune.schedulers.ASHAScheduler` stops a trial whose metric at a rung is not among the best
    1/reduction_factor of the trials that reached it; `fifo`: every trial runs to its end."""
    grace_period: int = Field(default=1, gt=0)
    """Validations every trial gets before it can be stopped (the first rung)."""
    reduction_factor: float = Field(default=2, gt=1)
    """Rungs are at grace_period x reduction_factor^k validations."""
    max_t: int | None = Field(default=None, gt=0)
    """Validations that bound the rungs; default: one fewer than a full trial of `train` has, so that no rung falls
    on a trial's final validation (a trial that reached its end is always exported)."""


class TrackingSettings(Section):
    mlflow_uri: str | None = None
    """Also log every trial to this MLflow tracking URI through Ray's `MLflowLoggerCallback` (needs
    `pip install mlflow`). TensorBoard event files are always written, by Tune's `TBXLoggerCallback`."""
    mlflow_experiment: str | None = None
    """MLflow experiment name; default: the tune `name`."""


def check_space_key(key: str) -> str:
    """The key if it names a tunable value of TrainConfig (dotted), else ValueError saying what is allowed there."""
    cls: type[BaseModel] = TrainConfig
    parts = key.split(".")
    if parts[0] in PER_TRIAL_KEYS:
        raise ValueError(f"'{parts[0]}' is set per trial by honed tune and cannot be tuned")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i])
        field = cls.model_fields.get(part)
        if field is None:
            allowed = ", ".join(cls.model_fields)
            raise ValueError(f"unknown key '{part}'; allowed {f'under {where}' if where else 'at the top'}: {allowed}")
        sub = _section_type(field.annotation)
        last = i == len(parts) - 1
        if last and sub is not None:
            raise ValueError(f"'{key}' is a section; tune one of its keys: "
                             + ", ".join(f"{key}.{f}" for f in sub.model_fields))
        if not last and sub is None:
            raise ValueError(f"'{'.'.join(parts[:i + 1])}' holds a value, not a section")
        cls = sub or cls
    return key


def trial_train_config(train: TrainConfig, sampled: dict[str, Any], **fields: Any) -> TrainConfig:
    """`train` with the sampled values (dotted keys) and `fields` (output_dir, name, ...) set. When the method is
    sampled, the method sections it does not use are dropped unless sampled too. ConfigError if invalid."""
    data = train.model_dump(mode="json", exclude_unset=True)
    for dotted, value in sampled.items():
        *sections, leaf = dotted.split(".")
        node = data
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    method = sampled.get("method.name")
    if method in METHOD_SECTIONS:
        kept = {key.split(".")[1] for key in sampled if key.startswith("method.") and key.count(".") >= 2}
        for section in METHOD_SECTION_NAMES - METHOD_SECTIONS[method] - kept:
            data.get("method", {}).pop(section, None)
    data.update(fields)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"trial config {sampled}:\n" + describe_errors(TrainConfig, err)) from None


warnings.filterwarnings("ignore", message='Field name "register" in "TuneConfig" shadows', category=UserWarning)


class TuneConfig(Section):
    """`honed tune`: Ray Tune over `honed train` runs → `output_dir/{results.csv, results.md, best_train.yaml,
    report.md, plots/, trials/<trial>/}`."""

    train: TrainConfig = TrainConfig()
    """The train config every trial starts from (its `output_dir`, `storage_path`, `name` and `register` are set
    per trial and may not be given)."""
    space: dict[Annotated[str, AfterValidator(check_space_key)], SearchDomain] = Field(
        default_factory=lambda: {"optim.lr": SearchDomain(loguniform=(1e-4, 1e-2))})
    """Dotted train-config key → domain, e.g. `optim.lr: {loguniform: [1e-4, 1e-2]}`, `method.lora.r: {choice:
    [8, 16]}`, `method.name: {choice: [lora, ia3]}` (a trial drops the method sections its method does not use;
    a sampled combination the train config refuses fails that trial). Nested sections work too (`optim: {lr:
    {...}}`), and so does `space.optim.lr=...` on the command line."""
    search: SearchSettings = SearchSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    metric: str = "val_loss"
    """A validation metric reported at every checkpoint (`val_loss`, `val_loss/<source>`, ...): what the search and
    the scheduler optimise and the results are sorted by."""
    mode: Literal["min", "max"] = "min"
    """`min`: lower `metric` is better (losses); `max`: higher is better (accuracies)."""
    max_concurrent_trials: int = Field(default=1, gt=0)
    """Trials (each a whole Ray Train run with `train.scaling` workers) running at once."""
    trial_cpus: float = Field(default=0.1, gt=0)
    """CPUs of each trial's driver (it only launches and watches the TorchTrainer); above 0, so that Ray places it."""
    output_dir: str = "runs/tune"
    storage_path: str | None = None
    """Ray Tune experiment storage (local path or cloud URI); default: `output_dir`. Experiment dir: storage/name."""
    name: str = Field(default="honed-tune", pattern=r"^[A-Za-z0-9._-]+$")
    """Experiment name: rerunning the same name continues the experiment (`Tuner.restore`)."""
    register: RegisterConfig | None = None
    """Register the best trial's adapter in an adapter registry, e.g. {name: icd10-lora}."""
    tracking: TrackingSettings = TrackingSettings()

    @field_validator("train")
    @classmethod
    def _no_per_trial_keys(cls, train: TrainConfig) -> TrainConfig:
        fixed = [k for k in PER_TRIAL_KEYS if k in train.model_fields_set]
        if fixed:
            raise ValueError(f"train.{fixed[0]} is set per trial by honed tune (trials run under "
                             "output_dir/trials/<trial>); remove it (the best trial is registered by the top-level "
                             "`register`)")
        return train

    @field_validator("space", mode="before")
    @classmethod
    def _flatten_space(cls, value: Any) -> Any:
        """Nested sections are read as dotted keys, so `optim: {lr: {...}}` and the CLI's `space.optim.lr=...` name
        `optim.lr` too (a later entry wins)."""
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}
        for key, domain in value.items():
            # a section holds mappings (domains or sections); a domain holds lists
            nested = isinstance(domain, dict) and domain and all(isinstance(v, dict) for v in domain.values())
            flat.update({f"{key}.{k}": v for k, v in cls._flatten_space(domain).items()} if nested else {key: domain})
        return flat

    @field_validator("space")
    @classmethod
    def _check_values(cls, space: dict[str, SearchDomain], info: ValidationInfo) -> dict[str, SearchDomain]:
        if not space:
            raise ValueError("the space is empty; give at least one train key to search, e.g. "
                             "space: {optim.lr: {loguniform: [1e-4, 1e-2]}}")
        train = info.data.get("train")
        for key, domain in space.items() if train else ():
            for value in domain.extremes():
                try:
                    trial_train_config(train, {key: value})
                except ConfigError as err:
                    detail = str(err).split("\n", 1)[1].strip()
                    raise ValueError(f"{key}: the value {value!r} makes an invalid train config: {detail}") from None
        return space

    @field_validator("search")
    @classmethod
    def _fits_space(cls, search: SearchSettings, info: ValidationInfo) -> SearchSettings:
        kinds = {key: domain.kind for key, domain in (info.data.get("space") or {}).items()}
        if search.algorithm == "grid" and set(kinds.values()) - {"grid"}:
            raise ValueError("algorithm grid runs `grid` domains only; not grid: "
                             + ", ".join(k for k, kind in kinds.items() if kind != "grid"))
        if search.algorithm == "optuna" and "grid" in kinds.values():
            raise ValueError("algorithm optuna samples its own points and takes no `grid` domain ("
                             + ", ".join(k for k, kind in kinds.items() if kind == "grid") + "); use choice")
        return search

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, metric: str) -> str:
        if not metric.startswith("val_"):
            raise ValueError(f"'{metric}' is not a validation metric (reported at each checkpoint); use val_loss, "
                             "val_loss/<source> or another val_ metric")
        return metric

    @field_validator("register")
    @classmethod
    def _adapters_only(cls, register: RegisterConfig | None, info: ValidationInfo) -> RegisterConfig | None:
        train, space = info.data.get("train"), info.data.get("space") or {}
        methods = set(space["method.name"].extremes()) if "method.name" in space else {train and train.method.name}
        if register and "full" in methods:
            raise ValueError("method full exports a whole model, not an adapter; remove `register` or keep full out "
                             "of the methods tried")
        return register

    def trial_config(self, sampled: dict[str, Any], **fields: Any) -> TrainConfig:
        """`train` with the sampled values and `fields` set (see trial_train_config); ConfigError if invalid."""
        return trial_train_config(self.train, sampled, **fields)


CONFIGS: dict[str, type[Section]] = {
    "prepare": PrepareConfig,
    "train": TrainConfig,
    "tune": TuneConfig,
    "eval": EvalConfig,
    "merge": MergeConfig,
    "serve": ServeConfig,
    "demo": DemoConfig,
}


# ---------------------------------------------------------------------------------------------- loading
def load_config(cls: type[Section], path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """Read YAML (a Serve config file gives its first application's `args`), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        if "applications" in data:
            data = dict(data["applications"][0].get("args") or {})
    for item in overrides:
        apply_override(data, item)
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid {cls.__name__}{where}:\n" + describe_errors(cls, err)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """`a.b=c`: set data['a']['b'] to c parsed as YAML (so numbers, booleans and lists work)."""
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' must look like key=value or a.b.c=value")
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{item}': '{part}' holds a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw else raw
    except yaml.YAMLError:
        node[parts[-1]] = raw


def describe_errors(cls: type[BaseModel], err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(cls, e["loc"][:-1])) or "none"
            lines.append(f"  {key}: unknown key; allowed here: {allowed}")
        else:
            lines.append(f"  {key} = {e['input']!r}: {e['msg']}")
    return "\n".join(lines)


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the section found by walking `loc` from `cls` (list indexes and the keys of a mapping of
    sections, such as TuneConfig.space, are skipped)."""
    keyed = False
    for part in loc:
        if isinstance(part, int) or keyed:
            keyed = False
            continue
        field = cls.model_fields.get(part)
        sub = _section_type(field.annotation) if field else None
        if sub is None:
            return []
        keyed = getattr(field.annotation, "__origin__", None) is dict
        cls = sub
    return list(cls.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found:
            return found
    return None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

"""`honed train`'s config: model, method, optimisation, scaling, checkpoints and registration.

    cfg = load_config(TrainConfig, "jobs/train_lora.yaml", ["method.name=qlora", "optim.lr=3e-4"])
"""

from __future__ import annotations

import warnings
from typing import Literal

from pydantic import Field, field_validator, model_validator

from honed.config.base import Section
from honed.config.method import MethodConfig
from honed.config.model import ModelConfig
from honed.config.names import check_adapter_name

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


class EfficiencySettings(Section):
    """What `efficiency.json`'s MFU divides by (honed.train.efficiency)."""

    peak_flops: float | None = Field(default=None, gt=0)
    """Peak FLOP/s of one worker's device in the compute dtype, e.g. 989e12 for an H100 SXM's dense bf16.
    Default: the datasheet figure of a known GPU (`torch.cuda.get_device_name`), else a large matmul measured on
    every worker at once before training starts."""


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
    val_max_examples: int = Field(default=64, gt=0)
    """Validation rows per source used during training (each source's first rows; `honed eval` scores its own
    sample). 64 keeps the noise well under what validation must see: on the demo data (SmolLM2-135M, 24 LoRA
    steps) the domain val_loss fell 3.56 while its standard error at 64 rows is 0.14 (0.08 for a change between
    two validations, which score the same rows), and the KJV probe's rise of 0.04 has 0.02; 256 rows made
    validation ~60 % of a short job's fixed cost on 2 CPUs. Raise it to compare runs of close quality."""
    inline_data_mb: float = Field(default=32, ge=0)
    """Train shards of at most this many MB (Parquet, as prepared) are read once by the driver and handed to the
    workers in memory, served in the order Ray Data would stream them; a larger set, or 0, streams through Ray
    Data. A short job on a small set otherwise pays Ray Data's start-up in every worker: read tasks in fresh
    processes, competing with the model load (~8 s of the demo job's set-up on 2 CPUs)."""
    validate_at_checkpoints: bool = False
    """Compute per-source validation loss at every checkpoint (always done at the end)."""
    early_stopping: EarlyStopping | None = None
    """Stop when the validation metric stops improving (validates at every checkpoint)."""
    efficiency: EfficiencySettings = EfficiencySettings()
    """MFU's peak; a top-level `peak_flops: X` is read as `efficiency: {peak_flops: X}`."""
    register: RegisterConfig | None = None
    """Register the exported adapter (PEFT methods only) in an adapter registry, e.g. {name: icd10-lora}."""

    @model_validator(mode="before")
    @classmethod
    def _top_level_peak_flops(cls, data):
        """A top-level `peak_flops` (the key before the `efficiency` section) is `efficiency.peak_flops`."""
        if not isinstance(data, dict) or "peak_flops" not in data:
            return data
        data = dict(data)
        peak = data.pop("peak_flops")
        section = dict(data.get("efficiency") or {})
        if section.get("peak_flops", peak) != peak:
            raise ValueError(f"peak_flops ({peak}) and efficiency.peak_flops ({section['peak_flops']}) disagree; "
                             "give efficiency.peak_flops only")
        data["efficiency"] = section | {"peak_flops": peak}
        return data

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


"""What `honed train` trains (`method:`): full, lora, qlora, prefix, ia3 or dpo, each with its own section.

A method's section (`lora`, `quant`, `prefix`, `ia3`, `deepspeed`, `dpo`) set for a method that does not read it is
refused, naming the methods it applies to.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_serializer, model_validator

from honed.config.base import Section

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


"""`honed eval`'s config: base vs tuned model, the forgetting gate and the bias probe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from honed.config.base import Section
from honed.config.index import RetrievalSettings
from honed.config.model import ModelConfig
from honed.config.names import parse_ref


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
    require_interval: bool = True
    """Each check must hold for the whole confidence interval of its change (`bootstrap`, paired over the same
    items), not only for the change itself: the gain's lower bound ≥ `min_domain_gain`, the perplexity rise's
    upper bound ≤ `max_general_ppl_increase`. So a gain within the noise of a few hundred items fails. `false`:
    the change alone is compared (the intervals are still reported)."""

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


class BootstrapSettings(Section):
    """Confidence intervals by bootstrap over items (`honed.eval.intervals`): every task metric, loss and
    perplexity, per model and for the change (paired). Seeded: a rerun on the same items gives the same bounds."""

    resamples: int = Field(default=1000, ge=100)
    """Draws of the items with replacement. At 1000 a 95 % bound moves with the seed by about 0.08 standard
    errors of the figure (≈ 0.003 on an exact match near 0.3 over 200 answers)."""
    level: float = Field(default=0.95, gt=0.5, lt=1)
    """Central share of the draws the interval spans."""
    seed: int = 0


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
    """Per validation source, for loss/perplexity (spread evenly over the source's rows)."""
    generate_examples: int = Field(default=200, ge=0)
    """Per domain source (not eval_only): validation examples answered by greedy generation for exact match,
    token F1 and ROUGE-L (all of them when a source has fewer). 200 gives a 95 % interval of about ±0.06 on an
    exact match near 0.3; the demo's 48 moved it between 0.27 and 0.35 across runs."""
    max_new_tokens: int = Field(default=32, gt=0)
    batch_size: int = Field(default=16, gt=0)
    gate: GateSettings = GateSettings()
    bootstrap: BootstrapSettings = BootstrapSettings()
    bias: BiasSettings = BiasSettings()
    decontamination: bool = True
    """Report word n-gram overlap of the eval sets with the training shards (streams them once)."""
    use_gpu: bool = False
    """Score each model in a Ray task on a GPU (in `model.dtype`, auto = bf16 there), as training ran."""
    retrieval: RetrievalSettings | None = None
    """`{index, top_k, template}`: the generated questions are also answered with the index's top passages in the
    prompt (as `honed serve` puts them), scored as `retrieval/<metric>` beside the plain metrics of each model."""

    @model_validator(mode="after")
    def _check_tuned(self) -> "EvalConfig":
        if self.adapter and self.merged:
            raise ValueError("set `adapter` or `merged`, not both: one tuned model is compared with the base")
        if self.registry and not self.adapter:
            raise ValueError("`registry` needs `adapter` set to a ref in it (name, name@N or name@latest)")
        if self.registry:
            parse_ref(self.adapter)
        if self.gate.enabled and not (self.adapter or self.merged):
            raise ValueError("the gate (--gate, gate.enabled) compares a tuned model with the base: set `adapter` "
                             "(a dir, or a ref with `registry`) or `merged`")
        if self.gate.enabled and self.gate.min_domain_gain is not None and self.gate.domain_metric != "loss" \
                and not self.generate_examples:
            raise ValueError(f"gate.domain_metric {self.gate.domain_metric} is measured on generated answers: "
                             "set generate_examples > 0, or use domain_metric loss")
        return self


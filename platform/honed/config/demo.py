"""`honed demo`'s config: the stage sections with the demo's defaults (subclasses, so one override keeps the rest)."""

from __future__ import annotations

from pydantic import Field

from honed.config.base import Section
from honed.config.data import DataConfig, DecontamConfig, SourceConfig
from honed.config.eval import EvalConfig
from honed.config.method import DPOSettings, MethodConfig
from honed.config.model import ModelConfig
from honed.config.serve import ServeConfig
from honed.config.train import OptimConfig, ScalingSettings


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


DEMO_SYSTEM_PROMPT = "You are a medical coding assistant. Answer with ICD-10-CM facts only."


def _demo_sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="icd10", kind="icd10", chapters=["4", "9", "10"]),  # endocrine, circulatory, respiratory
        SourceConfig(name="kjv", kind="kjv", max_records=200, eval_only=True),  # general text: the forgetting probe
    ]


class DemoData(DataConfig):
    """The ICD-10-CM demo's data: its sources, system prompt and decontamination against the KJV probe live here
    and in jobs/demo.yaml, never in the generic `DataConfig`."""

    sources: list[SourceConfig] = Field(default_factory=_demo_sources, min_length=1)
    system_prompt: str | None = DEMO_SYSTEM_PROMPT
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


"""`honed merge`'s config: base + adapter → one model dir."""

from __future__ import annotations

from pydantic import Field

from honed.config.base import Section
from honed.config.model import ModelConfig


class MergeConfig(Section):
    """`honed merge`: base + adapter → one HF model dir, verified against the adapter's logits."""

    model: ModelConfig = ModelConfig()
    adapter: str = "runs/train/adapter"
    output_dir: str = "runs/merged"
    tolerance: float | None = Field(default=None, gt=0)
    """Max |merged logits − adapter logits| allowed; null: by dtype (honed.merge.TOLERANCE: fp32 1e-3, bf16/fp16
    relative to the logits' magnitude). Merging reorders the arithmetic (x·(W+BA) vs x·W + (x·A)·B): in fp32 on
    SmolLM2-135M, with logits of magnitude ~20, that is ~1e-4, so 1e-3 flags real bugs (a wrong scaling or a
    missed module moves logits by >0.1) without flagging rounding."""
    use_gpu: bool = False
    """Merge and verify in a Ray task on a GPU (in `model.dtype`, auto = bf16 there), as training ran."""


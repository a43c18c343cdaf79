"""The base model every stage loads (`model:` in each config)."""

from __future__ import annotations

from typing import Literal

from honed.config.base import Section

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelConfig(Section):
    name_or_path: str = DEFAULT_MODEL
    """`smollm2-135m-instruct` (the embedded default) or a local Hugging Face model directory."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype; `auto` is float32 on CPU and bfloat16 on GPU."""


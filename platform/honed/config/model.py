"""The base model every stage loads (`model:` in each config)."""

from __future__ import annotations

from typing import Literal

from honed.config.base import Section

DEFAULT_MODEL = "smollm2-135m-instruct"


class ModelConfig(Section):
    name_or_path: str = DEFAULT_MODEL
    """Where the base model comes from: `smollm2-135m-instruct` (the embedded default, converted once per node),
    a local Hugging Face model directory, a Hugging Face Hub ID (`org/name`, fetched into each node's HF cache;
    `HF_HUB_OFFLINE=1` uses that cache only) or an object-storage URI of a model directory (`s3://bucket/models/x`,
    `gs://...`; copied once per node under `HONED_CACHE`). Resolved where the model loads (Ray workers, Serve
    replicas); the driver only checks that it exists."""
    revision: str | None = None
    """Hub IDs only: the branch, tag or commit to fetch (default: `main`); pin a commit for reproducible runs."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype; `auto` is float32 on CPU and bfloat16 on GPU."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """Attention kernel. `auto`: `flash_attention_2` on a CUDA GPU where the flash-attn package is installed and
    the compute dtype is bfloat16/float16, `sdpa` (torch's scaled_dot_product_attention) everywhere else.
    `flash_attention_2` where it cannot run is an error where the model loads, not a silent fallback. Padding-free
    batches (`optim.padding_free`) run flash attention's variable-length kernel as is; under `sdpa` or `eager`
    they run honed's per-example SDPA (`honed_varlen`), which keeps attention inside each example."""


"""The Serve app's config (`honed serve`, `serve run`): served models, batching, replicas and autoscaling."""

from __future__ import annotations

from pydantic import Field, model_validator

from honed.config.base import Section
from honed.config.model import ModelConfig
from honed.config.names import check_adapter_name


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


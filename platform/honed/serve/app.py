"""The Serve app: one OpenAI-compatible endpoint for a base model, its domain adapters and merged models.

    serve run serving/icd10.yaml           # Ray Serve's own CLI, through `build_app`
    honed serve serving/icd10.yaml adapters.icd10=runs/demo/train/adapter

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, and with `feedback` set POST /v1/feedback
(answers logged, judgements of them taken: honed.serve.feedback). The request's `model` picks the
base (`base_name`), an adapter (from `adapters`, or `name` / `name@N` from the `registry`) or a merged model
(`merged`: a deployment of its own). Adapters load on demand through `@serve.multiplexed` (LRU per replica,
requests routed to replicas holding theirs) and answer with the system prompt, template and stop strings they
were trained with (their honed.json). Concurrent requests are decoded as one batch whatever adapter each names.

`engine: vllm` puts vLLM (Ray Serve LLM) behind the same router instead of ModelServer: honed.serve.vllm_engine.

This module holds the deployments only: what goes over the wire is honed.serve.protocol, what a request decodes
honed.serve.prompting, which adapters sit on a replica's model and when they leave honed.serve.residency, the
decode loop honed.serve.batcher.
"""


import asyncio
import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayTaskError

from honed.artifacts import read_adapter_meta, read_meta
from honed.config import ServeConfig
from honed.generation import BatchDecoder, Completion, DecodeJob, RowFailed
from honed.models import check_model, load_model, model_dir, resolve_model, weights_hash
from honed.registry import Registry, RegistryError
from honed.retrieval.search import RetrievalIndex, resolve_index, with_sources
from honed.serve.batcher import ContinuousBatcher
from honed.serve.prompting import decode_job, last_done
from honed.serve.protocol import (APIError, ChatRequest, CompletionRequest, SamplingFields, check_api_key,
                                  completion_body, error_response, hash_key, stream_events)
from honed.serve.feedback import FeedbackRequest, FeedbackStore, completion_record, new_completion_id
from honed.serve.head import rows_last_head
from honed.serve.packed import pack_linears
from honed.serve.residency import AdapterResidency, AdapterStore, LoadedAdapter
from honed.storage import absolute, is_uri


# ---------------------------------------------------------------------------------------------- the model
@serve.deployment
class ModelServer:
    """Holds one model (the base, or a merged model) and LoRA adapters on top of it (AdapterResidency).
    Concurrent requests are decoded together (ContinuousBatcher: requests join the running batch between decode
    steps): rows of different adapters and of the base share each forward, every row with its own adapter's
    factors (honed.serve.lora.MultiLora). `loader(path, dtype, device)` → (model, tokenizer)."""

    def __init__(self, cfg: dict, model_path: str | None = None, loader: Callable = load_model):
        import torch

        self.cfg = ServeConfig.model_validate(cfg)
        torch.set_num_threads(self.cfg.torch_threads)
        # resolved here, on the replica's node: the base, or a merged model (a local dir or a URI)
        path = resolve_model(model_path) if model_path else model_dir(self.cfg.model)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU replica (num_gpus) decodes on it
        model, self.tokenizer = loader(path, self.cfg.model.dtype, device)
        model.eval()
        self.packed_layers = pack_linears(model)  # on CPU: weights prepacked for oneDNN (honed.serve.packed)
        rows_last_head(model)  # on CPU: the decode step's vocabulary projection as W·hᵀ (honed.serve.head)
        self.meta = read_meta(path)  # a merged model's training template, if honed wrote it
        self.context_len = getattr(model.config, "max_position_embeddings", 2048)
        registry = Registry(self.cfg.registry) if self.cfg.registry else None
        self.adapters = AdapterResidency(model, weights_hash(path), AdapterStore(self.cfg.adapters, registry))
        self.mixed_steps = 0  # decode steps whose rows named two or more models
        self.batcher = ContinuousBatcher(lambda: BatchDecoder(self.adapters.live, self.tokenizer),
                                         self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s,
                                         on_step=self._count_step, executor=self.adapters.model_thread)

        async def load(model_id: str) -> LoadedAdapter:
            return await self.adapters.load(model_id)

        # Wrapped here rather than decorated so the LRU size comes from the config; a function, not the bound
        # method, because Serve keeps the LRU as an attribute of what it wraps.
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.max_adapters_per_replica)(load)

    def stats(self) -> dict:
        """This replica's batching counts (decode steps, rows summed over steps, the largest batch, requests, steps
        mixing models) and resident adapters."""
        loaded = self.adapters.resident()
        seconds = {k: round(v, 3) for k, v in self.batcher.seconds.items()}
        return dict(self.batcher.counts) | seconds | {"mixed_steps": self.mixed_steps, "adapters_loaded": loaded,
                                                      "packed_layers": self.packed_layers}

    # ---- requests
    async def complete(self, request: dict) -> dict:
        """`request`: {"messages" | "prompt", sampling fields}; the multiplexed id names the model or adapter."""
        return await last_done(self.stream(request))

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
        except RowFailed as err:  # this request's row alone: the batch it decoded in goes on
            raise APIError(500, f"decoding failed: {err}", None, "decode_failed") from None
        finally:
            if adapter is not None:
                self.adapters.release(adapter)

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
            self.adapters.acquire(adapter)
        try:
            job = decode_job(self.tokenizer, request, meta.get("template"), adapter, self.context_len,
                             self.cfg.max_tokens)
            return job, adapter
        except BaseException:
            if adapter is not None:
                self.adapters.release(adapter)
            raise


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


# Above the router: `serve.ingress` pickles the class as it is defined, with the module globals present then.
async def sources_first(sources: dict, events):
    """A stream's events, led (for a model with `retrieval`) by one chunk without choices that carries `sources`,
    as the usage chunk is one without choices: OpenAI clients pass it through."""
    if sources:
        yield f"data: {json.dumps({'object': 'chat.completion.chunk', 'choices': [], **sources})}\n\n"
    async for event in events:
        yield event


@serve.deployment
@serve.ingress(api)
class OpenAIRouter:
    """OpenAI routes; checks the API key, `model` and limits, then routes to the model replicas by adapter id."""

    def __init__(self, server, merged: dict, cfg: dict, key_hashes: list[str] = ()):
        self.server, self.merged = server, merged
        self.cfg = ServeConfig.model_validate(cfg)
        self.registry = Registry(self.cfg.registry) if self.cfg.registry else None
        self.key_hashes = list(key_hashes)
        self.feedback = FeedbackStore(self.cfg.feedback.store) if self.cfg.feedback else None
        self.indexes = {name: (s, RetrievalIndex(s.index)) for name, s in self.cfg.retrieval.items()}

    async def _retrieve(self, model: str, payload: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        """The payload with its model's retrieved passages in the prompt, and `{"sources": [...]}` for the response;
        unchanged and `{}` for a model without `retrieval` (`name@N` falls back to `name`'s)."""
        attached = self.indexes.get(model) or self.indexes.get(model.partition("@")[0])
        if attached is None:
            return payload, {}
        payload, sources = await asyncio.to_thread(with_sources, payload, *attached)
        return payload, {"sources": sources}

    def authorize(self, request: Request) -> None:
        check_api_key(request.headers.get("authorization", ""), self.key_hashes)

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
        payload, sources = await self._retrieve(body.model, payload)
        answer_id = new_completion_id(chat)
        asked = {key: payload[key] for key in prompt}  # as the model saw it: with retrieved passages, if any
        log = functools.partial(self._log, answer_id, body, asked, adapter or body.model, chat)
        if body.stream:
            items = handle.options(stream=True).stream.remote(payload)
            await self._call(items.__anext__())  # the replica's checks: a refusal is still a plain 4xx here
            events = stream_events(body.model, self._stream_items(items, log), chat, body.include_usage(), answer_id)
            return StreamingResponse(sources_first(sources, events), media_type="text/event-stream")
        # n answers: each its own row in the replica's batch, each with its own seed
        rows = [payload | {"seed": None if body.seed is None else body.seed + i} for i in range(body.n)]
        dones = [Completion(**d) for d in await asyncio.gather(*(self._call(handle.complete.remote(r)) for r in rows))]
        await log(dones)
        return completion_body(body.model, dones, chat, answer_id) | sources

    async def _log(self, answer_id: str, body: SamplingFields, prompt: dict[str, Any], served: str, chat: bool,
                   dones: list[Completion]) -> None:
        """Append the answer to the completion log (when `feedback` is set) before the client sees it, so a replica
        lost after answering loses no record; an answer whose record cannot be written is refused (503)."""
        if self.feedback is None:
            return
        sampling = {"max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                    "stop": body.stops(), "seed": body.seed, "n": body.n}
        base = self.cfg.merged.get(body.model, self.cfg.model.name_or_path)
        record = completion_record(answer_id, chat, prompt, sampling, body.model, served, base, dones)
        try:
            await asyncio.to_thread(self.feedback.write_completion, record)
        except OSError as err:
            raise APIError(503, f"the completion log (feedback.store) could not be written, so the answer is not "
                                f"returned: {err}", None, "feedback_store_unavailable") from None

    @api.post("/v1/feedback")
    async def post_feedback(self, body: FeedbackRequest, request: Request) -> dict:
        """A judgement of a logged completion (honed.serve.feedback): 404 for an unknown id, 400 for a bad field."""
        self.authorize(request)
        if self.feedback is None:
            raise APIError(404, "feedback is not enabled on this endpoint: set feedback.store in the serve config",
                           None, "feedback_disabled")
        return await asyncio.to_thread(self.feedback.record_feedback, body, self.cfg.feedback.max_rating)

    def _payload(self, body: SamplingFields, prompt: dict[str, Any]) -> dict[str, Any]:
        if body.max_tokens and body.max_tokens > self.cfg.max_tokens:
            raise APIError(400, f"max_tokens {body.max_tokens} exceeds this server's limit {self.cfg.max_tokens}",
                           "max_tokens", "max_tokens_too_large")
        if body.stream and body.n > 1:
            raise APIError(400, f"n = {body.n} is not streamed: ask with stream false, or n = 1", "n", "invalid_n")
        return prompt | {"max_tokens": body.max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                         "stops": body.stops(), "seed": body.seed}

    async def _stream_items(self, items, log: Callable | None = None):
        """A replica's stream items; its refusal mid-stream (a row that failed) arrives as that APIError. `log`
        gets the finished Completion before the last item goes out."""
        while True:
            try:
                item = await self._call(items.__anext__())
            except StopAsyncIteration:
                return
            if log is not None and "done" in item:
                await log([Completion(**item["done"])])
            yield item

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


def build_app(args: dict) -> serve.Application:
    """Serve's `import_path` builder: validates the args as a `ServeConfig` and the adapter and merged-model
    dirs before anything starts, then binds the base deployment, one per merged model (the own engine's
    ModelServer, or for `engine: vllm` honed.serve.vllm_engine's front over Ray Serve LLM), and the router."""
    cfg = ServeConfig.model_validate(args)
    resolve_dirs(cfg)
    for settings in cfg.retrieval.values():  # a missing index fails here, naming how to build it
        settings.index = resolve_index(settings.index)
    if cfg.engine == "vllm":
        from honed.serve.vllm_engine import vllm_deployments

        server, merged = vllm_deployments(cfg, scaling_options(cfg))
    else:
        replicas = replica_options(cfg)
        server = ModelServer.options(name="ModelServer", **replicas).bind(cfg.model_dump())
        merged = {name: ModelServer.options(name=f"Merged-{name}", **replicas).bind(cfg.model_dump(), path)
                  for name, path in cfg.merged.items()}
    return OpenAIRouter.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000).bind(
        server, merged, cfg.model_dump(), api_key_hashes(cfg))


def resolve_dirs(cfg: ServeConfig) -> None:
    """Check every adapter, merged model and local registry dir of `cfg` and make it absolute (replicas may start
    in another directory): a missing or wrong dir fails here, not on the first request."""
    for name, path in cfg.adapters.items():
        read_adapter_meta(path)
        cfg.adapters[name] = str(Path(path).resolve())
    check_model(cfg.model.name_or_path, cfg.model.revision)  # replicas resolve it on their nodes: exists?
    for name, path in cfg.merged.items():
        if is_uri(path):  # a replica copies it to its node; here only its config.json is looked for
            check_model(path)
        elif not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"merged model '{name}': '{path}' is not a model directory (config.json missing)")
        cfg.merged[name] = absolute(path)
    if cfg.registry:
        if "://" not in cfg.registry:
            if not Path(cfg.registry).is_dir():
                raise FileNotFoundError(f"registry '{cfg.registry}' is not a directory: register an adapter first "
                                        "(`honed registry add NAME ADAPTER_DIR --registry ...`) or fix the path")
            cfg.registry = str(Path(cfg.registry).resolve())
        Registry(cfg.registry).list()  # an unreadable registry fails here
    if cfg.feedback:
        store = FeedbackStore(cfg.feedback.store)
        store.check()
        cfg.feedback.store = cfg.feedback.store if store.remote else store.base


def replica_options(cfg: ServeConfig) -> dict[str, Any]:
    """`.options()` of a model deployment: resources, request room, autoscaling or a fixed replica count."""
    return scaling_options(cfg) | {"ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
                                   # room for one batch decoding and the next one waiting
                                   "max_ongoing_requests": cfg.max_ongoing_requests or 2 * cfg.max_batch_size}


def scaling_options(cfg: ServeConfig) -> dict[str, Any]:
    """Autoscaling or a fixed replica count, for the model deployments of either engine."""
    if cfg.autoscaling:
        return {"autoscaling_config": cfg.autoscaling.model_dump()}
    return {"num_replicas": cfg.num_replicas}


def api_key_hashes(cfg: ServeConfig) -> list[str]:
    """sha256 of each key in `cfg.api_keys_env`: the deployment holds hashes, never the keys."""
    if not cfg.api_keys_env:
        return []
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
    if not keys:
        raise ValueError(f"api_keys_env names '{cfg.api_keys_env}', but that environment variable holds no keys "
                         "(set it to comma-separated keys, or drop api_keys_env to serve without keys)")
    return [hash_key(k) for k in keys]


"""The Serve app: one OpenAI-compatible endpoint for a base model and its domain adapters.

    serve run serving/demo.yaml            # Ray Serve's own CLI, through `build_app`
    honed serve serving/demo.yaml adapters.icd10=runs/demo/train/adapter

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions. The request's `model` picks the
base (`base_name`) or an adapter; adapters load on demand through `@serve.multiplexed` (LRU per replica)
and are answered with the system prompt and template they were trained with (their honed.json).
"""


import asyncio
import contextlib
import hashlib
import json
import hmac
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayTaskError

from honed.config import ServeConfig
from honed.generation import Completion, generate, render_chat
from honed.models import load_model, resolve_model, weights_hash
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
    """An adapter resident in the replica's PeftModel; Serve calls __del__ when LRU evicts it."""

    def __init__(self, server, name: str, meta: dict):
        self.server, self.name, self.meta = server, name, meta

    def __del__(self):
        if self.server is not None:
            self.server.unload_adapter(self.name)
            self.server = None


@serve.deployment
class ModelServer:
    """Holds the base model once and the adapters on top of it; decodes one request at a time."""

    def __init__(self, cfg: dict, loader: Callable = load_model):
        import torch

        self.cfg = ServeConfig.model_validate(cfg)
        torch.set_num_threads(self.cfg.torch_threads)
        model_path = resolve_model(self.cfg.model.name_or_path)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a GPU replica (num_gpus) decodes on it
        self.model, self.tokenizer = loader(model_path, self.cfg.model.dtype, device)
        self.model.eval()
        self.base_sha256 = weights_hash(model_path)
        self.context_len = getattr(self.model.config, "max_position_embeddings", 2048)
        self.peft = None  # becomes a PeftModel when the first adapter loads
        self.lock = asyncio.Lock()

        async def load(name: str) -> LoadedAdapter:
            return self._load_adapter(name)

        # Wrapped here rather than decorated so the LRU size comes from the config.
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=self.cfg.max_adapters_per_replica)(load)

    def _load_adapter(self, name: str) -> LoadedAdapter:
        path = self.cfg.adapters[name]
        meta = read_adapter_meta(path)
        expected = meta.get("base_weights_sha256")
        if expected and expected != self.base_sha256:
            raise APIError(400, f"adapter '{name}' was trained on other base weights ({expected[:12]}…) than "
                                f"the served base ({self.base_sha256[:12]}…)", "model", "base_mismatch")
        if self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
        else:
            self.peft.load_adapter(path, adapter_name=name)
        return LoadedAdapter(self, name, meta)

    def unload_adapter(self, name: str) -> None:
        if self.peft is not None and name in self.peft.peft_config:
            self.peft.delete_adapter(name)

    async def complete(self, request: dict) -> dict:
        """`request`: {"messages" | "prompt", sampling fields}; the multiplexed id names the adapter."""
        async with self.lock:  # one decode at a time: the active adapter is replica-wide state
            model, prompt, max_tokens, adapter_scope = await self._prepare(request)
            with adapter_scope:
                return self._decode(model, prompt, max_tokens, request).__dict__

    async def stream(self, request: dict):
        """Like `complete`, as a stream: {"ready"} once checks pass, then {"text"} pieces, then {"done"}: the
        finished Completion. A refusal (APIError) comes before the first item, so it can still be a 400."""
        from transformers import TextIteratorStreamer

        async with self.lock:
            model, prompt, max_tokens, adapter_scope = await self._prepare(request)
            yield {"ready": True}
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            with adapter_scope:
                decoding = asyncio.get_running_loop().run_in_executor(
                    None, lambda: self._decode(model, prompt, max_tokens, request, streamer))
                while (piece := await asyncio.to_thread(next, streamer, None)) is not None:
                    if piece:
                        yield {"text": piece}
                done = await decoding
            yield {"done": done.__dict__}

    async def _prepare(self, request: dict):
        """The model to decode with (base or adapter), the rendered prompt, the token budget and the scope
        in which the adapter is switched on or off; refuses prompts that do not fit the context."""
        name = serve.get_multiplexed_model_id()
        template, model, scope = None, self.model, contextlib.nullcontext()
        if name != self.cfg.base_name:
            adapter = await self.get_adapter(name)
            template = adapter.meta.get("template")
            self.peft.set_adapter(name)
            model = self.peft
        elif self.peft is not None:  # adapters were injected into the base: decode the base with them off
            model, scope = self.peft, self.peft.disable_adapter()
        prompt = (render_chat(self.tokenizer, request["messages"], template)
                  if "messages" in request else request["prompt"])
        if template and "messages" in request:  # the end-of-turn strings of the training template stop a turn
            extra = [t for t in template.get("stop", []) if t != self.tokenizer.eos_token]
            request["stops"] = list(dict.fromkeys((request.get("stops") or []) + extra)) or None
        n_prompt = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n_prompt >= self.context_len:
            raise APIError(400, f"prompt ({n_prompt} tokens) does not fit the context length {self.context_len}",
                           "messages", "context_length_exceeded")
        max_tokens = request.get("max_tokens") or min(self.cfg.max_tokens, self.context_len - n_prompt)
        if n_prompt + max_tokens > self.context_len:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context "
                                f"length {self.context_len}", "messages", "context_length_exceeded")
        return model, prompt, max_tokens, scope

    def _decode(self, model, prompt: str, max_tokens: int, request: dict, streamer=None) -> Completion:
        (done,) = generate(model, self.tokenizer, [prompt], max_tokens, request.get("temperature", 0.0),
                           request.get("top_p", 1.0), request.get("stops"), request.get("seed"), streamer)
        return done


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

    def __init__(self, server, cfg: dict, key_hashes: list[str] = ()):
        self.server = server
        self.cfg = ServeConfig.model_validate(cfg)
        self.key_hashes = list(key_hashes)

    def authorize(self, request: Request) -> None:
        if not self.key_hashes:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        digest = hash_key(key.strip()) if scheme.lower() == "bearer" and key.strip() else ""
        if not any(hmac.compare_digest(digest, known) for known in self.key_hashes):
            raise APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`",
                           None, "invalid_api_key")

    def served_names(self) -> list[str]:
        return [self.cfg.base_name, *self.cfg.adapters]

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self.authorize(request)
        now = int(time.time())
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": now, "owned_by": "honed",
             "root": self.cfg.model.name_or_path, "parent": None if name == self.cfg.base_name else self.cfg.base_name}
            for name in self.served_names()]}

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
        handle = self.server.options(multiplexed_model_id=body.model)
        if body.stream:
            return await self._stream(body, handle.options(stream=True).stream.remote(payload), chat)
        return self._response(body, Completion(**await self._call(handle.complete.remote(payload))), chat)

    def _payload(self, body: SamplingFields, prompt: dict[str, Any]) -> dict[str, Any]:
        if body.model not in self.served_names():
            raise APIError(404, f"model '{body.model}' does not exist; served models: "
                                f"{', '.join(self.served_names())}", "model", "model_not_found")
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
    """Serve's `import_path` builder: validates the args as a `ServeConfig` before anything starts."""
    cfg = ServeConfig.model_validate(args)
    for name, path in cfg.adapters.items():
        read_adapter_meta(path)  # a missing or non-adapter dir fails here, not on the first request
        cfg.adapters[name] = str(Path(path).resolve())
    cfg_dict = cfg.model_dump()
    server = ModelServer.options(
        ray_actor_options={"num_cpus": cfg.num_cpus},
    ).bind(cfg_dict)
    return OpenAIRouter.options(ray_actor_options={"num_cpus": 0}).bind(server, cfg_dict, api_key_hashes(cfg))


def api_key_hashes(cfg: ServeConfig) -> list[str]:
    """sha256 of each key in `cfg.api_keys_env`: the deployment holds hashes, never the keys."""
    if not cfg.api_keys_env:
        return []
    keys = [k.strip() for k in os.environ.get(cfg.api_keys_env, "").split(",") if k.strip()]
    if not keys:
        raise ValueError(f"api_keys_env names '{cfg.api_keys_env}', but that environment variable holds no keys "
                         "(set it to comma-separated keys, or drop api_keys_env to serve without keys)")
    return [hash_key(k) for k in keys]


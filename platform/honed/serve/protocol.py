"""The OpenAI wire protocol as honed speaks it: request bodies, error bodies, response bodies and stream chunks.

    body = ChatRequest.model_validate(request_json)              # the router gets it from FastAPI
    check_api_key(headers.get("authorization", ""), key_hashes)  # 401 unless `Bearer <known key>`
    completion_body(body.model, done, chat=True)                 # done: a finished honed.generation.Completion
    StreamingResponse(stream_events(body.model, items, chat=True, include_usage=body.include_usage()))
    raise APIError(404, "model 'x' does not exist", "model", "model_not_found")   # → error_response(...)

No Ray here: the deployments (honed.serve.app) route requests; this module only says what goes over the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from honed.generation import Completion


# ------------------------------------------------------------------------------------------------ requests
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
    n: int = Field(default=1, ge=1, le=2)
    """Answers to sample, each decoded as its own row (seed i + its index when `seed` is set); 2 lets a person
    pick the better one (`POST /v1/feedback` with `choice`). Streaming answers one at a time: n = 1."""

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str


# -------------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """Answered in the OpenAI error format with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def __reduce__(self):  # raised in a model replica, unpickled in the router
        return APIError, (self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message, param, code))


def hash_key(key: str) -> str:
    """What a deployment keeps of an API key (it never holds the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_api_key(authorization: str, key_hashes: list[str]) -> None:
    """Refuse (401) an `Authorization` header that is not `Bearer <a key whose hash is known>`; no hashes, no check."""
    if not key_hashes:
        return
    scheme, _, key = authorization.partition(" ")
    digest = hash_key(key.strip()) if scheme.lower() == "bearer" and key.strip() else ""
    if not any(hmac.compare_digest(digest, known) for known in key_hashes):
        raise APIError(401, "missing or invalid API key: send `Authorization: Bearer <key>`", None, "invalid_api_key")


# ----------------------------------------------------------------------------------------------- responses
def usage_of(done: Completion) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def response_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def completion_body(model: str, done: Completion | list[Completion], chat: bool, body_id: str | None = None) -> dict:
    """The whole answer: a `chat.completion` or a `text_completion`; a list of Completions gives one choice each
    (`n`), the prompt counted once in `usage`. `body_id`: the response id (default: a fresh one)."""
    dones = done if isinstance(done, list) else [done]

    def choice(d: Completion) -> dict:
        return {"message": {"role": "assistant", "content": d.text}} if chat else {"text": d.text}

    prompt, answered = dones[0].prompt_tokens, sum(d.completion_tokens for d in dones)
    return {
        "id": body_id or response_id(chat), "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()), "model": model,
        "choices": [{"index": i, **choice(d), "finish_reason": d.finish_reason, "logprobs": None}
                    for i, d in enumerate(dones)],
        "usage": {"prompt_tokens": prompt, "completion_tokens": answered, "total_tokens": prompt + answered},
    }


async def stream_events(model: str, items: AsyncIterator[dict], chat: bool, include_usage: bool,
                        body_id: str | None = None) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. `items`: a model replica's
    `{"text": piece}` events, then `{"done": the Completion's fields}`. `body_id`: the chunks' id (default: fresh)."""
    kind, chunk_id = "chat.completion.chunk" if chat else "text_completion", body_id or response_id(chat)

    def event(choice: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        choices = [] if choice is None else [{"index": 0, **choice, "finish_reason": finish, "logprobs": None}]
        chunk = {"id": chunk_id, "object": kind, "created": int(time.time()), "model": model,
                 "choices": choices} | ({"usage": usage} if usage else {})
        return f"data: {json.dumps(chunk)}\n\n"

    if chat:
        yield event({"delta": {"role": "assistant", "content": ""}})
    try:
        async for item in items:
            if "text" in item:
                yield event({"delta": {"content": item["text"]}} if chat else {"text": item["text"]})
            else:
                done = Completion(**item["done"])
                yield event({"delta": {}} if chat else {"text": ""}, done.finish_reason)
                if include_usage:
                    yield event(None, usage=usage_of(done))
    except Exception as err:  # noqa: BLE001 — the status line is sent: the error travels as OpenAI's error event
        yield error_event(err if isinstance(err, APIError) else
                          APIError(500, f"the model replica failed: {type(err).__name__}", None, "server_error"))
        return
    yield "data: [DONE]\n\n"


def error_event(err: APIError) -> str:
    """A failure after a stream began, as OpenAI sends it (its clients raise it): `data: {"error": {...}}`."""
    return f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"

"""What a request decodes, whichever engine decodes it: the prompt rendered with the served model's or adapter's
training template, the stop strings, the token budget, refused (400) when it does not fit the context.

    job = decode_job(tokenizer, {"messages": [...], "max_tokens": 32, "temperature": 0}, meta.get("template"),
                     adapter="icd10@2", context_len=2048, max_tokens_limit=256)
    done = await last_done(server.stream(request))     # a model deployment's whole answer from its stream

Both engines build their requests here (honed's decode loop takes the DecodeJob, vLLM its token ids and
settings), so an adapter answers with the same prompt tokens and stops on either.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from honed.generation import BASE, DecodeJob, render_chat
from honed.serve.protocol import APIError


def decode_job(tokenizer, request: dict, template: dict | None, adapter: str | None, context_len: int,
               max_tokens_limit: int) -> DecodeJob:
    """`request`: {"messages" | "prompt", max_tokens, temperature, top_p, stops, seed} as the router sends it."""
    prompt = render_chat(tokenizer, request["messages"], template) if "messages" in request else request["prompt"]
    stops = list(request.get("stops") or [])
    if template and "messages" in request:  # the end-of-turn strings of the training template stop a turn
        stops = list(dict.fromkeys(stops + list(template.get("stop", []))))
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) >= context_len:
        raise APIError(400, f"prompt ({len(ids)} tokens) does not fit the context length {context_len}",
                       "messages", "context_length_exceeded")
    max_tokens = request.get("max_tokens") or min(max_tokens_limit, context_len - len(ids))
    if len(ids) + max_tokens > context_len:
        raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                            f"length {context_len}", "messages", "context_length_exceeded")
    return DecodeJob(ids, max_tokens, request.get("temperature", 1.0), request.get("top_p", 1.0), stops,
                     request.get("seed"), adapter=adapter or BASE)


async def last_done(stream: AsyncIterator[dict]) -> dict:
    """The `done` item of a model deployment's stream (`{"ready"}`, `{"text"}`..., `{"done"}`)."""
    done = None
    async for event in stream:
        done = event.get("done", done)
    return done

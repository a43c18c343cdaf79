"""The OpenAI wire format (honed.serve.protocol) without Serve: response bodies, stream chunks, API keys."""

import asyncio
import json

import pytest

from honed.generation import Completion
from honed.serve.protocol import APIError, check_api_key, completion_body, hash_key, stream_events

DONE = Completion(text="E11.9", prompt_tokens=7, completion_tokens=3, finish_reason="stop")


def chunks(chat: bool, include_usage: bool) -> list:
    async def items():
        yield {"text": "E11"}
        yield {"text": ".9"}
        yield {"done": DONE.__dict__}

    async def collect():
        return [event async for event in stream_events("icd10", items(), chat, include_usage)]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n" and all(e.startswith("data: ") for e in events)
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def test_chat_stream_opens_with_the_role_and_ends_with_the_finish_reason_and_usage():
    got = chunks(chat=True, include_usage=True)
    assert {c["object"] for c in got} == {"chat.completion.chunk"} and len({c["id"] for c in got}) == 1
    assert got[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in got if c["choices"]) == "E11.9"
    assert [c["choices"][0]["finish_reason"] for c in got if c["choices"]] == [None, None, None, "stop"]
    assert got[-1]["choices"] == [] and got[-1]["usage"]["total_tokens"] == 10


def test_completion_stream_carries_text_pieces_and_no_usage_unless_asked():
    got = chunks(chat=False, include_usage=False)
    assert [c["choices"][0]["text"] for c in got] == ["E11", ".9", ""] and "usage" not in got[-1]


def test_whole_answers_of_both_routes():
    chat, text = completion_body("icd10", DONE, chat=True), completion_body("icd10", DONE, chat=False)
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "E11.9"}
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "E11.9"
    assert text["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


@pytest.mark.parametrize("header, ok", [("Bearer k1", True), ("bearer  k1 ", True), ("Bearer k2", False),
                                        ("k1", False), ("", False)])
def test_only_a_bearer_key_with_a_known_hash_passes(header, ok):
    if ok:
        check_api_key(header, [hash_key("k1")])
        return
    with pytest.raises(APIError) as err:
        check_api_key(header, [hash_key("k1")])
    assert (err.value.status, err.value.code) == (401, "invalid_api_key")


def test_no_keys_configured_means_no_check():
    check_api_key("", [])

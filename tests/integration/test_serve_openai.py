"""The Serve app over real HTTP, driven by the real `openai` client: models, chat and completions for the
base and a trained adapter, and errors in the OpenAI format."""

import json
import urllib.error
import urllib.request

import openai
import pytest


@pytest.fixture(scope="module")
def client(ray_local, trained, free_port):
    from honed.config import ServeConfig
    from honed.serve import deploy

    cfg = ServeConfig(model=trained["config"].model, adapters={"icd10": trained["adapter"]},
                      port=free_port(), max_tokens=64)
    url = deploy.start(cfg)
    yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    deploy.stop()


def ask(client, model: str, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Which ICD-10-CM chapter contains code E11.9?"}],
        max_tokens=12, temperature=0, **kw)


def test_lists_base_and_adapter(client):
    assert sorted(m.id for m in client.models.list()) == ["base", "icd10"]


def test_base_and_adapter_answer_differently(client):
    base, tuned = ask(client, "base"), ask(client, "icd10")
    assert base.object == tuned.object == "chat.completion"
    assert base.choices[0].message.content != tuned.choices[0].message.content
    # the adapter answers with its training system prompt prepended, so its prompt is longer
    assert tuned.usage.prompt_tokens > base.usage.prompt_tokens
    assert tuned.usage.total_tokens == tuned.usage.prompt_tokens + tuned.usage.completion_tokens
    assert ask(client, "icd10").choices[0].message.content == tuned.choices[0].message.content  # greedy


def test_text_completion_route(client):
    out = client.completions.create(model="icd10", prompt="Code E11", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.usage.completion_tokens <= 5


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, "no-such-adapter")
    assert "served models: base, icd10" in err.value.body["message"]


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"temperature": 5}, "temperature"),
])
def test_invalid_fields_are_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}], **({"max_tokens": 4} | kwargs))
    assert err.value.body["param"] == param


def test_malformed_json_is_400(client):
    request = urllib.request.Request(str(client.base_url) + "chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 400
    assert json.loads(err.value.read())["error"]["type"] == "invalid_request_error"


def test_prompt_beyond_the_context_is_400(client):
    # the tiny model's context is 512 positions; its byte-level BPE spends about one token per character
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="base", prompt="x " * 2000, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"

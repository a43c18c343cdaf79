"""The own engine on a GPU (skipped without CUDA; `pytest -m gpu tests/gpu`, run by benchmarks/gpu/gpu_checks.py).

The decode loop on CUDA in the model's dtype (bf16: `dtype: auto`) with mixed adapters and temperature > 0:
each row samples with a generator on the device (a CPU generator cannot sample CUDA probabilities), a seed
reproduces a row whatever rows decode beside it, a diverged adapter's row fails alone and the device stays
usable (no device-side assert from `multinomial`). Where Ray is installed, the Serve app with one GPU per replica
then answers 16 concurrent sampled requests over four adapters and the base through the real `openai` client.
The CPU side of the same code is tests/unit/test_serve_row_failure.py."""

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from lora_adapters import write_adapter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ADAPTERS = ["alpha", "beta", "gamma", "delta"]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("gpu-adapters")
    dirs = {name: write_adapter(tiny_model, work / name, seed=i + 1) for i, name in enumerate(ADAPTERS)}
    return dirs | {"diverged": write_adapter(tiny_model, work / "diverged", seed=9, fill=1e38)}


@pytest.fixture(scope="module")
def replica(tiny_model, adapters):
    from honed.models import load_model, weights_hash
    from honed.serve.residency import AdapterResidency, AdapterStore

    model, tokenizer = load_model(tiny_model, "auto", "cuda")
    residency = AdapterResidency(model.eval(), weights_hash(tiny_model), AdapterStore(adapters))
    held = [residency.place(name) for name in adapters]  # as Serve's LRU holds them
    yield residency, tokenizer
    held.clear()
    residency.close()


def decode(residency, tokenizer, rows: list[tuple[str, float, int]]) -> list:
    """Each row's finished text, or the exception it failed with."""
    from honed.generation import DecodeJob, decode_steps

    ids = tokenizer("Which chapter holds code E11.9?", add_special_tokens=False)["input_ids"]
    jobs = [DecodeJob(ids, 12, temperature, 0.9, seed=seed, adapter=adapter) for adapter, temperature, seed in rows]
    results: list = [None] * len(jobs)
    for events in decode_steps(residency.live, tokenizer, jobs):
        for i, event in enumerate(events):
            if event and ("done" in event or "error" in event):
                results[i] = event["done"].text if "done" in event else event["error"]
    return results


def test_mixed_adapters_sample_on_the_device_in_bf16_and_a_diverged_row_fails_alone(replica):
    from honed.generation import BatchDecoder, DecodeJob, RowFailed

    residency, tokenizer = replica
    assert next(residency.model.parameters()).dtype == torch.bfloat16
    rows = [("alpha", 0.8, 1), ("beta", 1.0, 2), ("__base__", 0.7, 3), ("diverged", 0.8, 4), ("gamma", 0.0, 0),
            ("delta", 1.2, 5)]
    together = decode(residency, tokenizer, rows)
    assert isinstance(together[3], RowFailed) and "not finite" in str(together[3])
    assert all(isinstance(got, str) for i, got in enumerate(together) if i != 3)
    # bf16 kernels differ with the batch's shape, so a row is compared with the same batch, not with itself alone
    again = decode(residency, tokenizer, rows)
    assert [a for i, a in enumerate(again) if i != 3] == [a for i, a in enumerate(together) if i != 3]
    assert len(set(decode(residency, tokenizer, [("alpha", 1.5, seed) for seed in range(6)]))) > 1
    decoder = BatchDecoder(residency.live, tokenizer)
    decoder.add([DecodeJob([5, 6, 7], 4, 0.9, seed=1, adapter="alpha")])
    assert decoder.rows[0].generator.device.type == "cuda"
    assert decoder.cache.layers[0].keys.dtype == torch.bfloat16
    torch.cuda.synchronize()  # the device is still usable after the failed row


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray (the GPU check machine has none)")
def test_serve_on_a_gpu_answers_sixteen_concurrent_sampled_requests_over_mixed_adapters(
        ray_local, tiny_model, adapters, free_port):
    import openai

    from honed.config import ServeConfig
    from honed.serve import deploy

    healthy = {name: path for name, path in adapters.items() if name != "diverged"}
    cfg = ServeConfig(model={"name_or_path": tiny_model}, adapters=healthy,
                      num_gpus=1, num_cpus=0.5, port=free_port(), max_tokens=32, max_batch_size=16)
    client = openai.OpenAI(base_url=deploy.start(cfg), api_key="none", max_retries=0, timeout=300)
    try:
        def ask(k: int) -> str:
            model = (["base"] + ADAPTERS)[k % 5]
            return client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Which chapter holds E11.9?"}], max_tokens=16,
                temperature=0.9, seed=k).choices[0].message.content

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(16)))
        assert len(answers) == 16 and all(isinstance(a, str) for a in answers)
        assert len(set(answers)) > 5  # sampled, five models
    finally:
        deploy.stop()

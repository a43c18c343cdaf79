"""A row that cannot go on fails alone: the own engine's decode loop (honed.generation.BatchDecoder over the
replica's AdapterResidency, and the ContinuousBatcher in front of it) with a real tiny model, a healthy LoRA
adapter and a diverged one (finite factors so large that its activations overflow, as a run that blew up can
export them, or as bf16/fp16 on a GPU reaches sooner). The diverged request gets its error; every other row of
the same batch decodes exactly as it does alone. An adapter with NaN weights is refused when it loads (it would
turn every row to NaN). Also: sampling in the model's dtype (bfloat16 on CPU here), and a temperature too small
for float32 picking the argmax instead of failing."""

import asyncio

import pytest
import torch

from honed.generation import DecodeJob, RowFailed, decode_steps
from lora_adapters import write_adapter

QUESTION = "Which chapter holds code E11.9?"


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, str]:
    work = tmp_path_factory.mktemp("row-failure")
    return {"healthy": write_adapter(tiny_model, work / "healthy", seed=1),
            "diverged": write_adapter(tiny_model, work / "diverged", seed=2, fill=1e38),
            "nan": write_adapter(tiny_model, work / "nan", seed=3, fill=float("nan"))}


def residency_with(tiny_model: str, adapters: dict[str, str], dtype: str = "float32"):
    from honed.models import load_model, weights_hash
    from honed.serve.residency import AdapterResidency, AdapterStore

    torch.set_num_threads(1)  # same reductions batched and alone: same greedy tokens
    model, tokenizer = load_model(tiny_model, dtype, "cpu")
    residency = AdapterResidency(model.eval(), weights_hash(tiny_model), AdapterStore(adapters))
    residency.held_here = [residency.place(name) for name in adapters]  # as Serve's LRU holds them: they stay
    return residency, tokenizer


@pytest.fixture(scope="module")
def replica(tiny_model, adapters):
    residency, tokenizer = residency_with(tiny_model, {k: v for k, v in adapters.items() if k != "nan"})
    yield residency, tokenizer
    close(residency)


def close(residency) -> None:
    residency.held_here.clear()  # Serve's LRU lets go; then the model thread finishes and stops
    residency.close()


def jobs_for(tokenizer, rows: list[tuple[str, float, int]]) -> list[DecodeJob]:
    ids = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    return [DecodeJob(ids, 10, temperature, 1.0 if temperature == 0 else 0.9, seed=seed, adapter=adapter)
            for adapter, temperature, seed in rows]


def outcomes(model, tokenizer, jobs: list[DecodeJob]) -> list:
    """Each job's finished text, or the exception its row failed with."""
    results: list = [None] * len(jobs)
    for events in decode_steps(model, tokenizer, jobs):
        for i, event in enumerate(events):
            if event and ("done" in event or "error" in event):
                results[i] = event["done"].text if "done" in event else event["error"]
    return results


ROWS = [("__base__", 0.0, 0), ("healthy", 0.8, 11), ("diverged", 0.8, 12), ("healthy", 0.0, 0),
        ("diverged", 0.0, 0), ("__base__", 1.2, 13)]


def test_a_diverged_row_fails_alone_and_the_others_decode_as_they_would_alone(replica):
    residency, tokenizer = replica
    jobs = jobs_for(tokenizer, ROWS)
    together = outcomes(residency.live, tokenizer, jobs)
    for (adapter, _, _), job, got in zip(ROWS, jobs, together):
        if adapter == "diverged":
            assert isinstance(got, RowFailed) and "not finite" in str(got) and "diverged" in str(got), got
        else:
            assert got == outcomes(residency.live, tokenizer, [job])[0]
    assert together[1] != together[3] or together[0] != together[5]  # sampling did sample


def test_the_batcher_fails_only_the_diverged_request(replica):
    from honed.generation import BatchDecoder
    from honed.serve.batcher import ContinuousBatcher

    residency, tokenizer = replica
    jobs = jobs_for(tokenizer, ROWS)

    async def text_of(batcher, job) -> str:
        return "".join([event.get("text", "") async for event in batcher.submit(job)]).strip()

    async def main():
        batcher = ContinuousBatcher(lambda: BatchDecoder(residency.live, tokenizer), max_batch_size=8, wait_s=0.5,
                                    executor=residency.model_thread)
        results = await asyncio.gather(*(text_of(batcher, job) for job in jobs), return_exceptions=True)
        return results, batcher.counts

    results, counts = asyncio.run(main())
    alone = [outcomes(residency.live, tokenizer, [job])[0] for job in jobs]
    for (adapter, _, _), got, expected in zip(ROWS, results, alone):
        if adapter == "diverged":
            assert isinstance(got, RowFailed)
        else:
            assert got == expected
    # the six were prefilled in one forward; the diverged two left after it, the other four decoded on together
    assert counts["requests"] == 6 and counts["largest_batch"] == 4


def test_a_temperature_below_float32s_range_picks_the_argmax(replica):
    residency, tokenizer = replica
    rows = [("healthy", 0.0, 0), ("healthy", 1e-50, 4)]
    greedy, tiny = outcomes(residency.live, tokenizer, jobs_for(tokenizer, rows))
    assert tiny == greedy


def test_sampling_and_mixed_adapters_decode_in_the_models_dtype(tiny_model, adapters):
    from honed.generation import BatchDecoder

    healthy = {"healthy": adapters["healthy"]}
    residency, tokenizer = residency_with(tiny_model, healthy, dtype="bfloat16")
    try:
        decoder = BatchDecoder(residency.live, tokenizer)
        events = decoder.add(jobs_for(tokenizer, [("healthy", 0.9, 1), ("__base__", 0.7, 2), ("healthy", 0.0, 0)]))
        assert all("error" not in event for _, event in events)
        assert {layer.lora_a.dtype for layer in residency.lora.layers.values()} == {torch.bfloat16}
        assert decoder.cache.layers[0].keys.dtype == torch.bfloat16
        for _ in range(4):
            assert all("error" not in event for _, event in decoder.step())
    finally:
        close(residency)


def test_a_failure_after_the_stream_began_is_an_openai_error_event():
    import json

    from honed.serve.protocol import APIError, stream_events

    async def items():
        yield {"text": "Chapter"}
        raise APIError(500, "decoding failed: scores not finite", None, "decode_failed")

    async def main():
        return [chunk async for chunk in stream_events("m", items(), chat=True, include_usage=False)]

    chunks = asyncio.run(main())
    assert json.loads(chunks[1].removeprefix("data: "))["choices"][0]["delta"]["content"] == "Chapter"
    error = json.loads(chunks[-1].removeprefix("data: "))["error"]
    assert error == {"message": "decoding failed: scores not finite", "type": "server_error", "param": None,
                     "code": "decode_failed"}
    assert "data: [DONE]\n\n" not in chunks  # the stream did not end as a finished answer


def test_an_adapter_with_nan_weights_is_refused_when_it_loads(replica, adapters):
    from honed.serve.protocol import APIError

    residency, tokenizer = replica
    residency.store.adapters["nan"] = adapters["nan"]
    with pytest.raises(APIError) as err:
        residency.place("nan")
    assert err.value.status == 500 and err.value.code == "adapter_load_failed"
    assert "NaN or infinite weights" in err.value.message and "nan" not in residency.lora.slots
    healthy = outcomes(residency.live, tokenizer, jobs_for(tokenizer, [("healthy", 0.0, 0)]))
    assert isinstance(healthy[0], str)  # the replica's model is as it was

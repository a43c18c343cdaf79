"""Which adapters a model replica keeps placed on its model (honed.serve.residency.AdapterResidency, without
Ray Serve): one stays while Serve's LRU holds it or a request decodes with it, and leaves when neither does,
whatever order the LRU's evictions, the requests' releases and the model thread's queued work come in.

The calls are the ones Serve and the request path make (`place` on the model thread, the LRU's `evict` through
the LoadedAdapter it drops, `acquire` once a request has its adapter, `release` when it ends), driven by hand so
each interleaving is exact."""

import json
import shutil
import subprocess
import sys
import threading

import pytest
import torch

ADAPTER = "gamma"


@pytest.fixture(scope="module")
def adapter_dir(tiny_model, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    from honed.models import load_model

    model, _ = load_model(tiny_model, "float32", "cpu")
    torch.manual_seed(3)
    target = tmp_path_factory.mktemp("residency") / "gamma"
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False)).save_pretrained(target)
    return str(target)


def new_residency(tiny_model, adapter_dirs: dict[str, str]):
    from honed.models import load_model, weights_hash
    from honed.serve.residency import AdapterResidency, AdapterStore

    model, _ = load_model(tiny_model, "float32", "cpu")
    return AdapterResidency(model, weights_hash(tiny_model), AdapterStore(adapter_dirs))


@pytest.fixture
def residency(tiny_model, adapter_dir):
    residency = new_residency(tiny_model, {ADAPTER: adapter_dir})
    yield residency
    residency.close()


def drain(residency) -> None:
    """Wait for everything queued on the model thread so far."""
    residency.model_thread.submit(lambda: None).result(timeout=60)


def evict(loaded) -> None:
    loaded.__del__()  # what Serve's LRU does to the object it drops


def placed(residency) -> bool:
    return ADAPTER in residency.lora.slots


def test_the_model_thread_sets_the_replicas_torch_thread_count_on_itself(tiny_model, adapter_dir, monkeypatch):
    """A thread started in a process whose OMP_NUM_THREADS is below torch's count (Ray sets num_cpus there)
    ran its matmuls at about one thread's speed while torch reported the count (a 2048² matmul at 2 threads:
    200 vs 110 ms, benchmarked), so the model thread sets the count the replica chose before its first call."""
    real, calls = torch.set_num_threads, []

    def recorded(n):
        calls.append((threading.current_thread().name, n))
        real(n)

    monkeypatch.setattr(torch, "set_num_threads", recorded)
    chosen = torch.get_num_threads()
    residency = new_residency(tiny_model, {ADAPTER: adapter_dir})
    try:
        drain(residency)
        assert calls == [("honed-model_0", chosen)]
    finally:
        residency.close()


def test_a_reload_queued_before_the_last_release_is_not_undone_by_that_release(residency):
    """The interleaving CI met: A decodes with the adapter; the LRU evicts it; B asks for it again, and B's load
    waits on the busy model thread; A ends; B's load runs, then the unload A's end queued. B's request marks
    the adapter in use only after its load returns, so that unload must see the LRU holding it again."""
    a = residency.place(ADAPTER)
    residency.acquire(a.name)
    evict(a)
    assert placed(residency)  # A still decodes with it

    busy = threading.Event()
    residency.model_thread.submit(busy.wait)  # the model thread is in a decode step
    b_load = residency.model_thread.submit(residency.place, ADAPTER)
    residency.release(ADAPTER)  # A ends while B's load waits
    busy.set()
    b = b_load.result(timeout=60)
    drain(residency)  # the unload A's end may have queued has run
    assert placed(residency), "B's adapter was unloaded under it"
    residency.acquire(b.name)
    residency.lora.select([ADAPTER], "__base__")  # B's decode step finds its slot

    residency.release(ADAPTER)
    drain(residency)
    assert placed(residency)  # the LRU still holds it
    evict(b)
    drain(residency)
    assert not placed(residency) and not residency.held and not residency.in_use


def test_an_adapter_evicted_while_in_use_leaves_when_its_last_request_ends(residency):
    a = residency.place(ADAPTER)
    residency.acquire(a.name)
    residency.acquire(a.name)
    evict(a)
    residency.release(ADAPTER)
    drain(residency)
    assert placed(residency)  # one request still decodes
    residency.release(ADAPTER)
    drain(residency)
    assert not placed(residency)


def test_an_adapter_asked_for_again_before_its_unload_runs_stays(residency):
    a = residency.place(ADAPTER)
    busy = threading.Event()
    residency.model_thread.submit(busy.wait)
    evict(a)  # unused: its unload is queued behind the busy model thread
    b_load = residency.model_thread.submit(residency.place, ADAPTER)
    busy.set()
    b = b_load.result(timeout=60)
    drain(residency)
    assert placed(residency) and residency.held == {ADAPTER} and b.name == ADAPTER


def test_an_unused_adapter_leaves_when_evicted_and_a_later_request_loads_it_afresh(residency):
    a = residency.place(ADAPTER)
    slot = residency.lora.slots[ADAPTER]
    evict(a)
    drain(residency)
    assert not placed(residency) and not residency.adapter_meta
    b = residency.place(ADAPTER)  # held by the LRU (dropping the object would count as an eviction)
    assert residency.lora.slots[ADAPTER] == slot and residency.held == {ADAPTER} and b.meta == a.meta


def test_the_model_forward_routes_rows_to_the_adapter_loaded_through_the_async_loader(residency):
    import asyncio

    from honed.generation import BASE

    loaded = asyncio.run(residency.load(ADAPTER))
    ids = torch.tensor([[1, 2, 3], [1, 2, 3]])
    with torch.no_grad():
        logits = residency.live(adapter_names=[ADAPTER, BASE], input_ids=ids).logits
        alone = residency.live(input_ids=ids[:1]).logits
    assert torch.allclose(logits[1], alone[0], atol=1e-5) and not torch.allclose(logits[0], logits[1], atol=1e-3)
    assert residency.resident() == [ADAPTER] and loaded.meta == {}


def refusal(residency, name: str):
    from honed.serve.protocol import APIError

    with pytest.raises(APIError) as err:
        residency.place(name)
    assert residency.resident() == [] and not residency.held and not residency.adapter_meta
    return err.value


def test_refused_adapters_leave_the_model_as_it_was(tiny_model, adapter_dir, tmp_path):
    foreign, broken = tmp_path / "foreign", tmp_path / "broken"
    shutil.copytree(adapter_dir, foreign)
    (foreign / "honed.json").write_text(json.dumps({"base_weights_sha256": "0" * 64}))
    shutil.copytree(adapter_dir, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    residency = new_residency(tiny_model, {"foreign": str(foreign), "broken": str(broken), "gone": str(tmp_path)})
    try:
        refused = {name: refusal(residency, name) for name in ["nope", "foreign", "broken", "gone"]}
    finally:
        residency.close()
    assert (refused["nope"].status, refused["nope"].code) == (404, "model_not_found")
    assert (refused["foreign"].status, refused["foreign"].code) == (400, "base_mismatch")
    assert (refused["broken"].status, refused["broken"].code) == (500, "adapter_load_failed")
    assert (refused["gone"].status, refused["gone"].code) == (500, "adapter_load_failed")
    assert "not an adapter directory" in refused["gone"].message


def test_residency_and_protocol_import_without_ray_serve_and_serve_without_the_training_driver():
    code = ("import sys, honed.serve.residency, honed.serve.protocol; assert 'ray.serve' not in sys.modules; "
            "import honed.serve.app; assert not [m for m in sys.modules if m.startswith('honed.train')]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)

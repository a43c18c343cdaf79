"""Which adapters a model replica keeps placed on its model (honed.serve.app.ModelServer): one stays while
Serve's LRU holds it or a request decodes with it, and leaves when neither does, whatever order the LRU's
evictions, the requests' releases and the model thread's queued work come in.

The calls are the ones Serve and the request path make (`_load_adapter` on the model thread, the LRU's
`unload_adapter`, `_acquire` once a request has its adapter, `_release` when it ends), driven by hand so each
interleaving is exact."""

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


@pytest.fixture
def server(tiny_model, adapter_dir):
    from honed.serve.app import ModelServer

    replica = ModelServer.func_or_class({"model": {"name_or_path": tiny_model}, "adapters": {ADAPTER: adapter_dir}},
                                        tiny_model)
    yield replica
    replica.model_thread.shutdown(wait=True)


def drain(server) -> None:
    """Wait for everything queued on the model thread so far."""
    server.model_thread.submit(lambda: None).result(timeout=60)


def evict(server, loaded) -> None:
    loaded.__del__()  # what Serve's LRU does to the object it drops


def placed(server) -> bool:
    return ADAPTER in server.lora.slots


def test_a_reload_queued_before_the_last_release_is_not_undone_by_that_release(server):
    """The interleaving CI met: A decodes with the adapter; the LRU evicts it; B asks for it again, and B's load
    waits on the busy model thread; A ends; B's load runs, then the unload A's end queued. B's request marks
    the adapter in use only after its load returns, so that unload must see the LRU holding it again."""
    a = server._load_adapter(ADAPTER)
    server._acquire(a.name)
    evict(server, a)
    assert placed(server)  # A still decodes with it

    busy = threading.Event()
    server.model_thread.submit(busy.wait)  # the model thread is in a decode step
    b_load = server.model_thread.submit(server._load_adapter, ADAPTER)
    server._release(ADAPTER)  # A ends while B's load waits
    busy.set()
    b = b_load.result(timeout=60)
    drain(server)  # the unload A's end may have queued has run
    assert placed(server), "B's adapter was unloaded under it"
    server._acquire(b.name)
    server.lora.select([ADAPTER], "__base__")  # B's decode step finds its slot

    server._release(ADAPTER)
    drain(server)
    assert placed(server)  # the LRU still holds it
    evict(server, b)
    drain(server)
    assert not placed(server) and not server.held and not server.in_use


def test_an_adapter_evicted_while_in_use_leaves_when_its_last_request_ends(server):
    a = server._load_adapter(ADAPTER)
    server._acquire(a.name)
    server._acquire(a.name)
    evict(server, a)
    server._release(ADAPTER)
    drain(server)
    assert placed(server)  # one request still decodes
    server._release(ADAPTER)
    drain(server)
    assert not placed(server)


def test_an_adapter_asked_for_again_before_its_unload_runs_stays(server):
    a = server._load_adapter(ADAPTER)
    busy = threading.Event()
    server.model_thread.submit(busy.wait)
    evict(server, a)  # unused: its unload is queued behind the busy model thread
    b_load = server.model_thread.submit(server._load_adapter, ADAPTER)
    busy.set()
    b = b_load.result(timeout=60)
    drain(server)
    assert placed(server) and server.held == {ADAPTER} and b.name == ADAPTER


def test_an_unused_adapter_leaves_when_evicted_and_a_later_request_loads_it_afresh(server):
    a = server._load_adapter(ADAPTER)
    slot = server.lora.slots[ADAPTER]
    evict(server, a)
    drain(server)
    assert not placed(server) and not server.adapter_meta
    b = server._load_adapter(ADAPTER)  # held by the LRU (dropping the object would count as an eviction)
    assert server.lora.slots[ADAPTER] == slot and server.held == {ADAPTER} and b.meta == a.meta

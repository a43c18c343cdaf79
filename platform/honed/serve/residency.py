"""Which LoRA adapters sit on a replica's model, and when they may leave: adapter residency, without Ray.

    adapters = AdapterResidency(model, weights_hash(path), AdapterStore({"icd10": "runs/train/adapter"}, registry))
    loaded = await adapters.load("icd10")          # on the model thread; Serve's LRU holds `loaded`
    adapters.acquire(loaded.name)                  # a request decodes with it ...
    adapters.release(loaded.name)                  # ... and is done
    del loaded                                     # the LRU evicted it: it leaves once no request uses it
    BatchDecoder(adapters.live, tokenizer)         # decodes rows of any resident adapters in one forward

An adapter stays placed (honed.serve.lora.MultiLora) while Serve's LRU holds it or a request decodes with it,
and leaves when neither does, whatever order evictions, releases and the model thread's queued work come in.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from honed.artifacts import read_adapter_meta
from honed.generation import BASE
from honed.serve.lora import AdapterNotServable, MultiLora
from honed.serve.protocol import APIError

if TYPE_CHECKING:
    from honed.registry import Registry


class AdapterStore:
    """Where a served adapter's files are: the config's `adapters` (name → dir) first, then the registry
    (`name`, `name@N`), if there is one."""

    def __init__(self, adapters: dict[str, str], registry: Registry | None = None):
        self.adapters, self.registry = adapters, registry

    def local_dir(self, model_id: str) -> str:
        if model_id in self.adapters:
            return self.adapters[model_id]
        if self.registry is None:
            raise APIError(404, f"model '{model_id}' is not served here", "model", "model_not_found")
        return self.registry.local_dir(model_id)


class LoadedAdapter:
    """An adapter placed on the model, as Serve's LRU holds it: Serve calls __del__ when the LRU evicts it (and
    Python does when the object is dropped)."""

    def __init__(self, residency: AdapterResidency, name: str, meta: dict):
        self.residency, self.name, self.meta = residency, name, meta

    def __del__(self):
        if self.residency is not None:
            self.residency.evict(self.name)
            self.residency = None


class LiveModel:
    """The model for the decode loop: routes each forward's rows to their adapters (or the base) under the
    residency lock, so adapters are placed or removed only between decode steps."""

    def __init__(self, residency: AdapterResidency):
        self.residency = residency

    def parameters(self):
        return self.residency.model.parameters()

    def __call__(self, adapter_names: list[str] | None = None, **inputs):
        with self.residency.lock:
            self.residency.lora.select(adapter_names or [BASE] * inputs["input_ids"].shape[0], BASE)
            return self.residency.model(**inputs)


class AdapterResidency:
    """The adapters placed on `model` (trained on weights hashing to `base_sha256`), found through `store`."""

    def __init__(self, model, base_sha256: str, store: AdapterStore):
        self.model, self.base_sha256, self.store = model, base_sha256, store
        self.lora = MultiLora(model)
        self.live = LiveModel(self)
        # `held` and `in_use` are read and changed under `lock`; an unload checks them again when it runs.
        self.lock = threading.Lock()
        self.held: set[str] = set()  # adapters Serve's LRU holds (loaded and not evicted since)
        self.in_use: collections.Counter[str] = collections.Counter()  # adapter → requests decoding with it
        self.adapter_meta: dict[str, dict] = {}  # placed adapter → its honed.json
        # Every call into torch (decode steps, adapter loads and unloads) runs on this one thread: OpenMP gives
        # each calling thread a team of its own, and work hopping between pool threads decoded 40 % slower.
        # The thread sets the replica's torch thread count itself: a thread started in a process whose
        # OMP_NUM_THREADS is below it (Ray sets num_cpus there: 1 on a 1-CPU replica running 2 torch threads)
        # ran its matmuls at about one thread's speed, though torch reported 2 (a 2048² matmul 200 vs 110 ms).
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="honed-model",
                                               initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))

    async def load(self, model_id: str) -> LoadedAdapter:
        """`place` on the model thread: Serve's multiplexed loader."""
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, self.place, model_id)

    def place(self, model_id: str) -> LoadedAdapter:
        """Read, check and place one adapter; a failure (APIError) leaves the model as it was. Call it on the
        model thread."""
        with self.lock:
            if model_id in self.lora.slots:  # evicted while requests decode with it, or its unload has not run yet
                self.held.add(model_id)
                return LoadedAdapter(self, model_id, self.adapter_meta[model_id])
        path, meta = self._read(model_id)
        with self.lock:
            try:
                self.lora.load(model_id, path)
            except AdapterNotServable as err:
                raise APIError(400, f"adapter '{model_id}' cannot be served per request: {err}", "model",
                               "adapter_type_not_served") from None
            except Exception as err:  # noqa: BLE001
                raise load_failed(model_id, err) from None
            self.held.add(model_id)
            self.adapter_meta[model_id] = meta
        return LoadedAdapter(self, model_id, meta)

    def _read(self, model_id: str) -> tuple[str, dict]:
        """The adapter's dir and honed.json, refused if it was trained on other base weights."""
        try:
            path = self.store.local_dir(model_id)
            meta = read_adapter_meta(path)
        except APIError:
            raise
        except Exception as err:  # noqa: BLE001 — any unreadable adapter is this request's error, not the replica's
            raise load_failed(model_id, err) from None
        refuse_other_base(model_id, meta, self.base_sha256)
        return path, meta

    def evict(self, name: str) -> None:
        """Serve's LRU dropped `name`: it leaves the model once no request decodes with it."""
        with self.lock:
            self.held.discard(name)
        self._unload_if_unwanted(name)

    def acquire(self, name: str) -> None:
        """A request decodes with `name` until `release`: it stays on the model meanwhile."""
        with self.lock:
            self.in_use[name] += 1

    def release(self, name: str) -> None:
        with self.lock:
            self.in_use[name] -= 1
            if not self.in_use[name]:
                del self.in_use[name]
        self._unload_if_unwanted(name)

    def resident(self) -> list[str]:
        """The adapters on the model now."""
        with self.lock:
            return sorted(self.lora.slots)

    def close(self) -> None:
        """Finish the model thread's queued work and stop it."""
        self.model_thread.shutdown(wait=True)

    def _unload_if_unwanted(self, name: str) -> None:
        with self.lock:
            if name in self.held or self.in_use[name]:
                return
        self.model_thread.submit(self._unload, name)

    def _unload(self, name: str) -> None:
        # Queued behind whatever the model thread had to do: a load of `name` may have run meanwhile and its
        # request not yet marked it in use, but the LRU then holds it again.
        with self.lock:
            if name not in self.held and not self.in_use[name]:
                self.lora.unload(name)
                self.adapter_meta.pop(name, None)


def refuse_other_base(model_id: str, meta: dict, base_sha256: str) -> None:
    """400 when the adapter's honed.json records other base weights than the served base's."""
    expected = meta.get("base_weights_sha256")
    if expected and expected != base_sha256:
        raise APIError(400, f"adapter '{model_id}' was trained on other base weights ({expected[:12]}…) than "
                            f"the served base ({base_sha256[:12]}…)", "model", "base_mismatch")


def load_failed(model_id: str, err: Exception) -> APIError:
    return APIError(500, f"adapter '{model_id}' could not be loaded: {type(err).__name__}: {err}", "model",
                    "adapter_load_failed")

"""Continuous batching of one replica's requests, whatever model or adapter each names.

Ray Serve's `@serve.batch` splits every batch by multiplexed model id (one sub-batch per adapter), which is
the opposite of what a replica holding many LoRA adapters wants: one forward for all of them. It is also
static: a batch decodes to its last row while new requests wait. `ContinuousBatcher` keeps one running batch
(a decoder: `add(jobs, keys)`, `step()`, `drop(keys)`, `len()`, `can_join`, as honed.generation.BatchDecoder):
requests that arrive join it between two steps, up to `max_batch_size` rows; finished rows leave at once; a
client that goes away frees its row; a row that fails alone (`{"error": exc}`) fails its request only.
Decoding runs off the event loop, so streams flow while it works.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any

_END = object()


class ContinuousBatcher:
    def __init__(self, new_decoder: Callable[[], Any], max_batch_size: int, wait_s: float,
                 on_step: Callable[[Any], None] | None = None, executor: Executor | None = None):
        """`executor`: where adds and steps run (default: asyncio's pool). Give every call into the model the
        same single thread: with OpenMP each calling thread gets its own team of worker threads, and steps
        hopping between pool threads ran 40 % slower on 2 cores."""
        self.new_decoder, self.max_batch_size, self.wait_s = new_decoder, max_batch_size, wait_s
        self.on_step, self.executor = on_step, executor
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.cancelled: set[asyncio.Queue] = set()
        self.counts: Counter = Counter()  # steps, row_steps (rows summed over steps), largest_batch, requests
        # seconds: the model thread's adds (add_s: prefills) and steps (step_s), and busy_s, the time batches held
        # rows; busy_s - add_s - step_s is the loop's share (handing calls over, events out to the requests)
        self.seconds: Counter = Counter()

    async def submit(self, job: Any) -> AsyncIterator[Any]:
        """The events of `job` (its row's `(key, event)` events, without the key) until it is done."""
        if self.worker is None or self.worker.done():  # created lazily: it must live on the replica's loop
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._work())
        events: asyncio.Queue = asyncio.Queue()
        await self.queue.put((job, events))
        finished = False
        try:
            while (event := await events.get()) is not _END:
                if isinstance(event, BaseException):
                    raise event
                yield event
            finished = True
        finally:
            if not finished:  # the caller stopped listening (client gone): free the row
                self.cancelled.add(events)

    async def _work(self) -> None:
        decoder, busy_since = None, None
        while True:
            if decoder is None or not len(decoder):
                if busy_since is not None:
                    self.seconds["busy_s"] += time.perf_counter() - busy_since
                decoder = self.new_decoder()
                pending = await self._gather()
                busy_since = time.perf_counter()
            elif decoder.can_join:
                pending = self._take(self.max_batch_size - len(decoder))
            else:
                pending = []
            if pending:
                self.counts.update(requests=len(pending))
                outs = [out for _, out in pending]
                await self._run(decoder.add, [job for job, _ in pending], outs, touched=outs, kind="add_s")
            if self.cancelled:
                gone = [key for key in decoder.keys if key in self.cancelled]
                if gone:
                    decoder.drop(gone)
                self.cancelled.clear()
            if len(decoder):
                self.counts.update(steps=1, row_steps=len(decoder))
                self.counts["largest_batch"] = max(self.counts["largest_batch"], len(decoder))
                if self.on_step is not None:
                    self.on_step(decoder)
                if not await self._run(decoder.step, touched=list(decoder.keys), kind="step_s"):
                    decoder.drop(list(decoder.keys))

    async def _gather(self) -> list:
        """The first request, and whatever else arrives within `wait_s` (up to `max_batch_size`)."""
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch_size:
            batch += self._take(self.max_batch_size - len(batch))
            remaining = deadline - loop.time()
            if len(batch) >= self.max_batch_size or remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    def _take(self, n: int) -> list:
        taken = []
        while len(taken) < n and not self.queue.empty():
            taken.append(self.queue.get_nowait())
        return taken

    async def _run(self, fn: Callable, *args, touched: list, kind: str) -> bool:
        """Run one add or step on the executor and hand out its events; if it fails, the requests it
        `touched` (their event queues) get the error and end. Whether it succeeded. Its seconds on the model
        thread add to `seconds[kind]`."""
        def timed(*a):
            start = time.perf_counter()
            try:
                return fn(*a)
            finally:
                self.seconds[kind] += time.perf_counter() - start

        try:
            events = await asyncio.get_running_loop().run_in_executor(self.executor, timed, *args)
        except Exception as err:  # noqa: BLE001 — the requests of the failed add / step learn why
            for out in touched:
                out.put_nowait(err)
                out.put_nowait(_END)
            return False
        for out, event in events:
            out.put_nowait(event.get("error", event))  # a row that failed alone: its request gets the error
            if "done" in event or "error" in event:
                out.put_nowait(_END)
        return True

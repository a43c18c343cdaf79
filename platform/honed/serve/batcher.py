"""Batches of concurrent requests for one replica, whatever model or adapter each names.

Ray Serve's `@serve.batch` splits every batch by multiplexed model id (one sub-batch per adapter), which is
the opposite of what a replica holding many LoRA adapters wants: one forward for all of them. `StepBatcher`
collects the jobs that arrive within `wait_s` (up to `max_batch_size`), runs their decode steps off the event
loop, and hands each request its own events as the steps complete, so streams flow while the batch decodes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

_END = object()


class StepBatcher:
    """`run_batch(jobs)` yields, after each step, one event per job (None once that job has nothing more)."""

    def __init__(self, run_batch: Callable[[list[Any]], Iterator[list[Any]]], max_batch_size: int, wait_s: float):
        self.run_batch, self.max_batch_size, self.wait_s = run_batch, max_batch_size, wait_s
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None

    async def submit(self, job: Any) -> AsyncIterator[Any]:
        """The events of `job`, decoded in a batch with whatever other jobs arrive meanwhile."""
        if self.worker is None or self.worker.done():  # created lazily: it must live on the replica's loop
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._work())
        events: asyncio.Queue = asyncio.Queue()
        await self.queue.put((job, events))
        while (event := await events.get()) is not _END:
            if isinstance(event, BaseException):
                raise event
            yield event

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_batch_size:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            await self._decode(batch)

    async def _decode(self, batch: list[tuple[Any, asyncio.Queue]]) -> None:
        try:
            steps = self.run_batch([job for job, _ in batch])
            while (events := await asyncio.to_thread(next, steps, None)) is not None:
                for (_, out), event in zip(batch, events):
                    if event is not None:
                        out.put_nowait(event)
        except Exception as err:  # noqa: BLE001 — every request of the batch learns why it failed
            for _, out in batch:
                out.put_nowait(err)
        finally:
            for _, out in batch:
                out.put_nowait(_END)

"""StepBatcher: concurrent jobs share batches, each request gets exactly its own events, failures reach every
request of their batch, and the worker keeps serving after one."""

import asyncio

import pytest

from honed.serve.batcher import StepBatcher


def counting_steps(batches: list[list[int]]):
    def run(jobs: list[int]):
        batches.append(list(jobs))
        for step in range(max(jobs)):  # job n yields n events, then None
            yield [f"{job}:{step}" if step < job else None for job in jobs]
    return run


async def collect(batcher: StepBatcher, job) -> list:
    return [event async for event in batcher.submit(job)]


def test_concurrent_jobs_share_a_batch_and_get_only_their_events():
    batches: list[list[int]] = []

    async def main():
        batcher = StepBatcher(counting_steps(batches), max_batch_size=8, wait_s=0.05)
        return await asyncio.gather(*(collect(batcher, n) for n in (3, 1, 2)))

    results = asyncio.run(main())
    assert results == [["3:0", "3:1", "3:2"], ["1:0"], ["2:0", "2:1"]]
    assert batches == [[3, 1, 2]]


def test_batches_are_capped_at_max_batch_size():
    batches: list[list[int]] = []

    async def main():
        batcher = StepBatcher(counting_steps(batches), max_batch_size=2, wait_s=0.05)
        return await asyncio.gather(*(collect(batcher, n) for n in (1, 1, 1, 1, 1)))

    assert asyncio.run(main()) == [["1:0"]] * 5
    assert [len(b) for b in batches] == [2, 2, 1]


def test_a_failing_batch_fails_its_requests_and_the_next_batch_runs():
    def run(jobs):
        if "bad" in jobs:
            raise RuntimeError("decode failed")
        yield ["ok" for _ in jobs]

    async def main():
        batcher = StepBatcher(run, max_batch_size=4, wait_s=0.02)
        failed = await asyncio.gather(collect(batcher, "bad"), collect(batcher, "x"), return_exceptions=True)
        return failed, await collect(batcher, "y")

    failed, later = asyncio.run(main())
    assert all(isinstance(f, RuntimeError) and "decode failed" in str(f) for f in failed)
    assert later == ["ok"]


@pytest.mark.parametrize("wait_s", [0.0, 0.01])
def test_a_lone_request_is_not_held_back(wait_s):
    async def main():
        batcher = StepBatcher(counting_steps([]), max_batch_size=8, wait_s=wait_s)
        return await asyncio.wait_for(collect(batcher, 2), timeout=5)

    assert asyncio.run(main()) == ["2:0", "2:1"]

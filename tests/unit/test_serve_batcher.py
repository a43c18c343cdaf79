"""ContinuousBatcher with a counting decoder: concurrent requests share steps, late requests join the running
batch between steps (never past max_batch_size), each request gets exactly its own events, a client that goes
away frees its row, and failures reach exactly the requests they touched while the worker keeps serving."""

import asyncio
import time

import pytest

from honed.serve.batcher import ContinuousBatcher


class CountingDecoder:
    """Job n decodes n tokens "n:0".."n:{n-1}"; "bad" fails the add, "boom" fails a step."""

    log: list = []

    def __init__(self):
        self.rows: dict = {}  # key → [job, produced]
        self.can_join = True

    @property
    def keys(self):
        return list(self.rows)

    def __len__(self):
        return len(self.rows)

    def add(self, jobs, keys):
        if "bad" in jobs:
            raise ValueError("bad prompt")
        CountingDecoder.log.append(("add", list(jobs), len(self.rows)))
        for job, key in zip(jobs, keys):
            self.rows[key] = [job, 0]
        return self._advance(keys)

    def step(self):
        if any(job == "boom" for job, _ in self.rows.values()):
            raise RuntimeError("step failed")
        CountingDecoder.log.append(("step", len(self.rows)))
        time.sleep(0.001)  # a step takes time, as a forward does
        return self._advance(list(self.rows))

    def drop(self, keys):
        for key in keys:
            self.rows.pop(key, None)

    def _advance(self, keys):
        events = []
        for key in keys:
            job, n = self.rows[key]
            limit = job if isinstance(job, int) else 2
            event = {"text": f"{job}:{n}"} | ({"done": True} if n + 1 >= limit else {})
            events.append((key, event))
            if "done" in event:
                del self.rows[key]
            else:
                self.rows[key][1] = n + 1
        return events


async def texts(batcher, job) -> list[str]:
    return [e["text"] async for e in batcher.submit(job)]


@pytest.fixture(autouse=True)
def fresh_log():
    CountingDecoder.log = []


def test_concurrent_requests_share_steps_and_get_only_their_events():
    async def main():
        batcher = ContinuousBatcher(CountingDecoder, max_batch_size=8, wait_s=0.05)
        return await asyncio.gather(*(texts(batcher, n) for n in (3, 1, 2))), batcher

    results, batcher = asyncio.run(main())
    assert results == [["3:0", "3:1", "3:2"], ["1:0"], ["2:0", "2:1"]]
    assert CountingDecoder.log[0] == ("add", [3, 1, 2], 0)
    assert batcher.counts["steps"] == 2 and batcher.counts["largest_batch"] == 2 and batcher.counts["requests"] == 3


def test_the_batcher_times_the_model_thread_and_its_own_share():
    """`seconds`: the model thread's adds and steps (each step sleeps 1 ms), and the time the batch held rows,
    which holds them and the loop's share besides."""
    async def main():
        batcher = ContinuousBatcher(CountingDecoder, max_batch_size=8, wait_s=0.0)
        await texts(batcher, 20)  # one add and 19 steps, then the batch is empty
        await texts(batcher, 1)  # a new batch: the first one's busy time is counted
        return batcher

    seconds = asyncio.run(main()).seconds
    assert seconds["step_s"] >= 19 * 0.001 and seconds["add_s"] > 0
    assert seconds["busy_s"] >= seconds["step_s"] - 0.001  # the last add of the second batch is not in it yet


def test_a_late_request_joins_the_running_batch_and_the_cap_holds():
    async def main():
        batcher = ContinuousBatcher(CountingDecoder, max_batch_size=2, wait_s=0.0)

        async def late(job, delay):
            await asyncio.sleep(delay)
            return await texts(batcher, job)

        slow = asyncio.create_task(texts(batcher, 200))
        await asyncio.sleep(0.05)
        return await asyncio.gather(slow, late(3, 0), late(2, 0)), batcher

    (slow, three, two), batcher = asyncio.run(main())
    assert len(slow) == 200 and three == ["3:0", "3:1", "3:2"] and two == ["2:0", "2:1"]
    joins = [entry for entry in CountingDecoder.log if entry[0] == "add"]
    assert joins[0] == ("add", [200], 0) and ("add", [3], 1) in joins  # joined a running row
    assert batcher.counts["largest_batch"] == 2  # never three rows


def test_a_client_that_goes_away_frees_its_row():
    async def main():
        batcher = ContinuousBatcher(CountingDecoder, max_batch_size=4, wait_s=0.0)
        stream = batcher.submit(1000)
        first = await stream.__anext__()
        await stream.aclose()
        rest = await texts(batcher, 2)  # runs after the abandoned row was dropped
        return first, rest

    first, rest = asyncio.run(main())
    assert first["text"] == "1000:0" and rest == ["2:0", "2:1"]
    assert sum(1 for entry in CountingDecoder.log if entry[0] == "step") < 100


def test_failures_reach_the_requests_they_touched_and_the_worker_goes_on():
    async def main():
        batcher = ContinuousBatcher(CountingDecoder, max_batch_size=4, wait_s=0.02)
        bad = await asyncio.gather(texts(batcher, "bad"), return_exceptions=True)
        boom = await asyncio.gather(texts(batcher, "boom"), return_exceptions=True)
        return bad, boom, await texts(batcher, 2)

    (bad,), (boom,), later = asyncio.run(main())
    assert isinstance(bad, ValueError) and "bad prompt" in str(bad)
    assert isinstance(boom, RuntimeError) and "step failed" in str(boom)
    assert later == ["2:0", "2:1"]


@pytest.mark.parametrize("wait_s", [0.0, 0.01])
def test_a_lone_request_is_not_held_back(wait_s):
    async def main():
        batcher = ContinuousBatcher(CountingDecoder, max_batch_size=8, wait_s=wait_s)
        return await asyncio.wait_for(texts(batcher, 2), timeout=5)

    assert asyncio.run(main()) == ["2:0", "2:1"]

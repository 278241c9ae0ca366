"""bertray.batching: continuous batching driven with a stand-in model whose passes the test holds and releases.

No Ray and no HTTP: the batcher is plain asyncio, so the order of events is under the test's control."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bertray.batching import Batcher


class Model:
    """Records each pass's items; answers `item * 10`. Passes block while `hold` is clear; an item "BAD" makes the
    whole pass raise, as a text that breaks the model would."""

    def __init__(self, held: bool = False):
        self.passes: list[list] = []
        self.hold = threading.Event()
        if not held:
            self.hold.set()
        self.started = threading.Event()

    def __call__(self, items: list) -> list:
        self.passes.append(list(items))
        self.started.set()
        assert self.hold.wait(30), "the test never released the pass"
        if "BAD" in items:
            raise ValueError("the model cannot take 'BAD'")
        return [item * 10 for item in items]


async def started(model: Model, passes: int) -> None:
    """Wait until `passes` passes have begun in the model thread."""
    for _ in range(3000):
        if len(model.passes) >= passes:
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"{len(model.passes)} passes began, expected {passes}")


async def first_pass_held(max_items: int):
    """A batcher whose first pass (of the item 0) is running, held until the test sets model.hold."""
    model = Model(held=True)
    b = Batcher(model, max_items=max_items)
    first = asyncio.create_task(b.submit([0]))
    await started(model, 1)
    return model, b, first


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_requests_arriving_during_a_pass_share_the_next_one():
    async def main():
        model = Model(held=True)
        b = Batcher(model, max_items=32)
        first = asyncio.create_task(b.submit([1]))
        await started(model, 1)
        later = [asyncio.create_task(b.submit([i, i + 1])) for i in (10, 20, 30)]
        await asyncio.sleep(0.05)
        assert b.queued_items() == 6  # waiting for the model, not run in passes of their own
        model.hold.set()
        answers = await asyncio.gather(first, *later)
        assert model.passes == [[1], [10, 11, 20, 21, 30, 31]]
        assert [a.results for a in answers] == [[10], [100, 110], [200, 210], [300, 310]]
        assert [a.batch_items for a in answers] == [1, 6, 6, 6]
        assert all(a.pass_ms > 0 for a in answers)

    run(main())


def test_a_lone_caller_with_an_idle_model_starts_at_once():
    """No timer waits for company: the pass begins as soon as the request is queued."""
    async def main():
        model = Model()
        b = Batcher(model, max_items=32)
        await b.submit(["warm"])  # the runner task and the model thread exist now
        t0 = time.perf_counter()
        answer = await b.submit([7])
        assert answer.results == [70] and answer.batch_items == 1
        return time.perf_counter() - t0

    assert run(main()) < 0.05


def test_a_pass_takes_at_most_max_items_and_keeps_each_request_whole():
    async def main():
        model, b, first = await first_pass_held(4)
        queued = [asyncio.create_task(b.submit(items)) for items in ([1, 2, 3], [4, 5], [6], [7, 8, 9, 10, 11])]
        await asyncio.sleep(0.02)
        model.hold.set()
        await asyncio.gather(first, *queued)
        # [4, 5] does not fit beside [1, 2, 3], and is not split over two passes; the request larger than max_items
        # runs alone.
        assert model.passes == [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]]

    run(main())


def test_a_request_that_breaks_the_model_fails_alone():
    async def main():
        model, b, first = await first_pass_held(32)
        good = [asyncio.create_task(b.submit([i])) for i in range(1, 6)]
        bad = asyncio.create_task(b.submit([3, "BAD"]))
        good += [asyncio.create_task(b.submit([i])) for i in range(6, 9)]
        await asyncio.sleep(0.02)
        model.hold.set()
        answers = await asyncio.gather(first, *good)
        assert [a.results for a in answers] == [[i * 10] for i in range(9)]
        with pytest.raises(ValueError, match="cannot take 'BAD'"):
            await bad
        # the shared pass failed, then each of its requests ran alone: only the bad one failed again
        assert model.passes[1] == [1, 2, 3, 4, 5, 3, "BAD", 6, 7, 8]
        assert model.passes[2:] == [[1], [2], [3], [4], [5], [3, "BAD"], [6], [7], [8]]
        # and the batcher goes on serving
        assert (await b.submit([9])).results == [90]

    run(main())


def test_a_caller_cancelled_while_queued_is_not_run():
    async def main():
        model, b, first = await first_pass_held(32)
        gone = asyncio.create_task(b.submit([1]))
        stays = asyncio.create_task(b.submit([2]))
        await asyncio.sleep(0.02)
        gone.cancel()
        await asyncio.sleep(0)
        model.hold.set()
        await first
        assert (await stays).results == [20]
        assert model.passes == [[0], [2]]

    run(main())


def test_a_caller_cancelled_during_its_pass_leaves_the_others_answered():
    async def main():
        model, b, first = await first_pass_held(32)
        a, c = asyncio.create_task(b.submit([1])), asyncio.create_task(b.submit([2]))
        model.hold.set()
        await first
        model.hold.clear()
        await started(model, 2)  # [1, 2] is running
        a.cancel()
        model.hold.set()
        assert (await c).results == [20]
        assert (await b.submit([3])).results == [30]

    run(main())


def test_a_model_that_returns_the_wrong_count_is_an_error_for_that_pass():
    async def main():
        b = Batcher(lambda items: items[:-1], max_items=8)
        with pytest.raises(RuntimeError, match="returned 1 results for 2 items"):
            await b.submit([1, 2])

    run(main())


def test_empty_requests_and_sizes_are_refused():
    with pytest.raises(ValueError, match="max_items"):
        Batcher(lambda items: items, max_items=0)

    async def main():
        with pytest.raises(ValueError, match="at least one item"):
            await Batcher(lambda items: items, max_items=1).submit([])

    run(main())

"""Continuous batching for a served model: one queue, one runner, plain asyncio (no Ray, no timers).

Callers `await batcher.submit(items)`. One runner task takes everything queued, up to `max_items` items, runs one
pass of `run` in a worker thread, answers the callers whose items were in it, and repeats. Items that arrive while
a pass runs wait in the queue and make up the next pass, so batches grow with the load on their own and a lone
caller with an idle model starts at once, never waiting for company. This is the loop text-embeddings-inference
and vLLM use; a timer-driven batcher (Serve's `@serve.batch`) closes a batch after a wait even when the model is
busy, which made many small batches.

A request's items stay together in one pass. A pass that raises is run again one request at a time, so a request
that breaks the model fails alone and the others it was batched with still get their answers.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """One request's results, in its items' order, and what the pass that produced them was like."""

    results: list[Any]
    batch_items: int  # items in that pass, the caller's and others'
    pass_ms: float  # the pass's wall time in the worker thread


@dataclass
class _Request:
    items: list[Any]
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Runs `run(items) -> results` (one result per item, same order) over the items of concurrent requests.

    `run` is blocking (a forward pass); it runs in one worker thread, one pass at a time, while the event loop goes
    on parsing and queueing requests. A request of more than `max_items` items runs in a pass of its own."""

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], max_items: int):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self._run = run
        self.max_items = max_items
        self._queue: collections.deque[_Request] = collections.deque()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task | None = None  # kept: the event loop holds only weak references to tasks
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bertray-model")

    async def submit(self, items: list[Any]) -> Answer:
        """Queue one request's items and wait for their results. A cancelled caller's items are dropped if no pass
        has taken them yet; an exception from a pass that ran them alone is raised here."""
        if not items:
            raise ValueError("a request needs at least one item")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(list(items), future))
        self._wake.set()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._loop(), name="bertray-batcher")
        return await future

    def queued_items(self) -> int:
        return sum(len(r.items) for r in self._queue if not r.future.done())

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := self._take():
                await self._answer(batch)

    def _take(self) -> list[_Request]:
        """The requests of the next pass: queued ones in arrival order while their items fit `max_items`."""
        batch: list[_Request] = []
        count = 0
        while self._queue:
            request = self._queue[0]
            if request.future.done():  # cancelled while queued: nobody wants its answer
                self._queue.popleft()
                continue
            if batch and count + len(request.items) > self.max_items:
                break
            batch.append(self._queue.popleft())
            count += len(request.items)
        return batch

    async def _answer(self, batch: list[_Request]) -> None:
        try:
            results, ms = await self._pass([item for r in batch for item in r.items])
        except Exception as exc:  # noqa: BLE001 - settled per request below, never lost
            if len(batch) == 1:
                _settle(batch[0].future, exc)
                return
            log.warning("a pass over %d requests failed (%s: %s); running them one at a time", len(batch),
                        type(exc).__name__, exc)
            for request in batch:
                await self._answer([request])
            return
        start = 0
        for request in batch:
            end = start + len(request.items)
            _settle(request.future, Answer(list(results[start:end]), len(results), ms))
            start = end

    async def _pass(self, items: list[Any]) -> tuple[Sequence[Any], float]:
        def timed() -> tuple[Sequence[Any], float]:
            t0 = time.perf_counter()
            out = self._run(items)
            if len(out) != len(items):
                raise RuntimeError(f"the model returned {len(out)} results for {len(items)} items")
            return out, (time.perf_counter() - t0) * 1000

        return await asyncio.get_running_loop().run_in_executor(self._thread, timed)


def _settle(future: asyncio.Future, outcome: Answer | BaseException) -> None:
    if future.done():  # the caller went away while its pass ran
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)

"""Serve's batched path: texts that arrive while a forward pass runs wait for it and then share one batch.

Runs the deployment class's own batching code (Serve's `@serve.batch` included) on a bare instance with a slow
stand-in model, in this process: no Ray cluster, and the timing is under the test's control.
"""
from __future__ import annotations

import asyncio
import gc
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from bertray.config import ServeConfig
from bertray.serve import Classifier

# The bare instances skip the ingress wrapper's __init__, so its async __del__ is never awaited: harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*__del__' was never awaited:RuntimeWarning")


@pytest.fixture(autouse=True)
def outside_a_replica(monkeypatch):
    # Serve's batch queue reads the replica's max_ongoing_requests for a warning; there is no replica here.
    from ray.serve import batching

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)


@pytest.fixture(autouse=True)
def fresh_batch_queue():
    """Serve keeps one batch queue per decorated method, in the class's function, and creates it on first use. A
    queue left there by these tests (an asyncio task, weak references, the test's sizes) would make Classifier
    unpicklable for a Serve test run later in the same process, as a pytest-xdist worker does."""
    lazy = Classifier.func_or_class._predict_one.set_max_batch_size.__self__
    saved = (lazy.max_batch_size, lazy.batch_wait_timeout_s)
    yield
    lazy._queue = None
    lazy.max_batch_size, lazy.batch_wait_timeout_s = saved
    gc.collect()  # the freed bare instance's __del__ warning (filtered in this module) stays in this module


class HeldPredictor:
    """Records each forward pass; the first one blocks until released, as a long pass would, and later ones take
    `later_s`. Given a `gate` (the replica's model-free event), also records whether it was set as each pass
    ended: it never should be while a pass runs."""

    def __init__(self, later_s: float = 0.0):
        self.passes: list[list[str]] = []
        self.release = threading.Event()
        self.later_s = later_s
        self.gate: asyncio.Event | None = None
        self.gate_open_in_pass: list[bool] = []

    def predict(self, texts):
        self.passes.append(list(texts))
        if len(self.passes) == 1:
            assert self.release.wait(30), "the test never released the first pass"
        else:
            time.sleep(self.later_s)
        if self.gate is not None:
            self.gate_open_in_pass.append(self.gate.is_set())  # a plain flag read, safe from this thread
        return SimpleNamespace(probs=np.tile(np.float32([0.25, 0.75]), (len(texts), 1)))


def bare_classifier(predictor, **cfg) -> Classifier:
    cls = Classifier.func_or_class  # the class under @serve.deployment / @serve.ingress
    obj = cls.__new__(cls)  # skip __init__: no checkpoint to load
    obj.cfg = ServeConfig(model="unused", **cfg)
    obj.predictor = predictor
    obj._start_batching(obj.cfg)
    return obj


def test_texts_arriving_during_a_pass_share_the_next_batch():
    pred = HeldPredictor()
    clf = bare_classifier(pred, batch_wait_timeout_s=0.01, max_batch_size=32)

    async def main():
        first = asyncio.create_task(clf._classify_texts(["first"]))
        await asyncio.sleep(0.3)  # the first pass is now running, and held
        later = []
        for wave in range(3):  # three waves of callers, each further apart than the 10 ms batch wait
            later += [asyncio.create_task(clf._classify_texts([f"text {wave}.{k}"])) for k in range(2)]
            await asyncio.sleep(0.1)
        assert len(pred.passes) == 1  # nothing ran beside the held pass
        pred.release.set()
        return await asyncio.gather(first, *later)

    results = asyncio.run(main())
    # Without the wait for a free model, Serve would have closed one batch per wave: [first], [2], [2], [2].
    assert [len(p) for p in pred.passes] == [1, 6], pred.passes
    assert [batch for _, batch, _ in results] == [1, 6, 6, 6, 6, 6, 6]
    for probs, _, _ in results:
        np.testing.assert_allclose(probs[0], [0.25, 0.75])
    # Each answer carries its pass's duration (Server-Timing): the held first pass, then one shared by the six.
    took = [ms for _, _, ms in results]
    assert took[0] >= 500 and len(set(took[1:])) == 1 and took[1] < took[0], took


def test_without_batching_each_request_runs_alone():
    pred = HeldPredictor()
    pred.release.set()
    clf = bare_classifier(pred, batching=False)

    async def main():
        return await asyncio.gather(*(clf._classify_texts([f"t{i}", "x"]) for i in range(3)))

    results = asyncio.run(main())
    assert sorted(len(p) for p in pred.passes) == [2, 2, 2]
    assert [batch for _, batch, _ in results] == [2, 2, 2]


def test_a_lone_caller_does_not_wait_for_company():
    """With an idle model and nobody else waiting, a request runs at once instead of sitting out the batch wait."""
    pred = HeldPredictor()
    pred.release.set()
    clf = bare_classifier(pred, batch_wait_timeout_s=5.0, max_batch_size=32)

    async def main():
        t0 = time.perf_counter()
        probs, batch, _ = await clf._classify_texts(["alone", "together"])
        return probs, batch, time.perf_counter() - t0

    probs, batch, took = asyncio.run(main())
    assert took < 1.0, f"waited {took:.1f} s: the lone request went through the 5 s batch wait"
    assert pred.passes == [["alone", "together"]] and batch == 2 and len(probs) == 2


async def held_pass_then(clf: Classifier, pred: HeldPredictor, *requests: list[str]
                         ) -> tuple[float, list[asyncio.Task]]:
    """A lone caller's pass ("a1"), held for 0.4 s while `requests` queue behind it. Returns once that pass has
    answered: its duration (ms) and the queued requests' tasks. The caller of "a1" sends nothing more."""
    first = asyncio.create_task(clf._classify_texts(["a1"]))  # alone: runs at once, and is held
    await asyncio.sleep(0.3)
    queued = [asyncio.create_task(clf._classify_texts(list(texts))) for texts in requests]
    await asyncio.sleep(0.1)
    pred.release.set()
    _, _, first_ms = await first
    return first_ms, queued


def test_the_next_batch_waits_for_the_callers_a_pass_answered():
    """Closed-loop callers come back once answered; the next batch waits for them (for a while), so the callers stay
    in one group instead of splitting into two that take turns."""
    pred = HeldPredictor()
    clf = bare_classifier(pred, batch_wait_timeout_s=0.002, max_batch_size=32)
    clf._regroup_per_caller_s = 10.0  # so the pass's own time (about 400 ms) bounds the wait

    async def main():
        first_ms, queued = await held_pass_then(clf, pred, ["b1"], ["c1"])
        # a1's caller comes back after a round trip far shorter than the held pass (about 400 ms), and far longer
        # than the batch wait (2 ms) that would otherwise have closed the next batch without it.
        await asyncio.sleep(0.03)
        back = asyncio.create_task(clf._classify_texts(["a2"]))
        return first_ms, await asyncio.gather(*queued, back)

    first_ms, results = asyncio.run(main())
    assert first_ms >= 350  # held for 0.4 s, less the moment between the pass's start and main's first sleep
    assert len(pred.passes) == 2 and sorted(pred.passes[1]) == ["a2", "b1", "c1"], pred.passes
    assert [batch for _, batch, _ in results] == [3, 3, 3]


def wait_when_nobody_comes_back(per_caller_s: float) -> tuple[float, float, Classifier]:
    """The held pass of a1 answers, a1's caller never sends again, and b1 and c1 queued behind it wait for it: how
    long (s) they waited after that pass, and how long the pass took (ms), with `per_caller_s` of allowance (the
    config's regroup_s_per_caller); and the replica."""
    pred = HeldPredictor()
    clf = bare_classifier(pred, batch_wait_timeout_s=0.002, max_batch_size=32, regroup_s_per_caller=per_caller_s)

    async def main():
        first_ms, queued = await held_pass_then(clf, pred, ["b1"], ["c1"])
        t0 = time.perf_counter()
        await asyncio.gather(*queued)
        return time.perf_counter() - t0, first_ms

    waited, first_ms = asyncio.run(main())
    assert pred.passes[1:] == [["b1", "c1"]], pred.passes
    return waited, first_ms, clf


def test_the_wait_for_answered_callers_ends_at_its_deadline():
    """Callers that do not come back hold up the next batch for their allowance, and never longer than the last
    pass took: here 10 s for the one caller answered, so the pass's time (about 400 ms) is the bound."""
    waited, first_ms, _ = wait_when_nobody_comes_back(10.0)
    window = first_ms / 1000
    assert 0.5 * window <= waited < window + 2.0, f"waited {waited:.3f} s for a window of {window:.3f} s"


def test_the_wait_for_answered_callers_is_bounded_per_caller():
    """With one caller answered and an allowance of 50 ms per caller, the wait is about 50 ms, not the held pass's
    400 ms."""
    waited, _, _ = wait_when_nobody_comes_back(0.05)
    assert 0.025 <= waited < 0.3, f"waited {waited:.3f} s for a 0.05 s allowance"


def test_regroup_s_per_caller_0_turns_the_wait_off():
    """For open-loop traffic, whose callers do not come back: the model is free again as soon as a pass ends."""
    waited, _, clf = wait_when_nobody_comes_back(0.0)
    assert clf._regroup_task is None, "a wait was started with no allowance"
    assert waited < 0.3, f"waited {waited:.3f} s"


def test_after_a_wait_for_callers_that_did_not_come_back_the_next_is_skipped():
    """Open-loop traffic: a1's caller never sends again, so the wait after its pass ends at its deadline with
    nobody back, and the next pass ([b1, c1], nobody queued behind it) frees the model at once instead of holding
    it for b1's and c1's callers (up to its own 0.2 s)."""
    pred = HeldPredictor(later_s=0.2)
    clf = bare_classifier(pred, batch_wait_timeout_s=0.002, max_batch_size=32, regroup_s_per_caller=10.0)

    async def main():
        _, queued = await held_pass_then(clf, pred, ["b1"], ["c1"])
        await asyncio.gather(*queued)
        return clf._model_free.is_set()

    assert asyncio.run(main()), "the model was held after a wait in which nobody came back"
    assert pred.passes[1:] == [["b1", "c1"]], pred.passes
    assert (clf._regroup_misses, clf._regroup_skips) == (1, 0)  # one miss; its one skip used by the [b1, c1] pass


def test_skipped_waits_double_with_each_miss_in_a_row_and_reset_when_callers_return():
    clf = bare_classifier(HeldPredictor())
    skips = []
    for _ in range(7):
        clf._note_regroup(full=False, back=1, answered=4)  # 1 of 4 back: a miss
        skips.append(clf._regroup_skips)
    assert skips == [1, 2, 4, 8, 16, 16, 16]
    clf._regroup_skips = 0
    clf._note_regroup(full=False, back=2, answered=4)  # half back: the callers do return
    assert clf._regroup_misses == 0
    clf._note_regroup(full=False, back=0, answered=4)
    assert (clf._regroup_misses, clf._regroup_skips) == (1, 1)
    clf._regroup_skips = 0
    clf._note_regroup(full=True, back=0, answered=4)  # a full batch of others queued meanwhile: says nothing
    assert (clf._regroup_misses, clf._regroup_skips) == (1, 0)
    clf._note_regroup(full=False, back=0, answered=4)
    assert (clf._regroup_misses, clf._regroup_skips) == (2, 2)


def test_the_door_shuts_behind_the_callers_let_in():
    """When a pass ends, the callers queued for the model go into the batcher together; one that comes while their
    batch forms waits for the next pass, as it would during a pass, rather than slip into the batcher behind them.
    (Slipped-in texts made a small batch that ran next, and at 32 closed-loop callers the passes went on as 22, 1
    and 9 texts; bench/regroup_sim.py.)"""
    pred = HeldPredictor()
    clf = bare_classifier(pred, batch_wait_timeout_s=0.3, max_batch_size=32, regroup_s_per_caller=0.0)

    async def main():
        _, queued = await held_pass_then(clf, pred, ["b1"], ["c1"])
        await asyncio.sleep(0.05)  # b1 and c1 are in the batcher, whose batch stays open for 0.3 s
        late = asyncio.create_task(clf._classify_texts(["d1"]))
        return await asyncio.gather(*queued, late)

    results = asyncio.run(main())
    assert [sorted(p) for p in pred.passes] == [["a1"], ["b1", "c1"], ["d1"]], pred.passes
    assert [batch for _, batch, _ in results] == [2, 2, 1]
    assert clf._model_free.is_set()


def test_the_door_opens_again_if_the_callers_let_in_are_all_cancelled():
    """Callers let in and then cancelled (their clients went away) before a pass took their texts: no pass ends
    to open the door, so the last of them opens it, and the next caller is served instead of waiting for good."""
    pred = HeldPredictor()
    clf = bare_classifier(pred, batch_wait_timeout_s=1.0, max_batch_size=32, regroup_s_per_caller=0.0)

    async def main():
        _, (b1,) = await held_pass_then(clf, pred, ["b1"])
        await asyncio.sleep(0.05)  # b1 is in the batcher, which holds its batch open for 1 s
        b1.cancel()
        await asyncio.sleep(0.05)
        return await asyncio.wait_for(clf._classify_texts(["c1"]), 5)

    _, batch, _ = asyncio.run(main())
    assert batch == 1 and ["c1"] in pred.passes, pred.passes


def test_a_caller_cancelled_during_the_wait_does_not_stretch_it():
    """b1's client goes away while the model is held for a1's caller; a1's caller then comes back, and the wait
    ends at once instead of running to its deadline (the held pass's 0.4 s), and counts as a return."""
    pred = HeldPredictor()
    clf = bare_classifier(pred, batch_wait_timeout_s=0.002, max_batch_size=32, regroup_s_per_caller=10.0)
    notes = []
    note = clf._note_regroup
    clf._note_regroup = lambda *args: (notes.append(args), note(*args))

    async def main():
        _, (b1, c1) = await held_pass_then(clf, pred, ["b1"], ["c1"])
        b1.cancel()
        await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        back = asyncio.create_task(clf._classify_texts(["a2"]))
        await asyncio.gather(c1, back)
        return time.perf_counter() - t0

    took = asyncio.run(main())
    assert took < 0.2, f"the wait ran {took:.2f} s, to its deadline"
    assert sorted(pred.passes[1]) == ["a2", "c1"], pred.passes
    assert notes[0] == (False, 1, 1)  # not a full batch; 1 back of the 1 answered


def test_cancelling_every_caller_of_a_running_pass_leaves_the_door_shut():
    """The pass [b1, c1] runs on after its callers' clients go away, so a caller that comes meanwhile queues for
    the next pass rather than finding the door open and running alone beside it."""
    pred = HeldPredictor(later_s=0.5)
    clf = bare_classifier(pred, batch_wait_timeout_s=0.002, max_batch_size=32, regroup_s_per_caller=0.0)

    async def main():
        _, queued = await held_pass_then(clf, pred, ["b1"], ["c1"])
        await asyncio.sleep(0.1)  # [b1, c1] is running, for 0.5 s
        for task in queued:
            task.cancel()
        await asyncio.sleep(0.05)
        late = asyncio.create_task(clf._classify_texts(["d1"]))
        await asyncio.sleep(0.05)
        state = (clf._model_free.is_set(), clf._queued)
        await late
        return state

    assert asyncio.run(main()) == (False, 1)
    assert [sorted(p) for p in pred.passes] == [["a1"], ["b1", "c1"], ["d1"]], pred.passes


def test_one_of_the_callers_let_in_cancelled_before_it_moves_on_keeps_the_door_shut():
    """b1 and c1 are let in together, and b1 is cancelled in that same moment: c1 has not yet moved on, so b1's
    leaving must not open the door, and d1, coming while c1's batch forms, still waits for the next pass."""
    pred = HeldPredictor()
    clf = bare_classifier(pred, batch_wait_timeout_s=0.2, max_batch_size=32, regroup_s_per_caller=0.0)
    tasks: dict[str, asyncio.Task] = {}
    open_door = clf._open

    def open_and_cancel_b1():
        open_door()
        if clf._let_in == 2:
            tasks["b1"].cancel()

    clf._open = open_and_cancel_b1

    async def main():
        first = asyncio.create_task(clf._classify_texts(["a1"]))
        await asyncio.sleep(0.3)
        tasks["b1"] = asyncio.create_task(clf._classify_texts(["b1"]))
        c1 = asyncio.create_task(clf._classify_texts(["c1"]))
        await asyncio.sleep(0.1)
        pred.release.set()
        await first
        await asyncio.sleep(0.05)  # c1's batch stays open for 0.2 s
        d1 = asyncio.create_task(clf._classify_texts(["d1"]))
        await asyncio.gather(c1, d1)

    asyncio.run(main())
    assert tasks["b1"].cancelled()
    assert pred.passes[1:] == [["c1"], ["d1"]], pred.passes


def test_no_wait_while_the_batcher_still_holds_texts():
    """More texts handed over than one batch takes: Serve runs the rest next, so the model is not held for callers
    meanwhile, and the gate stays shut through every pass (a wait ending mid-pass would open it)."""
    pred = HeldPredictor(later_s=0.3)
    clf = bare_classifier(pred, batch_wait_timeout_s=0.002, max_batch_size=2)
    pred.gate = clf._model_free
    clf._regroup_per_caller_s = 0.05  # a wait after the [b1, c1] pass would end 0.1 s into the [d1] pass

    async def main():
        _, queued = await held_pass_then(clf, pred, ["b1"], ["c1"], ["d1"])
        await asyncio.gather(*queued)

    asyncio.run(main())
    assert [sorted(p) for p in pred.passes] == [["a1"], ["b1", "c1"], ["d1"]], pred.passes
    assert pred.gate_open_in_pass == [False, False, False]
    assert clf._model_free.is_set() and not clf._unstarted


def test_a_request_of_several_texts_counts_as_one_caller():
    """A pass answers callers, not texts: after one caller's 3 texts, nobody else is expected back."""
    pred = HeldPredictor(later_s=0.2)  # a wait for 3 callers would then last 0.2 s, past the check below
    clf = bare_classifier(pred, batch_wait_timeout_s=0.002, max_batch_size=32)
    clf._regroup_per_caller_s = 10.0

    async def main():
        _, (several,) = await held_pass_then(clf, pred, ["b1", "b2", "b3"])
        await several
        # Expecting 3 callers back would hold the model for up to the pass's time; expecting 1, it is free now.
        return clf._model_free.is_set()

    assert asyncio.run(main()), "the model was held for callers that were only texts of one request"
    assert pred.passes[1] == ["b1", "b2", "b3"]

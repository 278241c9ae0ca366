"""The replica's batching code under closed- and open-loop load, with a model of fixed cost: the regroup wait's
policy alone, without the 2-core VM's noise (BENCHMARKS.md, "Serving").

    .venv/bin/python bench/regroup_sim.py

bench/serve_open_loop.py measures the wait end to end over HTTP, where one step's median latency moved by a third
between rounds. This runs `serve.Classifier`'s own batching code (Serve's `@serve.batch` included, as
tests/unit/test_serve_batching.py does) in one process, with a stand-in model that sleeps `a + b x texts` ms per
pass in the model thread: by default 8 + 9 ms, near fp32 MiniLM on one thread of the VM (a lone SST-2 sentence in
17 ms; 32 in 296 ms, 1.84x the throughput, as the model alone in bench/serve_load.py's session-14/15 runs).
Three policies, in turns:
- `always`: the wait after every pass for several callers, as sessions 14-15 had it;
- `adaptive`: the default since session 16, which skips waits after ones that callers did not come back to;
- `off`: regroup_s_per_caller=0.
All three run the rest of the batching code as it is now: a run of this script before the door to the batcher
shut behind the callers let in (Classifier._open) is how that flaw was found.
Closed-loop callers send again `--return-ms` (plus up to half again, at random) after their answer, as an HTTP
round trip would. Open-loop requests come at Poisson arrival times, the same ones for every policy; latency runs
from each one's scheduled time. Rates are fractions of the model's throughput in passes of max_batch_size texts.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POLICIES = ("always", "adaptive", "off")


class FixedCostModel:
    """Sleeps a + b x len(texts) ms per pass (in the replica's model thread) and records the passes."""

    def __init__(self, a_ms: float, b_ms: float):
        self.a, self.b = a_ms / 1000, b_ms / 1000
        self.busy_s = 0.0
        self.passes = 0

    def predict(self, texts):
        s = self.a + self.b * len(texts)
        time.sleep(s)
        self.busy_s += s
        self.passes += 1
        return SimpleNamespace(probs=np.tile(np.float32([0.5, 0.5]), (len(texts), 1)))


def _classifier(policy: str, model: FixedCostModel, max_batch_size: int):
    """A bare replica (no checkpoint, no Ray), as the unit tests build one, with a fresh batch queue."""
    from bertray import serve
    from bertray.config import ServeConfig

    lazy = serve.Classifier.func_or_class._predict_one.set_max_batch_size.__self__
    lazy._queue = None  # Serve keeps one queue per decorated method, bound to the event loop that made it
    gc.collect()
    cls = serve.Classifier.func_or_class
    clf = cls.__new__(cls)
    clf.cfg = ServeConfig(model="unused", max_batch_size=max_batch_size,
                          **({"regroup_s_per_caller": 0.0} if policy == "off" else {}))
    clf.predictor = model
    clf._start_batching(clf.cfg)
    if policy == "always":
        clf._regroup_max_skips = 0  # the same code with no skipping (_note_regroup sets at most this many)
    waits: list[float] = []
    regroup = clf._regroup

    async def timed(*args):
        t0 = time.perf_counter()
        await regroup(*args)
        waits.append(time.perf_counter() - t0)

    clf._regroup = timed
    return clf, waits


def _summary(lat: list[float], seconds: float, model: FixedCostModel, waits: list[float], sizes: list[int]) -> dict:
    ms = np.array(lat) * 1000
    return {"rps": len(lat) / seconds, "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_batch": float(np.mean(sizes)), "passes": model.passes, "model_busy": model.busy_s / seconds,
            "waits": len(waits), "waited_s_per_s": sum(waits) / seconds}


async def closed_loop(clf, model, waits, callers: int, seconds: float, return_ms: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    lat: list[float] = []
    sizes: list[int] = []
    end = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        await asyncio.sleep(k * 0.001)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            _, batch, _ = await clf._classify_texts([f"text {k}"])
            lat.append(time.perf_counter() - t0)
            sizes.append(batch)
            await asyncio.sleep(return_ms * (1 + 0.5 * rng.random()) / 1000)

    start = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    return _summary(lat, time.perf_counter() - start, model, waits, sizes)


async def open_loop(clf, model, waits, rate: float, seconds: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    at = np.cumsum(rng.exponential(1 / rate, size=int(rate * seconds * 2) + 16))
    at = at[at < seconds]
    lat: list[float] = []
    sizes: list[int] = []
    start = time.perf_counter() + 0.05

    async def one(i: int) -> None:
        due = start + at[i]
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        _, batch, _ = await clf._classify_texts([f"text {i}"])
        lat.append(time.perf_counter() - due)
        sizes.append(batch)

    await asyncio.gather(*(one(i) for i in range(len(at))))
    return _summary(lat, time.perf_counter() - start, model, waits, sizes)


def run(args) -> list[dict]:
    from ray.serve import batching

    # Serve's batch queue reads the replica's max_ongoing_requests for a warning; there is no replica here.
    batching._BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None
    capacity = args.max_batch_size / ((args.a_ms + args.b_ms * args.max_batch_size) / 1000)
    steps = []
    for rnd in range(args.rounds):
        order = POLICIES if rnd % 2 == 0 else POLICIES[::-1]
        loads = [("closed", c) for c in args.clients] + [("open", f) for f in args.fractions]
        for k, (kind, x) in enumerate(loads):
            for policy in order:
                model = FixedCostModel(args.a_ms, args.b_ms)
                clf, waits = _classifier(policy, model, args.max_batch_size)
                if kind == "closed":
                    r = asyncio.run(closed_loop(clf, model, waits, x, args.seconds, args.return_ms, seed=rnd))
                else:
                    r = asyncio.run(open_loop(clf, model, waits, x * capacity, args.seconds, seed=100 * rnd + k))
                r.update(round=rnd + 1, policy=policy, kind=kind, load=x)
                steps.append(r)
                what = f"{x} callers" if kind == "closed" else f"{x:.0%} ({x * capacity:.0f}/s)"
                print(f"round {rnd + 1} {policy:8} {kind:6} {what:14}: {r['rps']:6.1f} req/s, p50 {r['p50_ms']:6.1f} "
                      f"p99 {r['p99_ms']:6.1f} ms, mean batch {r['mean_batch']:5.1f}, model busy "
                      f"{r['model_busy']:.0%}, {r['waits']} waits, {r['waited_s_per_s'] * 1000:.0f} ms waited per s",
                      flush=True)
    return steps


def markdown(steps: list[dict], args) -> str:
    lines = ["| traffic | policy | req/s | p50 ms | p99 ms | mean batch | model busy | waited ms per s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    loads = [("closed", c) for c in args.clients] + [("open", f) for f in args.fractions]
    capacity = args.max_batch_size / ((args.a_ms + args.b_ms * args.max_batch_size) / 1000)
    for kind, x in loads:
        for policy in POLICIES:
            rs = [s for s in steps if (s["kind"], s["load"], s["policy"]) == (kind, x, policy)]
            what = f"closed, {x} callers" if kind == "closed" else f"open, {x * capacity:.0f}/s ({x:.0%})"
            med = {key: float(np.median([s[key] for s in rs])) for key in
                   ("rps", "p50_ms", "p99_ms", "mean_batch", "model_busy", "waited_s_per_s")}
            lines.append(f"| {what} | {policy} | {med['rps']:.1f} | {med['p50_ms']:.1f} | {med['p99_ms']:.1f} | "
                         f"{med['mean_batch']:.1f} | {med['model_busy']:.0%} | {med['waited_s_per_s'] * 1000:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a-ms", type=float, default=8.0, help="the stand-in model's cost per pass")
    p.add_argument("--b-ms", type=float, default=9.0, help="and per text")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0, help="per step")
    p.add_argument("--rounds", type=int, default=3, help="medians over rounds go in the table")
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="closed-loop callers")
    p.add_argument("--return-ms", type=float, default=8.0, help="closed-loop callers' round trip before sending again")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9],
                   help="open-loop rates, as fractions of the model's throughput in full passes")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench" / "regroup_sim.json"))
    args = p.parse_args(argv)
    t0 = time.time()
    steps = run(args)
    out = {"args": vars(args), "steps": steps, "wall_s": time.time() - t0,
           "command": "python " + " ".join(["bench/regroup_sim.py", *(argv or sys.argv[1:])])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nCommand: `{out['command']}`; wall time {out['wall_s']:.0f} s; medians over {args.rounds} rounds.\n")
    print(markdown(steps, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

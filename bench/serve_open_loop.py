"""The regroup wait under open-loop traffic, whose callers do not come back (BENCHMARKS.md, "Serving").

    nohup nice -n 5 .venv/bin/python bench/serve_open_loop.py > /tmp/serve_open_loop.log 2>&1 &

After a pass for several callers, a replica holds the next batch until those callers send again
(ServeConfig.regroup_s_per_caller, at most 2 ms per caller and never longer than the pass): closed-loop callers
otherwise split into groups that take turns with part-full batches. Callers that never come back, such as
independent users of a web page, would cost that wait of idle model after every pass, so after a wait that fewer
than half of them came back to, the replica skips the next ones (serve.Classifier._note_regroup). This measures
both sides in one run.

Two apps run side by side behind one Serve (HAProxy ingress), each one replica with 1 CPU and 1 torch thread:
`on` with the default (the wait, and its skipping) and `off` with regroup_s_per_caller=0; the embedded MiniLM with a random 2-class head,
one SST-2 validation sentence per request. Per round:
- closed-loop steps, 8 and 32 callers (each sends its next request when answered), as bench/serve_load.py: what
  the wait gains;
- open-loop steps: requests sent at Poisson arrival times at a fixed rate, whether or not earlier ones have been
  answered, the same schedule for both apps. Latency runs from each request's scheduled time, so a slow service
  cannot hold back the load. The rates are fractions of the requests per second `on` served at 32 closed-loop
  callers in the first round.
The two apps take turns step by step, and which goes first alternates by round, so drift in the machine's speed
falls on both. Prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import minilm_classifier
from serve_load import LABELS, WARMUP_S, _load, _server_timing_ms, run_and_report, texts

REPO = Path(__file__).resolve().parents[1]
MODES = {"on": None, "off": 0.0}  # regroup_s_per_caller: None keeps ServeConfig's default


async def _open_loop(url: str, sample: list[str], rate: float, seconds: float, seed: int) -> dict:
    """Requests at Poisson arrival times, `rate` per second for `seconds`; each one's latency from its scheduled
    time. A non-200 answer or a failed connection counts as an error."""
    import aiohttp

    rng = np.random.default_rng(seed)
    at = np.cumsum(rng.exponential(1 / rate, size=int(rate * seconds * 2) + 16))
    at = at[at < seconds]
    lat: list[float] = []
    lag: list[float] = []  # how late the client sent a request: its own event loop falling behind
    batch: list[int] = []
    model_ms: list[float] = []
    errors: list[str] = []

    async def one(i: int, session: aiohttp.ClientSession, start: float) -> None:
        due = start + at[i]
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        lag.append(time.perf_counter() - due)
        try:
            async with session.post(url, json={"texts": [sample[i % len(sample)]]}) as r:
                await r.read()
                if r.status != 200:
                    errors.append(f"HTTP {r.status}")
                    return
                batch.append(int(r.headers["X-Batch-Size"]))
                model_ms.append(_server_timing_ms(r.headers))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            errors.append(type(exc).__name__)
            return
        lat.append(time.perf_counter() - due)

    # No cap on connections: an open-loop client never waits for one to free up.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        start = time.perf_counter() + 0.05  # the tasks are created before the first is due
        await asyncio.gather(*(one(i, session, start) for i in range(len(at))))
        elapsed = time.perf_counter() - start
    ms = np.array(lat) * 1000 if lat else np.zeros(1)
    return {"offered_rps": rate, "sent": len(at), "answered": len(lat), "errors": len(errors),
            "error_kinds": sorted(set(errors)), "rps": len(lat) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "mean_batch": float(np.mean(batch)) if batch else 0.0,
            "model_p50_ms": float(np.percentile(model_ms, 50)) if model_ms else 0.0,
            "lag_p99_ms": float(np.percentile(np.array(lag) * 1000, 99)) if lag else 0.0}


def _wait_healthy(url: str, timeout: float = 120.0) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.post(url, json={"texts": ["warm"]}, timeout=30).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def run_bench(args) -> dict:
    import ray
    from ray import serve

    from bertray.config import ServeConfig
    from bertray.runtime import free_ports
    from bertray.serve import build_app, start_http

    sample = texts(args.texts)
    steps: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = minilm_classifier(Path(tmp) / "minilm-classifier", LABELS)
        ray.init(include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                                                                    "TOKENIZERS_PARALLELISM": "false"}})
        port = free_ports(1)[0]
        urls = {mode: f"http://127.0.0.1:{port}/{mode}/v1/classify" for mode in MODES}
        try:
            cfgs = {mode: ServeConfig(model=model, port=port, cpus_per_replica=1.0, quantize=args.quantize,
                                      **({} if wait is None else {"regroup_s_per_caller": wait}))
                    for mode, wait in MODES.items()}
            start_http("127.0.0.1", port, "haproxy")
            serve.run_many([serve.RunTarget(build_app(cfg), name=mode, route_prefix=f"/{mode}")
                            for mode, cfg in cfgs.items()])
            for mode, url in urls.items():
                _wait_healthy(url)
                asyncio.run(_load(url, sample, max(args.clients), WARMUP_S))
            rates: list[float] = []
            for rnd in range(args.rounds):
                order = list(MODES) if rnd % 2 == 0 else list(MODES)[::-1]
                for c in args.clients:
                    for mode in order:
                        r = asyncio.run(_load(urls[mode], sample, c, args.seconds))
                        steps.append({"round": rnd + 1, "mode": mode, "kind": "closed", "clients": c, **r})
                        print(f"round {rnd + 1} {mode:3} closed {c:2} callers: {r['rps']:.1f} req/s, "
                              f"p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms, mean batch {r['mean_batch']:.1f}, "
                              f"errors {r['errors']}", flush=True)
                if not rates:
                    top = next(s for s in steps if s["mode"] == "on" and s["clients"] == max(args.clients))
                    rates = [round(f * top["rps"], 1) for f in args.fractions]
                for k, rate in enumerate(rates):
                    for mode in order:
                        r = asyncio.run(_open_loop(urls[mode], sample, rate, args.seconds, seed=1000 * rnd + k))
                        steps.append({"round": rnd + 1, "mode": mode, "kind": "open", "fraction": args.fractions[k],
                                      **r})
                        print(f"round {rnd + 1} {mode:3} open {rate:6.1f}/s: {r['rps']:.1f} req/s answered, "
                              f"p50 {r['p50_ms']:.1f} p95 {r['p95_ms']:.1f} p99 {r['p99_ms']:.1f} ms, "
                              f"mean batch {r['mean_batch']:.1f}, client lag p99 {r['lag_p99_ms']:.1f} ms, "
                              f"errors {r['errors']}", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
    return {"steps": steps, "rates": rates}


def markdown(out: dict) -> str:
    m, a = out["machine"], out["args"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; load average {m['load_avg']} before, {m['load_avg_after']} "
             "after.",
             f"Command: `{out['command']}`; quantize {a['quantize']}; {a['seconds']:g} s per step; "
             f"wall time {out['wall_s']:.0f} s.", "",
             "| round | traffic | on: req/s | off: req/s | on: p50 / p99 ms | off: p50 / p99 ms | on: mean batch "
             "| off: mean batch | errors on / off |",
             "|---:|---|---:|---:|---|---|---:|---:|---|"]
    steps = out["steps"]
    keys = sorted({(s["round"], s["kind"], s.get("clients", 0), s.get("offered_rps", 0.0)) for s in steps},
                  key=lambda k: (k[0], k[1], k[2], k[3]))
    for rnd, kind, c, rate in keys:
        pair = {s["mode"]: s for s in steps if (s["round"], s["kind"], s.get("clients", 0),
                                                s.get("offered_rps", 0.0)) == (rnd, kind, c, rate)}
        on, off = pair["on"], pair["off"]
        what = f"closed, {c} callers" if kind == "closed" else f"open, {rate:g}/s ({on['fraction']:.0%})"
        lines.append(f"| {rnd} | {what} | {on['rps']:.1f} | {off['rps']:.1f} | {on['p50_ms']:.1f} / "
                     f"{on['p99_ms']:.1f} | {off['p50_ms']:.1f} / {off['p99_ms']:.1f} | {on['mean_batch']:.1f} | "
                     f"{off['mean_batch']:.1f} | {on['errors']} / {off['errors']} |")
    lag = max(s["lag_p99_ms"] for s in steps if s["kind"] == "open")
    lines += ["", f"- open-loop rates are fractions of `on`'s req/s at {max(a['clients'])} closed-loop callers in "
                  f"round 1; the client sent requests at most {lag:.1f} ms late (p99 of any step)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="measured duration per step")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="closed-loop callers per step")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9],
                   help="open-loop rates, as fractions of `on`'s req/s at the top closed-loop step")
    p.add_argument("--quantize", choices=["none", "int8", "bf16"], default="none")
    p.add_argument("--texts", type=int, default=500, help="distinct SST-2 sentences cycled through")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench" / "serve_open_loop.json"))
    return run_and_report(p.parse_args(argv), argv, __file__, run_bench, markdown)


if __name__ == "__main__":
    sys.exit(main())

"""Load figures for BENCHMARKS.md: `bertray.serve` over HTTP on loopback, dynamic batching on vs off.

    nohup nice -n 5 .venv/bin/python bench/serve_load.py > /tmp/serve_load.log 2>&1 &

Serves the embedded MiniLM as a 2-class classifier (random head: speed does not depend on the weights) on one
replica, and drives it with 1, 8 and 32 closed-loop clients (each sends one text, waits for the answer, sends the
next) for a fixed time per step, first with batching on, then off (max_batch_size 1), in the same run; with `--ingress haproxy proxy`
both ingresses take their turn (each with a Serve of its own), so they compare in one run too. Texts are SST-2
validation sentences. The baseline is the model's own latency on one text (`Predictor.predict` in a loop, set up as the
replica sets it up: torch threads, device, token budget). After the load steps the model alone is also timed in
calls of the mean batch the replica ran at the top client count: the model's own gain from batching, to set beside
the end-to-end ratio. At 1 client each answer's Server-Timing splits its latency into the replica's forward pass
and the rest, and the 1-client ratio is measured once more with the model alone taking turns with the HTTP caller
(see _interleaved_lone). Prints a Markdown block and writes JSON. Targets: batched >= 2x unbatched
throughput at 32 clients; p99 at 1 client <= 1.5x the single-text latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import machine, minilm_classifier, shared_data

REPO = Path(__file__).resolve().parents[1]
SST2 = shared_data() / "sst2"
LABELS = ["negative", "positive"]
WARMUP_S = 2.0  # per configuration, before the first measured step: first batches pay for lazy init
IDLE_S = 3.0  # per configuration: the Serve processes' CPU use with no requests, subtracted from each step's


def texts(n: int) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(SST2 / "validation.parquet", columns=["text"]).column("text").to_pylist()[:n]


def single_text_latency(model: str, sample: list[str], seconds: float, threads: int, gpus: float = 0.0,
                        token_budget: int | None = None, quantize: str = "none", backend: str = "torch") -> dict:
    """The model alone: one text per `predict` call, in this process, set up as a replica sets it up."""
    return model_alone(model, sample, seconds, threads, gpus, token_budget, quantize, backend, batch=1)


def _predictor(model: str, threads: int, gpus: float, token_budget: int | None, quantize: str,
               backend: str = "torch"):
    """The model as a replica loads it (serve.load_predictor), with the replica's torch threads."""
    import torch

    from bertray.config import ServeConfig
    from bertray.serve import load_predictor

    torch.set_num_threads(threads)
    return load_predictor(ServeConfig(model=model, gpus_per_replica=gpus, token_budget=token_budget,
                                      quantize=quantize, backend=backend))


def model_alone(model: str, sample: list[str], seconds: float, threads: int, gpus: float = 0.0,
                token_budget: int | None = None, quantize: str = "none", backend: str = "torch",
                batch: int = 1) -> dict:
    """`batch` texts per `predict` call, in this process, with the replica's torch threads, device, token budget
    and quantization (serve.load_predictor). Latencies are per call; `ms_per_text` is wall time per text."""
    pred = _predictor(model, threads, gpus, token_budget, quantize, backend)
    batch = min(batch, len(sample))
    calls = [sample[i:i + batch] for i in range(0, len(sample) - batch + 1, batch)]
    for texts in calls[:max(1, 20 // batch)]:
        pred.predict(texts)
    lat = []
    end = time.perf_counter() + seconds
    cpu0 = time.process_time()
    i = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        pred.predict(calls[i % len(calls)])
        lat.append(time.perf_counter() - t0)
        i += 1
    out = _summary(lat, seconds, errors=0)
    out["cpu_ms"] = (time.process_time() - cpu0) * 1000 / i
    out["batch"] = batch
    out["ms_per_text"] = sum(lat) * 1000 / (i * batch)
    return out


SLICE_S = 0.5  # the interleaved 1-client measurement's turns


def _server_timing_ms(headers) -> float:
    """The duration of the forward pass behind an answer, from its Server-Timing header (bertray.serve sets it)."""
    return float(headers["Server-Timing"].split("dur=")[1].split(";")[0])


async def _interleaved_lone(url: str, pred, sample: list[str], seconds: float, gap_s: float) -> dict:
    """One caller over HTTP and the model alone (`pred`, in this process), taking turns of SLICE_S, each going
    through the same texts in the same order: a VM's speed can drift within one run (BENCHMARKS.md, "Serving"),
    and taking turns puts the drift on both sides of the 1-client ratio. The model alone then also
    runs beside Ray and Serve's idle processes, as the replica does.

    A third turn runs the model alone with `gap_s` of idle before each call, the gap a lone caller's round trip
    leaves between the replica's passes: an idle core can make the next pass slower (int8 by up to a third with
    4 ms of sleep, in a bare loop on the 2-core VM), which the back-to-back loop never sees. Only the latencies of
    these summaries are read: their req/s would count the gaps."""
    import aiohttp

    lat, passes, alone, paced = [], [], [], []
    spent = dict.fromkeys(("http", "alone", "paced"), 0.0)

    def model_turn(kind: str, out: list[float], gap: float) -> None:
        start = time.perf_counter()
        while time.perf_counter() < start + SLICE_S:
            if gap:
                time.sleep(gap)
            t0 = time.perf_counter()
            pred.predict([sample[len(out) % len(sample)]])
            out.append(time.perf_counter() - t0)
        spent[kind] += time.perf_counter() - start

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for _ in range(max(1, round(seconds / (3 * SLICE_S)))):
            start = time.perf_counter()
            while time.perf_counter() < start + SLICE_S:
                t0 = time.perf_counter()
                async with session.post(url, json={"texts": [sample[len(lat) % len(sample)]]}) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status} from {url}")
                lat.append(time.perf_counter() - t0)
                passes.append(_server_timing_ms(r.headers) / 1000)
            spent["http"] += time.perf_counter() - start
            model_turn("alone", alone, 0.0)
            model_turn("paced", paced, gap_s)
    return {"http": _summary(lat, spent["http"], 0), "pass": _summary(passes, spent["http"], 0),
            "alone": _summary(alone, spent["alone"], 0), "paced": _summary(paced, spent["paced"], 0),
            "gap_ms": gap_s * 1000}


def _server_cpu_s() -> np.ndarray:
    """CPU seconds used so far by this run's Serve ingress and replica processes (children of our local Ray), as
    [proxy, replica]. The ingress is Ray's Python proxy actor, or the HAProxy process and the actor that manages it.

    Unlike wall-clock figures, CPU time per request hardly changes when other work shares the machine, so it
    shows what batching saves even on a busy host."""
    import psutil

    total = np.zeros(2)
    for proc in psutil.Process().children(recursive=True):
        try:
            title = (proc.cmdline() or [""])[0]
            for i, prefixes in enumerate((("ray::ProxyActor", "ray::HAProxyManager", "haproxy"),
                                          ("ray::ServeReplica:bench:",))):
                if os.path.basename(title).startswith(prefixes):  # titles "ray::..." have no slash
                    t = proc.cpu_times()
                    total[i] += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # a worker that exited between listing and reading holds no Serve work
    return total


def _summary(lat: list[float], seconds: float, errors: int) -> dict:
    ms = np.array(lat) * 1000
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / seconds,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


async def _load(url: str, sample: list[str], clients: int, seconds: float) -> dict:
    """`clients` closed-loop callers for `seconds`; a non-200 answer or a failed connection counts as an error."""
    import aiohttp

    lat: list[float] = []
    batch: list[int] = []  # X-Batch-Size: texts in the forward pass that answered each request
    model_ms: list[float] = []  # Server-Timing: that pass's wall time in the replica's model thread
    outside_ms: list[float] = []  # a request's latency less its pass: HTTP, ingress, queue, wait for the model
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=30)

    async def client(k: int, session: aiohttp.ClientSession) -> None:
        i = k
        while time.perf_counter() < deadline:
            body = {"texts": [sample[i % len(sample)]]}
            t0 = time.perf_counter()
            try:
                async with session.post(url, json=body) as r:
                    await r.read()
                    ok = r.status == 200
                    if ok:
                        batch.append(int(r.headers["X-Batch-Size"]))
                        pass_ms = _server_timing_ms(r.headers)
                        model_ms.append(pass_ms)
                    else:
                        errors.append(f"HTTP {r.status}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                ok = False
                errors.append(type(exc).__name__)
            if ok:
                lat.append(time.perf_counter() - t0)
                outside_ms.append(lat[-1] * 1000 - pass_ms)
            i += clients

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(k, session) for k in range(clients)))
        elapsed = time.perf_counter() - started  # includes the last in-flight requests finishing after the deadline
    out = _summary(lat, elapsed, len(errors))
    out["error_kinds"] = sorted(set(errors))
    out["mean_batch"] = float(np.mean(batch)) if batch else 0.0
    out["model_p50_ms"] = float(np.percentile(model_ms, 50)) if model_ms else 0.0
    out["model_p99_ms"] = float(np.percentile(model_ms, 99)) if model_ms else 0.0
    out["outside_p50_ms"] = float(np.percentile(outside_ms, 50)) if outside_ms else 0.0
    out["outside_p99_ms"] = float(np.percentile(outside_ms, 99)) if outside_ms else 0.0
    return out


def run_bench(args) -> dict:
    import ray
    import requests
    from ray import serve

    from bertray.config import ServeConfig
    from bertray.runtime import free_ports
    from bertray.serve import deploy

    sample = texts(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or minilm_classifier(Path(tmp) / "minilm-classifier", LABELS)
        threads = max(1, int(args.cpus_per_replica))
        replica = dict(gpus=args.gpus_per_replica, token_budget=args.token_budget, quantize=args.quantize,
                       backend=args.backend)
        baseline = single_text_latency(model, sample, args.baseline_seconds, threads, **replica)
        print(f"single-text latency: p50 {baseline['p50_ms']:.2f} ms, p99 {baseline['p99_ms']:.2f} ms", flush=True)

        ray.init(include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads),
                                                                    "HF_HUB_OFFLINE": "1",
                                                                    "TOKENIZERS_PARALLELISM": "false"}})
        results = {ingress: {} for ingress in args.ingress}
        interleaved = {}
        alone_pred = _predictor(model, threads, args.gpus_per_replica, args.token_budget, args.quantize, args.backend)
        try:
            for ingress, batching in [(i, b) for i in args.ingress for b in (True, False)]:
                if batching:
                    serve.shutdown()  # a new controller: the ingress is fixed when Serve starts
                    port = free_ports(1)[0]
                    url = f"http://127.0.0.1:{port}/v1/classify"
                # Unbatched: passes of one request each, one after another, through the same code.
                cfg = ServeConfig(model=model, port=port, cpus_per_replica=args.cpus_per_replica,
                                  gpus_per_replica=args.gpus_per_replica,
                                  max_batch_size=args.max_batch_size if batching else 1,
                                  token_budget=args.token_budget, quantize=args.quantize, backend=args.backend,
                                  ingress=ingress)
                deploy(cfg, name="bench")  # the ingress starts with the first; the second call reuses it
                assert requests.post(url, json={"texts": sample[:2]}, timeout=60).status_code == 200
                asyncio.run(_load(url, sample, max(args.clients), WARMUP_S))
                # Ray's processes burn some CPU when idle too (heartbeats, metrics); measured here, subtracted below.
                cpu0, t0 = _server_cpu_s(), time.perf_counter()
                time.sleep(IDLE_S)
                idle_rate = (_server_cpu_s() - cpu0) / (time.perf_counter() - t0)
                mode = "on" if batching else "off"
                for c in args.clients:
                    cpu0, client0, t0 = _server_cpu_s(), time.process_time(), time.perf_counter()
                    r = asyncio.run(_load(url, sample, c, args.seconds))
                    busy = (_server_cpu_s() - cpu0 - idle_rate * (time.perf_counter() - t0)) * 1000 / max(r["requests"], 1)
                    r["proxy_cpu_ms_per_req"], r["replica_cpu_ms_per_req"] = float(busy[0]), float(busy[1])
                    r["server_cpu_ms_per_req"] = float(busy.sum())
                    r["server_idle_cpu_per_s"] = idle_rate.tolist()
                    r["client_cpu_ms_per_req"] = (time.process_time() - client0) * 1000 / max(r["requests"], 1)
                    results[ingress][f"{mode}/{c}"] = r
                    print(f"{ingress:7} batching {mode:3} clients {c:2}: {r['rps']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
                          f"p95 {r['p95_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, mean batch {r['mean_batch']:.1f}, "
                          f"CPU ms/req ingress {r['proxy_cpu_ms_per_req']:.1f} replica {r['replica_cpu_ms_per_req']:.1f}, "
                          f"errors {r['errors']}", flush=True)
                if batching:
                    gap = results[ingress]["on/1"]["outside_p50_ms"] / 1000
                    pair = asyncio.run(_interleaved_lone(url, alone_pred, sample, args.interleaved_seconds, gap))
                    interleaved[ingress] = pair
                    print(f"{ingress:7} 1 client interleaved with the model alone: p99 {pair['http']['p99_ms']:.1f} "
                          f"ms over HTTP, {pair['alone']['p99_ms']:.1f} ms alone", flush=True)
        finally:
            serve.shutdown()
            ray.shutdown()
        # Again after the load steps: if it moved much, other work on the machine changed under the run.
        baseline_after = single_text_latency(model, sample, args.baseline_seconds, threads, **replica)
        # The model's own gain from batching, with no Serve in the way: texts per second in calls of the mean batch
        # the replica ran at the top client count, against one text per call. End to end, each request also pays
        # Serve's own work, which batching trims too, so the two ratios differ; side by side they show how much of
        # a missed target the model's speed on this device accounts for.
        top = max(args.clients)
        mean_batch = max(1, round(results[args.ingress[0]][f"on/{top}"]["mean_batch"]))
        batched = model_alone(model, sample, args.baseline_seconds, threads, **replica, batch=mean_batch)
        single = baseline_after["ms_per_text"]  # timed just before, so both see the machine in the same state
        print(f"model alone: {single:.2f} ms per text one at a time, {batched['ms_per_text']:.2f} in calls of "
              f"{mean_batch}", flush=True)
    return {
        "baseline": baseline,
        "baseline_after": baseline_after,
        "model_batched": batched,
        "serve": results,
        "interleaved": interleaved,
        "ratios": {ingress: {
            f"batched_over_unbatched_rps_at_{top}": r[f"on/{top}"]["rps"] / r[f"off/{top}"]["rps"],
            "model_alone_batched_over_single": single / batched["ms_per_text"],
            "p99_1_client_batched_over_single_text_p50": r["on/1"]["p99_ms"] / baseline["p50_ms"],
            "p99_1_client_unbatched_over_single_text_p50": r["off/1"]["p99_ms"] / baseline["p50_ms"],
            "p99_1_client_batched_over_single_text_p99": r["on/1"]["p99_ms"] / baseline["p99_ms"],
            "p99_1_client_unbatched_over_single_text_p99": r["off/1"]["p99_ms"] / baseline["p99_ms"],
            "p99_1_client_batched_over_single_text_p99_interleaved":
                interleaved[ingress]["http"]["p99_ms"] / interleaved[ingress]["alone"]["p99_ms"],
        } for ingress, r in results.items()},
    }


def markdown(out: dict) -> str:
    m, a = out["machine"], out["args"]
    b = out["baseline"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; load average {m['load_avg']} before, {m['load_avg_after']} after.",
        f"Command: `{out['command']}`",
        f"Model: embedded all-MiniLM-L6-v2 + 2-class head, one replica with {a['cpus_per_replica']} CPU "
        f"(torch threads {max(1, int(a['cpus_per_replica']))}) and {a.get('gpus_per_replica', 0):g} GPU; max_batch_size {a['max_batch_size']}, "
        f"token_budget {a['token_budget']}, "
        f"quantize {a.get('quantize', 'none')}, backend {a.get('backend', 'torch')}; ingress {', '.join(a['ingress'])}; one SST-2 validation sentence per request; "
        f"{a['seconds']:g} s per step; wall time {out['wall_s']:.0f} s.",
        "",
        f"Single-text latency of the model alone (Predictor.predict, {b['requests']} calls, {b['cpu_ms']:.2f} ms CPU "
        f"each): p50 {b['p50_ms']:.2f} ms, p95 {b['p95_ms']:.2f} ms, p99 {b['p99_ms']:.2f} ms "
        f"(measured again after the load steps: p50 {out['baseline_after']['p50_ms']:.2f} ms, "
        f"p99 {out['baseline_after']['p99_ms']:.2f} ms).",
        "",
        "CPU ms/req: CPU time of the ingress (HAProxy, its manager actor and Serve's idle fallback proxy; or Ray's "
        "proxy actor) and of the replica per request, less what they use when idle. An HAProxy process that a "
        "reload replaces during a step takes its CPU time with it.",
        "",
        "| ingress | batching | clients | req/s | p50 ms | p95 ms | p99 ms | mean batch | ingress CPU ms/req "
        "| replica CPU ms/req | requests | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ingress, steps in out["serve"].items():
        for key, r in steps.items():
            mode, c = key.split("/")
            lines.append(f"| {ingress} | {mode} | {c} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} "
                         f"| {r['p99_ms']:.1f} | {r['mean_batch']:.1f} | {r['proxy_cpu_ms_per_req']:.1f} "
                         f"| {r['replica_cpu_ms_per_req']:.1f} | {r['requests']} | {r['errors']} |")
    top = max(a["clients"])
    first = a["ingress"][0]
    model_gain = out["ratios"][first]["model_alone_batched_over_single"]
    lines += [
        "",
        f"- the model alone, no Serve: {out['model_batched']['ms_per_text']:.2f} ms per text in calls of "
        f"{out['model_batched']['batch']} (the mean batch at {top} clients through {first}) against "
        f"{out['baseline_after']['ms_per_text']:.2f} ms one at a time (the single-text run just before): "
        f"{model_gain:.2f}x, the model's own gain from batching on this device",
    ]
    for ingress, ratios in out["ratios"].items():
        steps = out["serve"][ingress]
        gain = ratios[f"batched_over_unbatched_rps_at_{top}"]
        lines += [
            f"- **{ingress}**: batched / unbatched throughput at {top} clients: {gain:.2f}x (target >= 2x; "
            f"{gain / model_gain:.0%} of the model's own gain)",
            f"- **{ingress}**: p99 at 1 client / single-text latency (target <= 1.5x): batching on "
            f"{ratios['p99_1_client_batched_over_single_text_p99']:.2f}x of its p99, "
            f"{ratios['p99_1_client_batched_over_single_text_p50']:.2f}x of its p50; batching off "
            f"{ratios['p99_1_client_unbatched_over_single_text_p99']:.2f}x of its p99, "
            f"{ratios['p99_1_client_unbatched_over_single_text_p50']:.2f}x of its p50",
            f"- **{ingress}**: at 1 client, batching on, the forward pass inside the replica (Server-Timing) took "
            f"p50 {steps['on/1']['model_p50_ms']:.1f} / p99 {steps['on/1']['model_p99_ms']:.1f} ms, against the "
            f"model alone's {out['baseline']['p50_ms']:.1f} / {out['baseline']['p99_ms']:.1f} ms; a request's latency "
            f"less its pass (HTTP, ingress, the replica's server): p50 {steps['on/1']['outside_p50_ms']:.1f} / "
            f"p99 {steps['on/1']['outside_p99_ms']:.1f} ms",
            f"- **{ingress}**: the same, 1 client and the model alone taking turns of {SLICE_S:g} s "
            f"({a['interleaved_seconds']:g} s, a third each with the paced model below): "
            f"p99 {out['interleaved'][ingress]['http']['p99_ms']:.1f} ms over HTTP "
            f"(forward pass in the replica {out['interleaved'][ingress]['pass']['p99_ms']:.1f} ms) against "
            f"{out['interleaved'][ingress]['alone']['p99_ms']:.1f} ms alone: "
            f"{ratios['p99_1_client_batched_over_single_text_p99_interleaved']:.2f}x; p50 "
            f"{out['interleaved'][ingress]['http']['p50_ms']:.1f} against "
            f"{out['interleaved'][ingress]['alone']['p50_ms']:.1f} ms. The model alone with "
            f"{out['interleaved'][ingress]['gap_ms']:.1f} ms idle before each call (a lone caller's time outside "
            f"the pass, p50): p50 {out['interleaved'][ingress]['paced']['p50_ms']:.1f} / p99 "
            f"{out['interleaved'][ingress]['paced']['p99_ms']:.1f} ms",
            f"- **{ingress}**: server CPU per request (ingress + replica) at {top} clients: batching on "
            f"{steps[f'on/{top}']['server_cpu_ms_per_req']:.1f} ms, off "
            f"{steps[f'off/{top}']['server_cpu_ms_per_req']:.1f} ms",
        ]
    if len(out["serve"]) > 1:
        rps = {i: steps[f"on/{top}"]["rps"] for i, steps in out["serve"].items()}
        lines.append(f"- batched req/s at {top} clients, {first} / {a['ingress'][1]}: "
                     f"{rps[first] / rps[a['ingress'][1]]:.2f}x")
    lines.append(f"- errors: {sum(r['errors'] for steps in out['serve'].values() for r in steps.values())}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bertray.config import ServeConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a classifier checkpoint (default: embedded MiniLM, random head)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured duration per (mode, clients) step")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--baseline-seconds", type=float, default=10.0)
    p.add_argument("--interleaved-seconds", type=float, default=30.0,
                   help="1 client, the model alone, and the model alone paced like that client, taking turns "
                        "(a third each), batching on")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="> 0 serves (and times the baseline) on CUDA")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--token-budget", type=int, default=None,
                   help="tokens per micro-batch inside a forward pass (ServeConfig.token_budget; default: by device)")
    p.add_argument("--quantize", choices=["none", "int8", "bf16"], default="none", help="ServeConfig.quantize (CPU only)")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch", help="ServeConfig.backend (CPU only)")
    p.add_argument("--ingress", nargs="+", choices=["haproxy", "proxy"], default=[ServeConfig.ingress],
                   help="ServeConfig.ingress; several: each in turn, in the same run")
    p.add_argument("--texts", type=int, default=500, help="distinct SST-2 sentences cycled through")
    p.add_argument("--out", default=str(REPO / "outputs" / "bench" / "serve_load.json"))
    return run_and_report(p.parse_args(argv), argv, __file__, run_bench, markdown)


def run_and_report(args, argv: list[str] | None, script: str, run, to_markdown) -> int:
    """What every serving benchmark does around its run: offline Hugging Face, SST-2 present, the machine and its
    load average before and after, the command, the wall time; then the JSON at args.out and the Markdown."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not SST2.exists():
        print(f"error: SST-2 not found at {SST2}; set BERTRAY_SHARED_DATA", file=sys.stderr)
        return 2
    info = machine()
    t0 = time.time()
    out = run(args)
    out.update(machine=info, args=vars(args), wall_s=time.time() - t0,
               command="python " + " ".join([os.path.relpath(script, REPO), *(argv or sys.argv[1:])]))
    out["machine"]["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(to_markdown(out))
    print(f"\n(JSON: {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tuning ingest at scale: memory per training worker, in the object store, and ingest time, for generated
labeled sets of two sizes (default 100k and 1M rows, max_length 128).

    nice -n 5 .venv/bin/python bench/finetune_memory.py                       # this checkout
    nice -n 5 .venv/bin/python bench/finetune_memory.py --bertray-src ../old  # another checkout, as the baseline

Each size runs `bertray.finetune.run` with 2 workers on a fresh local Ray, with a tiny random BERT (2 layers,
width 32: the model's own memory is small, so what grows with the rows is the data) for a few steps, while a
sampler records every 0.2 s the RSS of each Ray Train worker process, of the driver, and the object store's use
(`ray memory --stats-only`). Ingest time is reading, checking and tokenizing the rows into the object store, timed
on its own before the run (checkouts that tokenize inside each worker have no such step: compare their run time).
Texts: random runs of SST-2 words, 8-60 words each (about 10-80 tokens). The baseline of the ratio is the
smaller size, same run: per-worker memory should grow far less than the rows do.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import command, machine, report, shared_data, tiny_bert

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, re, subprocess, sys, threading, time
sys.path.insert(0, {src!r})
import psutil, ray
from bertray import config as C, finetune
ray.init(num_cpus={cpus}, include_dashboard=False, log_to_driver=False)
peak = {{"worker": 0, "driver": 0, "store": 0}}
first_step = []
stop = threading.Event()

def store_mib():
    from ray._private.internal_api import memory_summary
    m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return int(m.group(1)) if m else 0

def sample():
    try:
        _sample()
    except Exception as exc:  # a dead sampler would report peaks of nothing: say so instead
        peak["error"] = repr(exc)

def _sample():
    me = psutil.Process()
    n = 0
    while not stop.is_set():
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                title = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
                # Ray titles its worker processes "ray::RayTrainWorker..."; this script's own command line holds
                # the name too, so the driver is left out by pid.
                if "ray::RayTrainWorker" in title and p.pid != me.pid:
                    peak["worker"] = max(peak["worker"], p.memory_info().rss)
            except psutil.Error:
                pass
        peak["driver"] = max(peak["driver"], me.memory_info().rss)
        if n % 10 == 0:
            peak["store"] = max(peak["store"], store_mib() * 2**20)
        n += 1
        time.sleep(0.2)

threading.Thread(target=sample, daemon=True).start()
cfg = C.load(C.FinetuneConfig, data={{
    "model": {{"base": {model!r}, "max_length": 128}},
    "data": {{"train": {data!r}, "validation_fraction": 0.01, "labels": ["negative", "positive"]}},
    "train": {{"batch_size": 32, "max_steps": {steps}, "eval_every": {steps}, "log_every": 1}},
    "run": {{"name": "mem", "storage": {runs!r}, "num_workers": 2, "max_failures": 0}}}})
ingest_s = None
if hasattr(finetune, "ingest"):  # this checkout tokenizes on the driver's cluster once; time that on its own
    t0 = time.time()
    train, val = finetune.load_splits(cfg)
    [finetune.ingest(part, cfg.model, training) for part, training in ((train, True), (val, False))]
    ingest_s = time.time() - t0
    del train, val
t0 = time.time()
finetune.run(cfg)
stop.set()
print("RESULT " + json.dumps({{"peak": peak, "wall_s": time.time() - t0, "ingest_s": ingest_s}}))
"""


def corpus(path: Path, rows: int, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = " ".join(pq.read_table(shared_data() / "sst2" / "train.parquet").column("text").to_pylist()[:20000]).split()
    rng = np.random.default_rng(seed)
    vocab = np.array(words)
    lengths = rng.integers(8, 61, size=rows)
    flat = vocab[rng.integers(0, len(vocab), size=int(lengths.sum()))]
    ends = np.cumsum(lengths)
    texts = [" ".join(flat[e - n:e]) for e, n in zip(ends, lengths)]
    pq.write_table(pa.table({"text": texts, "label": rng.integers(0, 2, size=rows)}), path)


def run_size(rows: int, work: Path, model: str, src: str, cpus: int, steps: int) -> dict:
    data = work / f"train-{rows}.parquet"
    if not data.exists():
        corpus(data, rows)
    code = CHILD.format(src=src, cpus=cpus, model=model, data=str(data), runs=str(work / f"runs-{rows}"), steps=steps)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": src}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(work))
    if out.returncode != 0:
        raise SystemExit(f"run of {rows:,} rows failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])
    if "error" in result["peak"]:
        raise SystemExit(f"run of {rows:,} rows: the memory sampler failed: {result['peak']['error']}")
    result["rows"] = rows
    result["process_wall_s"] = time.time() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs given to the local Ray")
    p.add_argument("--steps", type=int, default=4, help="training steps per run (the data is what is measured)")
    p.add_argument("--bertray-src", default=str(REPO), help="the bertray checkout to measure")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = tiny_bert(work / "tiny-bert")
        info = machine()
        results = [run_size(n, work, model, str(Path(args.bertray_src).resolve()), args.cpus, args.steps)
                   for n in args.rows]
    out = {"machine": info, "args": vars(args), "results": results,
           "command": command("finetune_memory.py", argv)}
    return report(out, args.json, markdown)


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; load average {m['load_avg']}. Command: `{out['command']}`; "
             f"bertray from {out['args']['bertray_src']}.", "",
             "| rows | peak RSS per worker MiB | driver peak MiB | object store peak MiB | ingest s | run wall s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in out["results"]:
        pk = r["peak"]
        lines.append(f"| {r['rows']:,} | {pk['worker'] / 2**20:,.0f} | {pk['driver'] / 2**20:,.0f} | "
                     f"{pk['store'] / 2**20:,.0f} | {r['ingest_s'] or 0:.1f} | {r['wall_s']:.0f} |")
    if len(out["results"]) > 1:
        a, b = out["results"][0], out["results"][-1]
        lines += ["", f"{b['rows'] / a['rows']:.0f}x the rows: per-worker peak {b['peak']['worker'] / a['peak']['worker']:.2f}x, "
                  f"object store {b['peak']['store'] / max(a['peak']['store'], 1):.2f}x, wall {b['wall_s'] / a['wall_s']:.2f}x."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Ray Train start-up: the wall time of a short fine-tuning run, and the memory of Ray Train's controller.

    nice -n 5 .venv/bin/python bench/train_startup.py --baseline-src ../old   # this checkout against another

A run is `bertray.finetune.run` (or, with --stage pretrain, `bertray.pretrain.run` streaming the same texts) of a
tiny random BERT (2 layers, width 32) for 4 steps on 400 SST-2 rows with one worker: so short that its wall time is
start-up (the controller, the worker group and its imports, the ingest, the evaluation and the export). Each checkout runs in a child process with a local Ray of its own: one untimed
run to warm Ray's worker pool, then --runs timed ones, while a sampler records the peak RSS of each
`ray::TrainController` process. The checkouts take turns, --rounds times. Baseline: the other checkout, in the same
invocation on the same machine; figures are medians over every timed run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, command, machine, report, shared_data, tiny_bert

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {src!r})
import psutil, ray
from bertray import config as C, finetune, pretrain
ray.init(num_cpus={cpus}, include_dashboard=False, log_to_driver=False)
peaks = {{}}

def sample():
    while True:
        for p in psutil.process_iter(["name", "memory_info"]):
            if (p.info["name"] or "").startswith("ray::TrainController") and p.info["memory_info"]:
                peaks[p.pid] = max(peaks.get(p.pid, 0), p.info["memory_info"].rss)
        time.sleep(0.1)

threading.Thread(target=sample, daemon=True).start()
walls = []
for i in range({runs} + 1):
    data = {{
        "model": {{"base": {model!r}, "max_length": 32}},
        "data": {{"train": {train!r}, "validation": {validation!r}}},
        "train": {{"batch_size": 16, "max_steps": 4, "eval_every": 4}},
        "run": {{"name": f"r{{i}}", "storage": {runs_dir!r} + f"/{{time.time()}}", "num_workers": 1}}}}
    stage = {stage!r}
    if stage == "pretrain":
        data["mlm"] = {{"eval_rows": 100}}
    cfg = C.load(C.PretrainConfig if stage == "pretrain" else C.FinetuneConfig, data=data)
    t0 = time.time()
    (pretrain if stage == "pretrain" else finetune).run(cfg)
    walls.append(time.time() - t0)
time.sleep(0.3)
print("RESULT " + json.dumps({{"walls": walls[1:], "controller_rss": list(peaks.values())}}))
"""


def run_child(src: str, work: Path, model: str, runs: int, cpus: int, stage: str) -> dict:
    code = CHILD.format(src=src, cpus=cpus, runs=runs, model=model, stage=stage, train=str(work / "train.parquet"),
                        validation=str(work / "validation.parquet"), runs_dir=str(work / "runs"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": src}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(work))
    if out.returncode != 0 or "RESULT " not in out.stdout:
        raise SystemExit(f"runs of {src} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.split("RESULT ", 1)[1].splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bertray-src", default=str(REPO), help="the checkout to measure (default: this one)")
    p.add_argument("--baseline-src", default=None, help="another checkout, measured in turns with it")
    p.add_argument("--stage", choices=["finetune", "pretrain"], default="finetune")
    p.add_argument("--runs", type=int, default=3, help="timed runs per turn (after one untimed)")
    p.add_argument("--rounds", type=int, default=2, help="turns per checkout")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs given to each local Ray")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pyarrow.parquet as pq

    sources = {"measured": str(Path(args.bertray_src).resolve())}
    if args.baseline_src:
        sources["baseline"] = str(Path(args.baseline_src).resolve())
    results = {name: {"walls": [], "controller_rss": []} for name in sources}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sst2 = shared_data() / "sst2"
        pq.write_table(pq.read_table(sst2 / "train.parquet").slice(0, 400), work / "train.parquet")
        pq.write_table(pq.read_table(sst2 / "validation.parquet").slice(0, 100), work / "validation.parquet")
        model = tiny_bert(work / "tiny-bert")
        info = machine()
        for _ in range(args.rounds):
            for name, src in sources.items():
                r = run_child(src, work, model, args.runs, args.cpus, args.stage)
                for key in results[name]:
                    results[name][key] += r[key]
    out = {"machine": info, "sources": sources, "results": results, "args": vars(args),
           "command": command("train_startup.py", argv)}
    return report(out, args.json, markdown)


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores; load average {m['load_avg']}. Command: `{out['command']}`.",
             "", "| checkout | runs | run wall s (median, min-max) | controller peak RSS MiB (median) |",
             "|---|---:|---|---:|"]
    med = {}
    for name, r in out["results"].items():
        med[name] = (statistics.median(r["walls"]), statistics.median(r["controller_rss"]) / 2**20)
        lines.append(f"| {name}: {out['sources'][name]} | {len(r['walls'])} | {med[name][0]:.1f} "
                     f"({min(r['walls']):.1f}-{max(r['walls']):.1f}) | {med[name][1]:,.0f} |")
    if "baseline" in med:
        (w, c), (bw, bc) = med["measured"], med["baseline"]
        lines += ["", f"Measured against baseline: run wall {w / bw:.2f}x ({w - bw:+.1f} s), "
                      f"controller memory {c / bc:.2f}x ({c - bc:+,.0f} MiB)."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

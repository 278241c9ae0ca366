"""Where a small or medium `bertray label` job's time goes beyond its compute.

    nice -n 5 .venv/bin/python bench/job_cost.py                 # 2,000 and 40,000 SST-2 sentences
    nice -n 5 .venv/bin/python bench/job_cost.py --rows 2000 --json cost.json

Model: the embedded MiniLM-L6 with a random 2-class head (speed does not depend on the weights). For each corpus size:
  - compute: our Predictor in a plain loop without Ray, model already loaded (what the job cannot avoid), and the
    same process's model load;
  - `transformers.pipeline(batch_size=32)` over the list, model already loaded (the baseline the issue compares to);
  - `bertray label` through the real CLI on a fresh local Ray (wall time of the whole command);
  - `label.run` on an already-running cluster (after one small warm-up job), with the summary's planning and
    labeling times.
And once, on the running cluster, the parts of the fixed cost measured alone: `ray.init` of a fresh local cluster
(in the CLI's process), a fresh inference actor from start to model loaded, a tokenize task on a fresh worker
process, and a Ray Data run of the same three stages doing no work over the same number of units.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, minilm_classifier
from label_throughput import LABELS, label_cli, sst2_sentences, write_corpus

REPO = Path(__file__).resolve().parents[1]


def compute_times(model_dir: str, texts: list[str]) -> dict:
    """In a fresh process, as a user's script would: model load, then Predictor and pipeline compute."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(REPO / 'bench')!r})
t = time.perf_counter()
from bertray.predictor import Predictor
Predictor({model_dir!r})
load = time.perf_counter() - t
from label_throughput import time_pipeline, time_predictor
texts = json.loads(sys.stdin.read())
print(json.dumps({{"load": load, "predictor": time_predictor({model_dir!r}, texts, None),
                  "pipeline": time_pipeline({model_dir!r}, texts)}}))
"""
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True,
                         cwd=REPO, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parts_alone(model_dir: str, corpus: Path, units: int) -> dict:
    """The fixed costs one at a time, on the running cluster."""
    import ray
    import ray.data

    from bertray import label
    from bertray.config import LabelConfig

    cfg = LabelConfig(model=model_dir, input=str(corpus), output="/tmp/unused", id_column=None)

    @ray.remote(num_cpus=1)
    class Actor:
        def __init__(self):
            self.infer = label.Infer(cfg, LABELS)

        def ready(self):
            return True

    t = time.perf_counter()
    a = Actor.remote()
    ray.get(a.ready.remote())
    actor = time.perf_counter() - t
    ray.kill(a)

    @ray.remote(num_cpus=0.5, max_calls=1)  # max_calls=1: the worker exits after it, so each call is a fresh one
    def tokenize_fresh():
        t = time.perf_counter()
        label.encode_texts(["a sentence to tokenize"], label._encoder(model_dir, None))
        return time.perf_counter() - t

    t = time.perf_counter()
    inside = ray.get(tokenize_fresh.remote())
    task = time.perf_counter() - t

    class Noop:
        def __call__(self, batch):
            return batch

    t = time.perf_counter()
    ds = ray.data.from_items([{"u": i} for i in range(units)], override_num_blocks=units)
    # As label._task_resources does when the actors take every CPU: the tasks run beside them unreserved.
    ds = ds.map_batches(lambda b: b, batch_size=1, batch_format="pyarrow", num_cpus=0)
    ds = ds.map_batches(Noop, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=2),
                        num_cpus=1)
    ds = ds.map_batches(lambda b: b, batch_size=1, batch_format="pyarrow", num_cpus=0)
    assert sum(1 for _ in ds.iter_rows()) == units
    noop = time.perf_counter() - t
    return {"actor_ready": actor, "tokenize_task_fresh": task, "tokenize_task_inside": inside,
            "ray_data_noop": noop, "units": units}


def measure(args) -> dict:
    import ray

    from bertray import label
    from bertray.config import LabelConfig

    work = Path(tempfile.mkdtemp(prefix="bench-job-cost-"))
    model_dir = minilm_classifier(work / "model", LABELS)
    sentences = sst2_sentences()
    rows = {}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import ray; ray.init(num_cpus=2); ray.shutdown()"], check=True,
                   capture_output=True)
    ray_init = time.perf_counter() - t
    for n in args.rows:
        texts = [sentences[i % len(sentences)] for i in range(n)]
        corpus = write_corpus(work / f"corpus-{n}", texts)
        r = {"rows": n, **compute_times(model_dir, texts)}
        r["cli"] = label_cli(model_dir, corpus, work / f"out-cli-{n}", LabelConfig().rows_per_file)["wall"]
        rows[n] = r
    ray.init(num_cpus=2)
    try:
        warm = write_corpus(work / "warm", sentences[:256])
        label.run(LabelConfig(model=model_dir, input=str(warm), output=str(work / "out-warm"), id_column=None))
        for n, r in rows.items():
            out = work / f"out-warm-{n}"
            t = time.perf_counter()
            s = label.run(LabelConfig(model=model_dir, input=str(work / f"corpus-{n}"), output=str(out),
                                      id_column=None))
            r["warm"] = time.perf_counter() - t
            r["warm_plan"] = s["seconds"]["plan"]
        n0 = args.rows[0]
        units = len(label.make_plan(LabelConfig(model=model_dir, input=str(work / f"corpus-{n0}"),
                                                output=str(work / "unused"), id_column=None)).units)
        parts = parts_alone(model_dir, work / f"corpus-{n0}", units)
    finally:
        ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    return {"machine": machine(), "ray_init_fresh": ray_init, "rows": list(rows.values()), "parts": parts}


def report(r: dict) -> str:
    lines = ["| rows | model load | Predictor compute | pipeline compute | label, warm cluster (plan) | "
             "label CLI, fresh Ray | warm − Predictor | CLI − warm | warm ÷ pipeline | CLI ÷ pipeline |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        lines.append(f"| {x['rows']:,} | {x['load']:.1f} s | {x['predictor']:.1f} s | {x['pipeline']:.1f} s | "
                     f"{x['warm']:.1f} s ({x['warm_plan']:.1f}) | {x['cli']:.1f} s | "
                     f"{x['warm'] - x['predictor']:.1f} s | {x['cli'] - x['warm']:.1f} s | "
                     f"{x['pipeline'] / x['warm']:.2f}× | {x['pipeline'] / x['cli']:.2f}× |")
    p = r["parts"]
    lines += ["", "| fixed cost, measured alone | seconds |", "|---|---:|",
              f"| `ray.init` of a fresh local cluster (2 CPUs) | {r['ray_init_fresh']:.1f} |",
              f"| a fresh inference actor, start to model loaded | {p['actor_ready']:.1f} |",
              f"| a tokenize task on a fresh worker (inside the task) | {p['tokenize_task_fresh']:.1f} "
              f"({p['tokenize_task_inside']:.1f}) |",
              f"| Ray Data, the three stages doing nothing, {p['units']} units | {p['ray_data_noop']:.1f} |",
              "", f"Machine: {r['machine']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[2000, 40000])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    r = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    print(report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What fine-tuning's ingest costs for small splits: Ray Data tasks against encoding in the driver, in one run.

    .venv/bin/python bench/ingest_cost.py                 # about a minute on 2 cores

For each split size (SST-2 train sentences, the embedded MiniLM's tokenizer, max_length 128), the wall time of
`finetune.tokenize_on_cluster` (the Ray Data pipeline: one block per 2,048 rows or more) and of the in-process
encoding `finetune.tokenize` uses for a split of one block (the first size includes loading the tokenizer in the
driver), on a local Ray started by this script (2 CPUs). The first pipeline runs on the fresh cluster (its workers
start and import transformers, as in a `bertray finetune` on a new local Ray); the next ones find those workers
warm (a sweep's trials, or a long-lived cluster). Both give the same ids; the script checks it.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common import machine, shared_data

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[400, 2000])
    p.add_argument("--repeat", type=int, default=3, help="pipeline runs per size after the first (warm workers)")
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from bertray import finetune
    from bertray.config import ModelConfig

    m = ModelConfig(base="embedded", max_length=128)
    sentences = pq.read_table(shared_data() / "sst2" / "train.parquet", columns=["text"]).column("text").to_pylist()
    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - t0
    rows = []
    for n in args.sizes:
        texts = sentences[:n]
        table = pa.table({"row": np.arange(n, dtype=np.int64), "text": pa.array(texts, pa.string())})
        cluster = []
        for _ in range(1 + args.repeat):
            t0 = time.perf_counter()
            on_cluster, _ = finetune.tokenize_on_cluster(table, m)
            cluster.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        here, _ = finetune.tokenize(texts, m)
        here_s = time.perf_counter() - t0
        assert np.array_equal(on_cluster.values, here.values) and np.array_equal(on_cluster.offsets, here.offsets)
        rows.append((n, cluster[0] if n == args.sizes[0] else None, float(np.median(cluster[1:])), here_s))
    ray.shutdown()

    mc = machine()
    print(f"### Fine-tuning ingest of small splits: Ray Data pipeline vs encoding in the driver\n\n"
          f"Machine: {mc['cpu']}, {mc['cores']} cores, load average {mc['load_avg']}; local Ray with {args.cpus} CPUs "
          f"(`ray.init` took {init_s:.1f} s, not counted). Command: `python bench/ingest_cost.py "
          f"--sizes {' '.join(map(str, args.sizes))} --repeat {args.repeat}`.\n")
    print("| texts | Ray Data, fresh workers | Ray Data, warm workers (median) | in the driver |")
    print("|---:|---:|---:|---:|")
    for n, cold, warm, here in rows:
        print(f"| {n:,} | {f'{cold:.2f} s' if cold is not None else '—'} | {warm:.2f} s | {here:.3f} s |")
    print("\nThe driver's first size includes loading the tokenizer there, as a fresh `bertray finetune` driver does.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

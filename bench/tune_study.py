"""The study's learning-rate x batch-size grid in miniature, and ASHA against the full grid, with `bertray tune`.

    # per-epoch evaluations; frozen and full grids, ASHA with reduction factor 3 (about 25 min on 2 busy cores)
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/tune_study.py
    # ASHA deciding every 5 steps with reduction factor 2, against the full grid on the same schedule
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/tune_study.py --eval-every 5 --rf 2 --skip frozen
    # the wider grid, ASHA's rungs comparing validation loss (trials still ranked by accuracy)
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/tune_study.py --lrs 3e-3 1e-3 3e-4 1e-4 3e-5 1e-5 \
        --eval-every 5 --rf 3 --skip frozen --scheduler-metric loss
    # 640 train rows and all 872 validation rows (one sentence = 0.11 points), ASHA's rungs at 0.5 and 1.5 epochs
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/tune_study.py --train-rows 640 --val-rows 872 \
        --lrs 3e-3 1e-3 3e-4 1e-4 3e-5 1e-5 --eval-every 10 --skip frozen --scheduler-metric loss --grace 0.5
    # the study's 5 x 5 shape (lr x batch {16, 24, 32, 48, 64}) for full fine-tuning: 25 trials, about 36 min
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/tune_study.py --train-rows 640 --val-rows 872 \
        --lrs 1e-3 3e-4 1e-4 3e-5 1e-5 --batches 16 24 32 48 64 --eval-every 10 --skip frozen \
        --scheduler-metric loss --grace 0.5

ASHA's rungs are in epochs trained (search.grace_period x reduction_factor^k); in the earlier runs BENCHMARKS.md
lists they were in evaluations, and the first three commands above ran with a grace period of one evaluation.

The study swept lr in {1e-2, 5e-3, 2e-3, 1e-3, 5e-4} x batch in {16, 24, 32, 48, 64} per dataset, with a frozen
encoder. Here: lr {1e-2, 2e-3, 5e-4} x batch {16, 32} (by default) on a small SST-2 subset with the embedded MiniLM on CPU, once
with the encoder frozen (classification head only) and once fully fine-tuned; then ASHA on the same space as the
full fine-tuning grid. Each cell is the best validation accuracy of that trial over its evaluations (once per
epoch, or every --eval-every steps): the checkpoint bertray keeps. Every sweep is an ordinary `bertray.tune.run`,
so its trials.md/csv and plots are under --out too. Results go to stdout and <out>/tune_study.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import platform
import sys
import time
from pathlib import Path

from common import shared_data

REPO = Path(__file__).resolve().parents[1]
SST2 = shared_data() / "sst2"


def sweep_config(args, name: str, freeze: bool, scheduler: str) -> dict:
    return {
        "model": {"base": "embedded", "max_length": args.max_length, "freeze_encoder": freeze},
        "data": {"train": str(SST2 / "train.parquet"), "validation": str(SST2 / "validation.parquet"),
                 "max_train_rows": args.train_rows, "max_validation_rows": args.val_rows},
        "train": {"epochs": float(args.epochs), "eval_every": args.eval_every, "metric": "accuracy",
                  "log_every": 10_000, "seed": 42},
        "run": {"name": name, "storage": args.out, "keep_checkpoints": 1, "max_failures": 0},
        "search": {"algorithm": "grid", "scheduler": scheduler, "grace_period": args.grace, "reduction_factor": args.rf,
                   "scheduler_metric": args.scheduler_metric if scheduler != "none" else None,
                   "max_concurrent_trials": args.concurrency, "cpus_per_trial": 1,
                   "space": {"optim.lr": {"grid": args.lrs}, "train.batch_size": {"grid": args.batches}}},
    }


def run_sweep(args, name: str, freeze: bool, scheduler: str) -> dict:
    from bertray import config as C
    from bertray import tune

    cfg = C.load(C.TuneConfig, data=sweep_config(args, name, freeze, scheduler))
    start = time.perf_counter()
    summary = tune.run(cfg)
    summary["wall_s"] = time.perf_counter() - start
    with open(Path(args.out) / name / "trials.csv") as f:
        summary["rows"] = list(csv.DictReader(f))
    return summary


def grid_table(summary: dict, lrs: list[float], batches: list[int]) -> str:
    cell = {(float(r["optim.lr"]), int(r["train.batch_size"])): r for r in summary["rows"]}
    lines = ["| lr \\ batch | " + " | ".join(str(b) for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for lr in lrs:
        out = []
        for b in batches:
            r = cell.get((lr, b))
            acc = f"{100 * float(r['best accuracy']):.1f}" if r and r["best accuracy"] else "-"
            out.append(acc + ("" if not r or r["status"] == "finished" else f" ({r['status']}, {r['steps run']} steps)"))
        lines.append(f"| {lr:g} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def main() -> int:
    from bertray.config import SearchConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-rows", type=int, default=160)
    p.add_argument("--val-rows", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=None,
                   help="optimizer steps between evaluations (default: once per epoch); ASHA decides at evaluations")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 2e-3, 5e-4])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    p.add_argument("--rf", type=float, default=SearchConfig.reduction_factor, help="ASHA reduction factor")
    p.add_argument("--grace", type=float, default=SearchConfig.grace_period,
                   help="ASHA grace period, in epochs (the first rung)")
    p.add_argument("--scheduler-metric", choices=["accuracy", "loss"], default=None,
                   help="what ASHA's rungs compare (default: accuracy, which also ranks the trials)")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once (one CPU each)")
    p.add_argument("--out", default="/tmp/bertray-tune-study")
    p.add_argument("--skip", nargs="*", default=[], choices=["frozen", "full", "asha"])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from bertray import runtime

    runtime.init_ray()
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    report = ["# bertray tune study (miniature)\n",
              f"machine: {platform.node()}, {platform.processor() or platform.machine()}, Ray sees {cpus:g} CPUs; "
              f"command: {' '.join(sys.argv)}\n",
              f"data: SST-2, seeded samples of {args.train_rows} train and {args.val_rows} validation rows; "
              f"embedded all-MiniLM-L6-v2, max_length {args.max_length}, {args.epochs} epochs, linear decay with "
              f"6% warmup, AdamW wd 0.01, seed 42; cells: best validation accuracy (%) over the evaluations "
              f"({'every %d steps' % args.eval_every if args.eval_every else 'once per epoch'})\n"]
    results = {}
    for name, freeze, sched in (("frozen", True, "none"), ("full", False, "none"), ("asha", False, "asha")):
        if name in args.skip:
            continue
        s = run_sweep(args, f"study-{name}", freeze, sched)
        results[name] = s
        title = {"frozen": "frozen encoder (head only), full grid", "full": "full fine-tuning, full grid",
                 "asha": f"full fine-tuning, ASHA (grace {args.grace:g} epochs, reduction factor {args.rf:g}, rungs on "
                         f"validation {args.scheduler_metric or 'accuracy'})"}[name]
        report += [f"\n## {title}\n", grid_table(s, args.lrs, args.batches), "",
                   f"trial-steps {s['trial_steps']}, best {100 * s['best']['value']:.1f}% "
                   f"({json.dumps(s['best']['config'])}), wall {s['wall_s']:.0f} s, statuses {s['status_counts']}\n"]
        print("\n".join(report[-4:]), flush=True)
    if "full" in results and "asha" in results:
        g, a = results["full"], results["asha"]
        saved = 1 - a["trial_steps"] / g["trial_steps"]
        gap = 100 * (g["best"]["value"] - a["best"]["value"])
        report += ["\n## ASHA vs full grid (full fine-tuning, same space)\n",
                   "| | trial-steps | best val. accuracy | wall |", "|---|---|---|---|",
                   f"| full grid | {g['trial_steps']} | {100 * g['best']['value']:.1f}% | {g['wall_s']:.0f} s |",
                   f"| ASHA | {a['trial_steps']} | {100 * a['best']['value']:.1f}% | {a['wall_s']:.0f} s |", "",
                   f"ASHA spent {100 * saved:.0f}% fewer trial-steps; its best is {gap:.1f} points below the grid's "
                   f"(target: >= 40% fewer, within 0.5 points: {'met' if saved >= 0.4 and gap <= 0.5 else 'NOT met'})\n"]
    text = "\n".join(report)
    print(text)
    (Path(args.out) / "tune_study.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

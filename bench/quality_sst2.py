"""Quality figure for BENCHMARKS.md: the embedded MiniLM fine-tuned on full SST-2 train, scored on SST-2 validation.

    nohup nice -n 5 .venv/bin/python bench/quality_sst2.py > /tmp/quality.log 2>&1 &

Runs the real `bertray finetune` stage (`bertray.finetune.run`) on bench/configs/sst2-full.yaml, then writes a JSON
result and prints a Markdown block: accuracy, macro-F1, every intermediate evaluation, the config, wall time, and
the machine (with its load average, since other work sharing the CPU inflates wall time). Target: accuracy >= 0.90.
Re-running with the same run name resumes the run (its wall time then covers only the resumed part): pass
`--set run.name=...` for a fresh one.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from common import machine

REPO = Path(__file__).resolve().parents[1]
TARGET = 0.90


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "bench/configs/sst2-full.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per training worker (BERTRAY_TORCH_THREADS); default: CPU cores / workers")
    p.add_argument("--out", default="/tmp/bench-runs/quality_sst2.json", help="where the JSON result goes")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    from bertray import checkpoint, config, finetune, runtime

    cfg = config.load(config.FinetuneConfig, args.config, args.set)
    # Ray starts each worker with OMP_NUM_THREADS = its CPU share; set the thread count explicitly so one worker
    # uses the whole machine, and say so in the result.
    threads = args.threads or max(1, (os.cpu_count() or 1) // cfg.run.num_workers)
    os.environ["BERTRAY_TORCH_THREADS"] = str(threads)
    cfg.run.cpus_per_worker = float(threads)

    before = machine()
    t0 = time.perf_counter()
    runtime.init_ray(cfg.run.ray_address)
    summary = finetune.run(cfg)
    wall = time.perf_counter() - t0
    after = machine()

    history = (checkpoint.read_meta(summary["model"]) or {}).get("history", [])
    evals = [{k: h[k] for k in ("step", "accuracy", "macro_f1", "loss") if k in h} for h in history if "accuracy" in h]
    m, fm = summary["metrics"], summary["final_metrics"]
    result = {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "target_accuracy": TARGET,
        "meets_target": m["accuracy"] >= TARGET,
        "best_step": summary["best_step"],
        "final_step": summary["final_step"],
        "evals": evals,
        "train_samples_per_s": fm.get("samples_per_s"),
        "train_tokens_per_s": fm.get("tokens_per_s"),
        "wall_s": round(wall, 1),
        "threads_per_worker": threads,
        "config": config.to_dict(cfg),
        "config_file": os.path.relpath(args.config, REPO),
        "overrides": args.set,
        "model": summary["model"],
        "machine": {**after, "load_avg_at_start": before["load_avg"]},
        "versions": {"python": platform.python_version(), **_versions()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))
    print(f"\nJSON result: {args.out}")
    return 0 if result["meets_target"] else 1


def _versions() -> dict:
    import ray
    import torch
    import transformers

    return {"ray": ray.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


def markdown(r: dict) -> str:
    c = r["config"]
    cmd = "python bench/quality_sst2.py" + "".join(f" --set {s}" for s in r["overrides"])
    lines = [
        "### Quality: embedded MiniLM (all-MiniLM-L6-v2) on SST-2",
        "",
        "| metric | value |",
        "|---|---|",
        f"| validation accuracy (872 rows) | **{r['accuracy']:.4f}** (target >= {r['target_accuracy']:.2f}: "
        f"{'met' if r['meets_target'] else 'NOT met'}) |",
        f"| validation macro-F1 | {r['macro_f1']:.4f} |",
        f"| best step / final step | {r['best_step']} / {r['final_step']} |",
        f"| wall time (Ray start to exported model) | {r['wall_s'] / 60:.1f} min |",
        f"| training throughput | {r['train_samples_per_s']:.1f} samples/s, {r['train_tokens_per_s']:.0f} real tokens/s |",
        f"| machine | {r['machine']['cpu']}, {r['machine']['cores']} cores; load average at start "
        f"{r['machine']['load_avg_at_start']}, at end {r['machine']['load_avg']} |",
        f"| workers x torch threads | {c['run']['num_workers']} x {r['threads_per_worker']} |",
        "",
        f"Command: `{cmd}` (config `{r['config_file']}`: max_length {c['model']['max_length']}, batch "
        f"{c['train']['batch_size']} per worker x {c['run']['num_workers']} worker(s), lr {c['optim']['lr']}, {c['optim']['schedule']} schedule, warmup "
        f"{c['optim']['warmup_ratio']:.0%}, {c['train']['epochs']} epoch(s), weight decay {c['optim']['weight_decay']}, "
        f"seed {c['train']['seed']}).",
        "",
        "| step | accuracy | macro-F1 | loss |",
        "|---|---|---|---|",
        *(f"| {e['step']} | {e['accuracy']:.4f} | {e['macro_f1']:.4f} | {e['loss']:.4f} |" for e in r["evals"]),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Quality of the task shapes beyond single-label sentences, each against a fair baseline in the same run.

    nohup nice -n 5 .venv/bin/python bench/task_shapes.py goemotions > /tmp/goemotions.log 2>&1 &
    nohup nice -n 5 .venv/bin/python bench/task_shapes.py mrpc > /tmp/mrpc.log 2>&1 &

goemotions: the embedded MiniLM fine-tuned (`bertray.finetune.run`) on the full GoEmotions train split (28 labels,
multi-label), thresholds tuned per label on the validation split; scored on the test split (`bertray.evaluate`)
with those thresholds and with one global 0.5. Published anchor: BERT-base, macro-F1 0.46 (Demszky et al. 2020).

mrpc / rte: the same model fine-tuned twice on the GLUE train split with one recipe: the two sentences encoded as a
pair (data.text_pair_column: segment ids, the longer side cut first) and the two joined into one text
(data.text_columns: [sentence1, sentence2]); accuracy (and F1 of the positive class) on the validation split.

Prints one Markdown table and writes the raw results as JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from common import machine, shared_data

RUNS = "/tmp/bench-runs"


def finetune(data: dict, name: str, epochs: float, max_length: int, lr: float, batch: int, metric: str,
             class_weights: str = "none") -> tuple[dict, float]:
    from bertray import config, finetune as ft

    cfg = config.load(config.FinetuneConfig, data={
        "model": {"max_length": max_length},
        "data": data,
        "optim": {"lr": lr},
        "train": {"batch_size": batch, "epochs": epochs, "metric": metric, "log_every": 100,
                  "class_weights": class_weights},
        "run": {"name": name, "storage": RUNS, "num_workers": 2, "keep_checkpoints": 1, "overwrite": True},
    })
    t = time.perf_counter()
    return ft.run(cfg), time.perf_counter() - t


def goemotions(args) -> dict:
    from bertray import evaluate

    d = shared_data() / "goemotions"
    summary, seconds = finetune({"train": str(d / "train.parquet"), "validation": str(d / "validation.parquet"),
                                 "label_column": "labels"}, "goemotions", args.epochs, 64, args.lr, 16, "macro_f1",
                                class_weights=args.class_weights)
    test = evaluate.evaluate(summary["model"], str(d / "test.parquet"), f"{RUNS}/goemotions-test",
                             label_column="labels")
    keys = ("macro_f1", "micro_f1", "samples_f1", "accuracy", "macro_f1_at_0_5", "micro_f1_at_0_5",
            "label_cardinality", "predicted_cardinality", "n")
    return {"task": "goemotions", "epochs": args.epochs, "lr": args.lr, "class_weights": args.class_weights,
            "train_seconds": seconds, "best_step": summary["best_step"], "final_step": summary["final_step"],
            "validation": {k: summary["metrics"].get(k) for k in keys}, "test": {k: test.get(k) for k in keys},
            "test_per_label_f1": {n: v["f1"] for n, v in test["per_class"].items()}}


def pairs(args) -> dict:
    from bertray import evaluate

    d = shared_data() / args.task
    names = json.loads((d / "labels.json").read_text())
    out = {"task": args.task, "epochs": args.epochs, "lr": args.lr, "labels": names}
    for variant, data in {
        "pair": {"text_columns": ["sentence1"], "text_pair_column": "sentence2"},
        "joined": {"text_columns": ["sentence1", "sentence2"]},
    }.items():
        summary, seconds = finetune({"train": str(d / "train.parquet"), "validation": str(d / "validation.parquet"),
                                     **data}, f"{args.task}-{variant}", args.epochs, 128, args.lr, 16, "accuracy")
        ev = evaluate.evaluate(summary["model"], str(d / "validation.parquet"), f"{RUNS}/{args.task}-{variant}-eval",
                               text_columns=data["text_columns"], text_pair_column=data.get("text_pair_column"))
        out[variant] = {"accuracy": ev["accuracy"], "macro_f1": ev["macro_f1"],
                        "f1_positive": ev["per_class"][names[-1]]["f1"], "n": ev["n"], "train_seconds": seconds,
                        "best_step": summary["best_step"]}
    return out


def report(r: dict) -> str:
    if r["task"] == "goemotions":
        v, t = r["validation"], r["test"]
        lines = [f"GoEmotions, embedded MiniLM, {r['epochs']:g} epoch(s) at lr {r['lr']:g}, class_weights "
                 f"{r['class_weights']} (train {r['train_seconds'] / 60:.0f} min; best step {r['best_step']} of "
                 f"{r['final_step']})",
                 "", "| split | macro-F1 tuned | macro-F1 at 0.5 | micro-F1 tuned | micro-F1 at 0.5 | samples-F1 | "
                 "subset accuracy | labels per row (true / predicted) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, m in (("validation (thresholds tuned here)", v), ("test", t)):
            lines.append(f"| {name} | {m['macro_f1']:.3f} | {m['macro_f1_at_0_5']:.3f} | {m['micro_f1']:.3f} | "
                         f"{m['micro_f1_at_0_5']:.3f} | {m['samples_f1']:.3f} | {m['accuracy']:.3f} | "
                         f"{m['label_cardinality']:.2f} / {m['predicted_cardinality']:.2f} |")
    else:
        lines = [f"{r['task'].upper()} validation, embedded MiniLM, {r['epochs']:g} epoch(s) at lr {r['lr']:g}", "",
                 f"| input | accuracy | F1 ({r['labels'][-1]}) | macro-F1 | n | train |", "|---|---:|---:|---:|---:|---:|"]
        for variant in ("pair", "joined"):
            m = r[variant]
            lines.append(f"| {variant} | {m['accuracy']:.4f} | {m['f1_positive']:.4f} | {m['macro_f1']:.4f} | "
                         f"{m['n']} | {m['train_seconds'] / 60:.1f} min |")
    lines += ["", f"Machine: {machine()}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=["goemotions", "mrpc", "rte"])
    p.add_argument("--epochs", type=float, default=None, help="default: 1 for goemotions, 3 for the pair tasks")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 for goemotions, 5e-5 for the pair tasks")
    p.add_argument("--class-weights", choices=["none", "balanced"], default="none",
                   help="goemotions: train.class_weights (balanced: BCE pos_weight per label)")
    p.add_argument("--out", default=None, help="JSON result (default: /tmp/bench-runs/<task>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ge = args.task == "goemotions"
    args.epochs = args.epochs or (1.0 if ge else 3.0)
    args.lr = args.lr or (1e-4 if ge else 5e-5)
    from bertray import runtime

    runtime.init_ray(None)
    r = goemotions(args) if ge else pairs(args)
    Path(args.out or f"{RUNS}/{args.task}.json").write_text(json.dumps(r, indent=2))
    print(report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

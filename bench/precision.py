"""CPU inference precision: fp32, int8 and bf16 through bertray's Predictor, on one trained classifier.

    make demo   # trains runs/demo/model, the default --model
    nice -n 5 .venv/bin/python bench/precision.py [--model DIR] [--split validation] [--rounds 6]

For each of fp32 (`--quantize none`), int8, bf16 and, for comparison, fp32 weights under bf16 autocast (what
inference does on a GPU; not an option on CPU):
  - agreement with fp32 on the labeled split: accuracy, labels that differ from fp32's, and the largest and mean
    change of a class probability (all texts in one predict call, as a labeling chunk runs them);
  - speed, with the variants taking turns in each of --rounds rounds so the VM's drift falls on all of them alike:
    one text at a time and random draws of 32 texts, on the model as a serve replica loads it (what a replica
    does alone and with a full batch), and the whole split in one call, as a label actor loads it.
The threads are torch's default (every core) unless --threads says otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import machine, run_on_trained_model, shared_data

REPO = Path(__file__).resolve().parents[1]
SST2 = shared_data() / "sst2"
VARIANTS = ("fp32", "int8", "bf16", "fp32 + bf16 autocast")


def load(model: str, variant: str, as_replica: bool):
    """As a serve replica loads it (serve.load_predictor: its token budget, and bf16's warm-up), or as a label actor
    does (Predictor's defaults)."""
    import torch

    from bertray.config import ServeConfig
    from bertray.predictor import Predictor
    from bertray.serve import load_predictor

    quantize = {"fp32": "none", "int8": "int8", "bf16": "bf16"}.get(variant, "none")
    if as_replica:
        pred = load_predictor(ServeConfig(model=model, quantize=quantize))
    else:
        pred = Predictor(model, quantize=quantize)
    if variant == "fp32 + bf16 autocast":
        pred.amp_dtype = torch.bfloat16  # Predictor runs every pass under autocast when this is set
        pred.packed = False  # autocast wraps the model's own forward; packed passes (fp32 on CPU) skip it
    return pred


def measure(args) -> dict:
    import pyarrow.parquet as pq
    import torch

    from bertray.predictor import cpu_has_bf16

    if args.threads:
        torch.set_num_threads(args.threads)
    table = pq.read_table(SST2 / f"{args.split}.parquet", columns=["text", "label"])
    texts, labels = table.column("text").to_pylist(), np.array(table.column("label").to_pylist())
    chunk = {v: load(args.model, v, as_replica=False) for v in VARIANTS}
    serve = {v: load(args.model, v, as_replica=True) for v in VARIANTS}
    probs = {v: chunk[v].predict(texts).probs for v in VARIANTS}
    agreement = {}
    for v in VARIANTS:
        diff = np.abs(probs[v] - probs["fp32"])
        agreement[v] = {"accuracy": float(np.mean(probs[v].argmax(1) == labels)),
                        "labels_changed": int((probs[v].argmax(1) != probs["fp32"].argmax(1)).sum()),
                        "max_prob_change": float(diff.max()), "mean_prob_change": float(diff.mean())}
    rng = np.random.default_rng(0)
    one, batch, whole = ({v: [] for v in VARIANTS} for _ in range(3))
    for _ in range(args.rounds):
        for v in VARIANTS:
            for i in rng.choice(len(texts), 40):
                t = time.perf_counter()
                serve[v].predict([texts[i]])
                one[v].append(time.perf_counter() - t)
            for _ in range(4):
                draw = [texts[i] for i in rng.choice(len(texts), 32)]
                t = time.perf_counter()
                serve[v].predict(draw)
                batch[v].append(time.perf_counter() - t)
            t = time.perf_counter()
            chunk[v].predict(texts)
            whole[v].append(time.perf_counter() - t)
    speed = {v: {"one_p50_ms": 1e3 * float(np.median(one[v])), "one_p99_ms": 1e3 * float(np.percentile(one[v], 99)),
                 "batch32_p50_ms": 1e3 * float(np.median(batch[v])),
                 "whole_texts_per_s": len(texts) / float(np.median(whole[v]))} for v in VARIANTS}
    return {"machine": machine(), "model": args.model, "split": args.split, "n": len(texts),
            "threads": torch.get_num_threads(), "cpu_has_bf16": cpu_has_bf16(), "rounds": args.rounds,
            "agreement": agreement, "speed": speed}


def report(r: dict) -> str:
    m = r["machine"]
    base = r["speed"]["fp32"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores (load average at the end {m['load_avg']}); torch threads "
             f"{r['threads']}; bf16 instructions (AVX512-BF16 or AMX): {'yes' if r['cpu_has_bf16'] else 'no'}. "
             f"Model {r['model']}, SST-2 {r['split']} ({r['n']:,} texts); {r['rounds']} rounds.", "",
             "| variant | accuracy | labels changed vs fp32 | largest / mean probability change | 1 text p50 / p99 ms "
             "| 32 texts p50 ms (per text) | gain from batching 32 | whole split texts/s | × fp32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        a, s = r["agreement"][v], r["speed"][v]
        lines.append(f"| {v} | {a['accuracy']:.4f} | {a['labels_changed']} of {r['n']} | "
                     f"{a['max_prob_change']:.4f} / {a['mean_prob_change']:.5f} | "
                     f"{s['one_p50_ms']:.2f} / {s['one_p99_ms']:.2f} | {s['batch32_p50_ms']:.1f} "
                     f"({s['batch32_p50_ms'] / 32:.2f}) | {32 * s['one_p50_ms'] / s['batch32_p50_ms']:.2f}× | "
                     f"{s['whole_texts_per_s']:.0f} | {s['whole_texts_per_s'] / base['whole_texts_per_s']:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "runs" / "demo" / "model"), help="a trained classifier")
    p.add_argument("--split", default="validation", choices=["validation", "test"],
                   help="SST-2 split, from ../shared/data")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the raw result here")
    return run_on_trained_model(p.parse_args(argv), measure, report)


if __name__ == "__main__":
    sys.exit(main())

"""Packed passes against padded ones: the same Predictor, with `packed` on and off, on CPU.

    make demo   # trains runs/demo/model, the default --model
    nice -n 5 .venv/bin/python bench/packing.py [--model DIR] [--quantize none int8] [--rounds 12] [--threads 1]

A packed pass runs the linear layers on real tokens only (predictor.packed_logits); a padded pass runs the Hugging
Face model's own forward on texts padded to the pass's longest. For fp32 and int8, three workloads:
  - serve: random draws of 32 SST-2 validation sentences, on the model as a serve replica loads it (its smaller
    token budget), what a replica runs with 32 callers; and one text at a time, for the gain from batching;
  - label, sentences: the whole validation split (872 sentences) in one call, as a label actor runs a chunk (its
    token budget);
  - label, documents: 64 documents of 200-500 tokens (joined SST-2 sentences), likewise, read up to
    --doc-max-length tokens (512: the demo model's own 128 would cut every document to one length, with no padding).
Each round runs every (variant, workload) pair once, in a fresh random order, so the VM's drift falls on both
alike; speed-ups are the median over rounds of padded time / packed time within a round. Both variants also label
the validation split and the documents once, for agreement with fp32's padded passes (the model's own forward):
the largest class-probability change, labels changed, and the validation accuracy.
The threads are 1 unless --threads says otherwise: a replica's and a label actor's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from common import machine, run_on_trained_model
from label_throughput import SST2, long_docs, sst2_sentences

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ("serve: 32 sentences", "serve: 1 sentence", "label: validation split", "label: 64 documents")


def load(model: str, quantize: str, as_replica: bool, packed: bool, max_length: int | None = None):
    from bertray.config import ServeConfig
    from bertray.predictor import Predictor
    from bertray.serve import load_predictor

    pred = load_predictor(ServeConfig(model=model, quantize=quantize)) if as_replica else \
        Predictor(model, quantize=quantize, max_length=max_length)
    if packed and not pred.packed:
        sys.exit(f"{model}: Predictor does not pack this model ({quantize}); nothing to compare")
    pred.packed = packed
    return pred


def measure(args) -> dict:
    import pyarrow.parquet as pq
    import torch

    torch.set_num_threads(args.threads)
    table = pq.read_table(SST2 / "validation.parquet", columns=["text", "label"])
    sentences, labels = table.column("text").to_pylist(), np.array(table.column("label").to_pylist())
    fp32 = load(args.model, "none", False, False)
    docs = long_docs(sst2_sentences(), fp32.tokenizer, 64)
    reference = {"sentences": fp32.predict(sentences).probs,
                 "documents": load(args.model, "none", False, False, args.doc_max_length).predict(docs).probs}
    rng = np.random.default_rng(0)
    out = {"machine": None, "model": args.model, "threads": args.threads, "rounds": args.rounds,
           "doc_max_length": args.doc_max_length, "variants": {}}
    for quantize in args.quantize:
        preds = {(packed, replica): load(args.model, quantize, replica, packed)
                 for packed in (False, True) for replica in (False, True)}
        for packed in (False, True):
            preds[packed, "docs"] = load(args.model, quantize, False, packed, args.doc_max_length)
        agreement = {}
        for packed in (False, True):
            for name, texts, pred in (("sentences", sentences, preds[packed, False]),
                                      ("documents", docs, preds[packed, "docs"])):
                probs, ref = pred.predict(texts).probs, reference[name]
                agreement[f"{name}, {'packed' if packed else 'padded'}"] = {
                    "max_prob_change": float(np.abs(probs - ref).max()), "n": len(texts),
                    "labels_changed": int((probs.argmax(1) != ref.argmax(1)).sum()),
                    **({"accuracy": float(np.mean(probs.argmax(1) == labels))} if name == "sentences" else {})}
        times = {(p, w): [] for p in (False, True) for w in WORKLOADS}
        for _ in range(args.rounds):
            draws = [[sentences[i] for i in rng.choice(len(sentences), 32, replace=False)] for _ in range(4)]
            singles = [sentences[i] for i in rng.choice(len(sentences), 32, replace=False)]
            runs = {"serve: 32 sentences": (True, draws, 128), "serve: 1 sentence": (True, [[t] for t in singles], 32),
                    "label: validation split": (False, [sentences], len(sentences)),
                    "label: 64 documents": ("docs", [docs], len(docs))}
            pairs = [(p, w) for p in (False, True) for w in WORKLOADS]
            for i in rng.permutation(len(pairs)):
                packed, workload = pairs[i]
                replica, calls, n = runs[workload]
                pred = preds[packed, replica]
                start = time.perf_counter()
                for call in calls:
                    pred.predict(call)
                times[packed, workload].append((time.perf_counter() - start) / n)
        speed = {}
        for w in WORKLOADS:
            padded, packed = np.array(times[False, w]), np.array(times[True, w])
            ratio = padded / packed
            speed[w] = {"padded_ms_per_text": 1e3 * float(np.median(padded)),
                        "packed_ms_per_text": 1e3 * float(np.median(packed)),
                        "speedup_median": float(np.median(ratio)),
                        "speedup_quartiles": [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))]}
        # The model's own gain from batching 32 serve texts over one at a time, per round, as serve_load reports it.
        gain = {str(p): float(np.median(np.array(times[p, "serve: 1 sentence"]) /
                                        np.array(times[p, "serve: 32 sentences"]))) for p in (False, True)}
        out["variants"][quantize] = {"agreement": agreement, "speed": speed, "batching_gain": gain,
                                     "token_budgets": {"serve": preds[True, True].token_budget,
                                                       "label": preds[True, False].token_budget}}
    out["machine"] = machine()
    return out


def report(r: dict) -> str:
    m = r["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores (load average at the end {m['load_avg']}); torch "
             f"{m['torch']}, {r['threads']} thread(s). Model {r['model']}; {r['rounds']} rounds.", ""]
    for quantize, v in r["variants"].items():
        a, g = v["agreement"], v["batching_gain"]
        name = "fp32" if quantize == "none" else quantize
        budgets = v["token_budgets"]
        lines += [f"**{name}** (token budgets: serve {budgets['serve']}, label {budgets['label']}; documents read up "
                  f"to {r['doc_max_length']} tokens). Gain from batching 32 serve texts over one at a time: padded "
                  f"{g['False']:.2f}×, packed {g['True']:.2f}×.", "",
                  "| passes | validation accuracy | labels changed vs fp32 padded: sentences / documents | largest "
                  "probability change: sentences / documents |", "|---|---:|---:|---:|"]
        for kind in ("padded", "packed"):
            sen, doc = a[f"sentences, {kind}"], a[f"documents, {kind}"]
            lines.append(f"| {name} {kind} | {sen['accuracy']:.4f} | {sen['labels_changed']} of {sen['n']} / "
                         f"{doc['labels_changed']} of {doc['n']} | {sen['max_prob_change']:.2g} / "
                         f"{doc['max_prob_change']:.2g} |")
        lines += ["", "| workload | padded ms/text | packed ms/text | packed speed-up (median, quartiles) |",
                  "|---|---:|---:|---:|"]
        for w, s in v["speed"].items():
            q1, q3 = s["speedup_quartiles"]
            lines.append(f"| {w} | {s['padded_ms_per_text']:.2f} | {s['packed_ms_per_text']:.2f} | "
                         f"{s['speedup_median']:.3f}× ({q1:.2f}–{q3:.2f}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "runs" / "demo" / "model"), help="a trained classifier")
    p.add_argument("--quantize", nargs="+", choices=["none", "int8"], default=["none", "int8"])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc-max-length", type=int, default=512)
    p.add_argument("--json", default=None, help="also write the raw result here")
    return run_on_trained_model(p.parse_args(argv), measure, report)


if __name__ == "__main__":
    sys.exit(main())

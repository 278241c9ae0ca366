"""Long documents: chunked scoring against truncation, on 20 Newsgroups (20 topics; a fifth of the posts run past
512 tokens).

    nohup nice -n 5 .venv/bin/python bench/long_docs.py > /tmp/long_docs.log 2>&1 &
    nice -n 5 .venv/bin/python bench/long_docs.py --strip        # headers, signatures and quoted replies removed
    nice -n 5 .venv/bin/python bench/long_docs.py --train-windows one all   # training on windows against the head

One fine-tune of the embedded MiniLM on a seeded sample of the train split (`bertray.finetune.run`, head truncation
at --train-length tokens; with `--train-windows all`, every window of a post instead, each with the post's label,
and validation pooled as chunk-mean scoring does), then the same checkpoint scored on a seeded sample of the test split
(`bertray.evaluate.evaluate`, in this process) six ways: head, tail and head+tail truncation at 128 and head at
512 tokens, and `long_text: chunk` (windows of 128 tokens sharing 32) pooled by mean and by max. For each: accuracy,
macro-F1 and docs/s over all test documents and over those longer than 512 tokens.

The posts are raw (headers such as Subject and Organization kept, as in ../shared/data); `--strip` removes headers,
signature blocks and quoted replies with scikit-learn's 20 Newsgroups helpers, since they can give the topic away.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from common import machine, shared_data

RUNS = "/tmp/bench-runs"


def sample(split: str, n: int, strip: bool, seed: int, out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(shared_data() / "20newsgroups" / f"{split}.parquet")
    idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=min(n, table.num_rows), replace=False))
    table = table.take(idx)
    if strip:
        from sklearn.datasets._twenty_newsgroups import (strip_newsgroup_footer, strip_newsgroup_header,
                                                         strip_newsgroup_quoting)

        texts = [strip_newsgroup_quoting(strip_newsgroup_footer(strip_newsgroup_header(t)))
                 for t in table.column("text").to_pylist()]
        table = table.set_column(0, "text", pa.array(texts, pa.string()))
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / f"{split}.parquet")
    (out / "labels.json").write_text((shared_data() / "20newsgroups" / "labels.json").read_text())
    return out / f"{split}.parquet"


def measure(args) -> dict:
    import pyarrow.parquet as pq

    from bertray import config, finetune, modeling, runtime

    tag = "stripped" if args.strip else "raw"
    data = Path(RUNS) / f"20ng-{tag}-data"  # not the run folder, which overwrite empties
    train = sample("train", args.train_rows, args.strip, 0, data)
    test = sample("test", args.test_rows, args.strip, 1, data)
    runtime.init_ray(None)
    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    texts = pq.read_table(test).column("text").to_pylist()
    lengths = np.array([len(x) for x in tok(texts, add_special_tokens=False, verbose=False)["input_ids"]])
    long_rows = np.flatnonzero(lengths > 510)
    pq.write_table(pq.read_table(test).take(long_rows), data / "test-long.parquet")
    trained = []
    for windows in args.train_windows:
        chunked = {"long_text": "chunk", "chunk_overlap": 32, "train_windows": "all"} if windows == "all" else {}
        cfg = config.load(config.FinetuneConfig, data={
            "model": {"max_length": args.train_length, **chunked},
            "data": {"train": str(train), "validation_fraction": 0.1,
                     "labels": json.loads((data / "labels.json").read_text())},
            "optim": {"lr": 1e-4},
            "train": {"batch_size": 16, "epochs": args.epochs, "log_every": 100},
            "run": {"name": f"20ng-{tag}-{windows}", "storage": RUNS, "num_workers": 2, "keep_checkpoints": 1,
                    "overwrite": True},
        })
        start = time.perf_counter()
        summary = finetune.run(cfg)
        meta = json.loads((Path(summary["model"]) / "bertray.json").read_text())
        trained.append({"train_windows": windows, "train_s": time.perf_counter() - start,
                        "sequences": meta["data_report"]["train"].get("windows", meta["data_report"]["train"]["rows_in_split"]),
                        "validation": summary["metrics"]["accuracy"],
                        "rows": score(summary["model"], test, data / "test-long.parquet")})
    return {"strip": args.strip, "train_rows": args.train_rows, "test_rows": len(texts), "epochs": args.epochs,
            "train_length": args.train_length, "trained": trained,
            "median_tokens": float(np.median(lengths)), "over_512": int(len(long_rows)), "machine": machine()}


def score(model: str, test: Path, test_long: Path) -> list[dict]:
    """The checkpoint scored six ways on all test posts and on those over 512 tokens."""
    from bertray import evaluate

    meta_path = Path(model) / "bertray.json"
    meta = json.loads(meta_path.read_text())
    ways = [("head", 128, "truncate"), ("tail", 128, "truncate"), ("head+tail", 128, "truncate"),
            ("head", 512, "truncate"), ("chunk, mean", 128, "chunk"), ("chunk, max", 128, "chunk")]
    rows = []
    for name, length, long_text in ways:
        truncation = name if long_text == "truncate" else "head"
        meta["config"]["model"].update({"truncation": truncation, "chunk_pool": "max" if "max" in name else "mean",
                                        "chunk_overlap": 32})
        meta_path.write_text(json.dumps(meta))  # how the checkpoint scores: evaluate reads it from bertray.json
        row = {"way": name, "max_length": length}
        for part, path in (("all", test), ("over_512", test_long)):
            r = evaluate.evaluate(model, str(path), f"{RUNS}/20ng-eval", max_length=length, long_text=long_text)
            row[part] = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "n": r["n"],
                         "docs_per_s": r["rows_per_s"]}
        rows.append(row)
        logging.info("%s", row)
    return rows


def report(r: dict) -> str:
    lines = [f"20 Newsgroups ({'headers, signatures and quotes stripped' if r['strip'] else 'raw posts, headers kept'}), "
             f"embedded MiniLM fine-tuned on {r['train_rows']:,} train posts at {r['train_length']} tokens "
             f"({r['epochs']:g} epoch(s)); {r['test_rows']:,} test posts, {r['over_512']} over 512 tokens"]
    for t in r["trained"]:
        lines += ["", f"Trained on {'every window' if t['train_windows'] == 'all' else 'the head'} of each post: "
                  f"{t['sequences']:,} training sequences, {t['train_s']:.0f} s (with start-up), validation "
                  f"accuracy {t['validation']:.4f}", "",
                  "| scoring | accuracy | macro-F1 | docs/s | accuracy > 512 | macro-F1 > 512 | docs/s > 512 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for x in t["rows"]:
            a, b = x["all"], x["over_512"]
            lines.append(f"| {x['way']} at {x['max_length']} | {a['accuracy']:.4f} | {a['macro_f1']:.4f} | "
                         f"{a['docs_per_s']:.1f} | {b['accuracy']:.4f} | {b['macro_f1']:.4f} | {b['docs_per_s']:.1f} |")
    return "\n".join(lines + ["", f"Machine: {r['machine']}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strip", action="store_true")
    p.add_argument("--train-rows", type=int, default=4000)
    p.add_argument("--test-rows", type=int, default=1000)
    p.add_argument("--train-length", type=int, default=128)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--train-windows", nargs="+", choices=["one", "all"], default=["one"],
                   help="train on the head of each post (one), on every window (all), or both in turn")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    r = measure(args)
    Path(args.out or f"{RUNS}/long_docs{'-stripped' if args.strip else ''}.json").write_text(json.dumps(r, indent=2))
    print(report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())

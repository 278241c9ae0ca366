"""How fast `bertray label` can feed a fast accelerator: its tokens/s against the tokenizer's own ceiling.

    nice -n 5 .venv/bin/python bench/feed.py                      # 1 and 2 CPUs, long and short texts
    nice -n 5 .venv/bin/python bench/feed.py --cpus 2 --json feed.json

The stand-in accelerator is a near-free model: a random BertForSequenceClassification of one layer, 32 wide, with
the embedded MiniLM's tokenizer, in ONE inference actor (token_budget 16,384, as on a GPU). Whatever limits
`bertray label` then is the work around the model: reading Parquet, tokenizing, moving token ids, building and
writing the output. The baseline (the ceiling) is the fast tokenizer alone batch-encoding the same texts in one
process per CPU, in the same run: no pipeline can tokenize faster than that on those cores.

For each CPU count N, a child process pinned to the first N cores (sched_setaffinity, so Ray, its workers and the
tokenizer pool all share those cores) measures the ceiling (best of three), then starts Ray with
`ray.init(num_cpus=N)`, labels a small corpus to warm the workers, and times `label.run` on each corpus and on three
copies of it. Whole job: the summary's tokens_per_s, tokens over the labeling time, which includes starting the
actor and loading the model, but not planning. Steady state: the two extra copies' tokens over the extra time they
took, i.e. how fast the pipeline feeds the model once it runs; the difference is the job's fixed cost. On a CPU the
stand-in is not free (attention over 200-500 tokens costs about what tokenizing does), so the stand-in alone, on
one thread with the same ids, is timed too. Corpora: long documents (20 Newsgroups train posts of 200-500 tokens)
and short sentences (SST-2 train).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, shared_data

LABELS = ["a", "b"]
MAX_LENGTH = 512
TOKEN_BUDGET = 16384  # the Predictor's GPU default: the stand-in runs passes as big as a GPU actor's
CEILING_CHUNK = 1000  # texts per batch-encode call in the ceiling's pool


# --------------------------------------------------------------------------------------------------- inputs


def near_free_model(folder: Path) -> str:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from bertray import checkpoint, modeling

    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=MAX_LENGTH, num_labels=len(LABELS),
                     id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    checkpoint.save(folder, BertForSequenceClassification(cfg).eval(), tok, {
        "kind": "classifier", "label_names": LABELS,
        "config": {"model": {"max_length": MAX_LENGTH, "truncation": "head"}}})
    return str(folder)


def corpora(long_n: int, short_n: int) -> dict[str, list[str]]:
    import pyarrow.parquet as pq

    from bertray import modeling

    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    posts = pq.read_table(shared_data() / "20newsgroups" / "train.parquet", columns=["text"]).column("text").to_pylist()
    sizes = [len(x) for x in tok(posts, truncation=True, max_length=MAX_LENGTH + 1)["input_ids"]]
    long = [p for p, n in zip(posts, sizes) if 200 <= n <= 500][:long_n]
    short = pq.read_table(shared_data() / "sst2" / "train.parquet", columns=["text"]).column("text").to_pylist()[:short_n]
    return {"long": long, "short": short}


def write_corpus(folder: Path, texts: list[str], copies: int = 1) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for c in range(copies):
        ids = pa.array(range(c * len(texts), (c + 1) * len(texts)), pa.int64())
        pq.write_table(pa.table({"id": ids, "text": pa.array(texts, pa.string())}),
                       folder / f"part-{c:03d}.parquet", row_group_size=2048)
    return str(folder)


# --------------------------------------------------------------------------------------------------- measures

_tokenizer = None


def _load_tokenizer(model: str) -> None:
    global _tokenizer
    from bertray import modeling

    _tokenizer = modeling.load_tokenizer(model)


def _encode(texts: list[str]) -> int:
    return sum(len(x) for x in _tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"])


def ceiling(model: str, texts: list[str], processes: int, reps: int = 3) -> dict:
    """Best tokens/s of `processes` processes batch-encoding `texts` (pool started and warmed up beforehand)."""
    import multiprocessing as mp

    chunks = [texts[i:i + CEILING_CHUNK] for i in range(0, len(texts), CEILING_CHUNK)]
    with mp.get_context("spawn").Pool(processes, initializer=_load_tokenizer, initargs=(model,)) as pool:
        pool.map(_encode, [texts[:64]] * processes)
        best, tokens = float("inf"), 0
        for _ in range(reps):
            t = time.perf_counter()
            tokens = sum(pool.map(_encode, chunks, chunksize=1))
            best = min(best, time.perf_counter() - t)
    return {"tokens": tokens, "seconds": round(best, 3), "tokens_per_s": round(tokens / best)}


def model_alone(model: str, texts: list[str]) -> dict:
    """Tokens/s of the stand-in model alone in this process, one thread, on the texts' ids (best of two)."""
    import torch

    from bertray.predictor import Predictor

    torch.set_num_threads(1)
    pred = Predictor(model, token_budget=TOKEN_BUDGET)
    ids, _ = pred.encode(texts)
    tokens, best = sum(map(len, ids)), float("inf")
    pred.predict_ids(ids[:64])
    for _ in range(2):
        t = time.perf_counter()
        pred.predict_ids(ids)
        best = min(best, time.perf_counter() - t)
    return {"tokens": tokens, "seconds": round(best, 3), "tokens_per_s": round(tokens / best)}


def label_run(model: str, corpus: str, out: Path, **settings) -> dict:
    import shutil

    from bertray import label
    from bertray.config import LabelConfig

    shutil.rmtree(out, ignore_errors=True)
    known = {f.name for f in dataclasses.fields(LabelConfig)}
    cfg = LabelConfig(model=model, input=corpus, output=str(out), actors=1, token_budget=TOKEN_BUDGET,
                      **{k: v for k, v in settings.items() if k in known})
    t = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # label.run prints its summary; stdout carries our result
        s = label.run(cfg)
    return {"tokens": s["tokens"], "rows": s["rows_read"], "label_seconds": s["seconds"]["label"],
            "wall": round(time.perf_counter() - t, 3), "tokens_per_s": s["tokens_per_s"]}


def child(args) -> dict:
    """One CPU count, in a process already pinned to that many cores."""
    import logging

    import ray

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    model = str(work / "model")
    texts = json.loads((work / "texts.json").read_text())
    result = {"cpus": args.cpus, "affinity": sorted(os.sched_getaffinity(0)), "corpora": {}}
    for name, t in texts.items():
        result["corpora"][name] = {"texts": len(t), "ceiling": ceiling(model, t, args.cpus)}
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM") if k in os.environ}
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    try:
        label_run(model, str(work / "corpus-warm"), work / "out-warm")
        for name in texts:
            r = result["corpora"][name]
            r["label"] = label_run(model, str(work / f"corpus-{name}"), work / f"out-{name}")
            r["label_x3"] = label_run(model, str(work / f"corpus-{name}-x3"), work / f"out-{name}-x3")
    finally:
        ray.shutdown()
    for name, r in result["corpora"].items():
        r["model_alone"] = model_alone(model, texts[name])
        one, three = r["label"], r["label_x3"]
        r["ratio"] = round(one["tokens_per_s"] / r["ceiling"]["tokens_per_s"], 3)
        # Steady state: what two more copies of the corpus cost, so the job's fixed start-up cancels out.
        extra_s = max(three["label_seconds"] - one["label_seconds"], 1e-9)
        r["marginal_tokens_per_s"] = round((three["tokens"] - one["tokens"]) / extra_s)
        r["marginal_ratio"] = round(r["marginal_tokens_per_s"] / r["ceiling"]["tokens_per_s"], 3)
        lesser = min(r["ceiling"]["tokens_per_s"], r["model_alone"]["tokens_per_s"])
        r["marginal_ratio_lesser"] = round(r["marginal_tokens_per_s"] / lesser, 3)
        r["fixed_seconds"] = round(one["label_seconds"] - one["tokens"] / r["marginal_tokens_per_s"], 2)
    return result


# --------------------------------------------------------------------------------------------------- report


def report(results: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores; load average before {info['load_avg']}.", "",
             "| CPUs | texts | tokenizer ceiling tokens/s | stand-in model alone tokens/s | whole job tokens/s "
             "| ÷ ceiling | steady state tokens/s | ÷ ceiling | ÷ lesser | fixed s per job |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        for name, c in r["corpora"].items():
            desc = f"{name} ({c['texts']:,}, {c['label']['tokens']:,} tokens)"
            lines.append(f"| {r['cpus']} | {desc} | {c['ceiling']['tokens_per_s']:,} | "
                         f"{c['model_alone']['tokens_per_s']:,} | {c['label']['tokens_per_s']:,.0f} | "
                         f"{c['ratio']:.2f} | {c['marginal_tokens_per_s']:,} | **{c['marginal_ratio']:.2f}** | "
                         f"{c['marginal_ratio_lesser']:.2f} | {c['fixed_seconds']:.1f} |")
    lines += ["", "Whole job: tokens over the label phase of one job on the corpus (actor start and model load "
              "included). Steady state: the extra tokens over the extra time of a job on three copies of it. "
              "Lesser: the smaller of the tokenizer ceiling and the stand-in model alone (one thread, the same "
              "ids, in-process), the most the pipeline could deliver with one such actor."]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", default="1,2", help="CPU counts to give Ray, comma-separated (default 1,2)")
    p.add_argument("--long", type=int, default=6000, help="long documents (at most the 5,797 of 200-500 tokens)")
    p.add_argument("--short", type=int, default=40000, help="SST-2 sentences")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process: the pool is the parallelism
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.child:
        args.cpus = int(args.cpus)
        print(json.dumps(child(args)))
        return 0
    info = machine()
    counts = [int(c) for c in args.cpus.split(",")]
    if max(counts) > len(os.sched_getaffinity(0)):
        sys.exit(f"--cpus {args.cpus}: this process may run on {len(os.sched_getaffinity(0))} cores only")
    results = []
    with tempfile.TemporaryDirectory(prefix="bertray-feed-") as tmp:
        work = Path(tmp)
        near_free_model(work / "model")
        texts = corpora(args.long, args.short)
        (work / "texts.json").write_text(json.dumps(texts))
        for name, t in texts.items():
            write_corpus(work / f"corpus-{name}", t)
            write_corpus(work / f"corpus-{name}-x3", t, copies=3)
        write_corpus(work / "corpus-warm", texts["short"][:2000])
        cores = sorted(os.sched_getaffinity(0))
        for n in counts:
            cmd = [sys.executable, __file__, "--child", "--cpus", str(n), "--work", str(work)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda n=n: os.sched_setaffinity(0, cores[:n]))
            if proc.returncode != 0:
                sys.exit(f"the {n}-CPU run failed ({proc.returncode})")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results}, indent=2))
    print(report(results, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput of `bertray label` against plain loops, the CPU roofline, int8 and bf16, and a memory check.

    nice -n 5 .venv/bin/python bench/label_throughput.py            # speed: short and long texts (a few minutes)
    nice -n 5 .venv/bin/python bench/label_throughput.py --memory   # peak RSS: 1M-row vs 100k-row corpus

Speed mode: one model (the embedded MiniLM-L6 with a random 2-class head: speed does not depend on the weights) and
two corpora: SST-2 sentences, and documents of 200-500 tokens built by joining consecutive SST-2 sentences. On each:
  - `transformers.pipeline("text-classification", batch_size=32)` over the list (truncation at 512 tokens),
  - our Predictor in a plain loop without Ray (chunks of label.CHUNK_ROWS texts, as each label actor does), fp32,
    int8 and bf16 (bf16 is emulated, and slow, on CPUs without AVX512-BF16 or AMX), and with the onnxruntime
    backend on the model's fp32 and int8 ONNX exports (`bertray export`, made before any timing),
  - `bertray label` through the real CLI on a fresh local Ray (wall time of the whole command: Ray start, actor
    start, model load, planning, labeling, writing), on the corpus and on the corpus repeated --cli-repeat times
    (a bulk-sized job, reported per copy), and `label.run` on an already-running cluster, fp32, int8 and bf16,
    and onnxruntime fp32 and int8 on the exports.
    The label figures include every fixed cost; "marginal" subtracts the time of the same call on a 16-doc corpus;
    "actor compute" is the time the actors spent on the units (summed from the part files, divided by the actors),
    i.e. the steady-state rate with Ray's startup and scheduling left out.
  - the roofline: fp32 matmul FLOP/s measured with torch.matmul on big square matrices (same thread count),
    divided by the model's FLOPs per token. The matmul rate is the median of five timings taken with Ray down
    (before the plain loops, after each corpus's, and twice after the label runs): on a shared VM one timing moves
    by +-15%. The FLOPs per token count the weights (2 x non-embedding parameters) and attention's own products at
    each text's length (scores and weighted sum, 4 x length x width per layer), as PaLM's model-FLOPs utilisation
    does; the report also gives the weights-only share, which earlier runs were judged by.
All methods use every core: the plain loops run torch on all of them, `bertray label` one 1-thread actor per core.

Memory mode: labels a generated 1M-row corpus and a 100k-row one through the CLI (fresh local Ray each) with a tiny
random BERT (2 layers, width 32: MiniLM would take most of an hour on 2 cores for 1M rows), sampling the RSS of the
CLI driver and all its descendants (GCS, raylet, workers, actors) every 0.2 s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import gpu_matmul_peak, machine, matmul_peak, minilm_classifier, shared_data

REPO = Path(__file__).resolve().parents[1]
SST2 = shared_data() / "sst2"
LABELS = ["negative", "positive"]


# --------------------------------------------------------------------------------------------------- inputs


def tiny_checkpoint(folder: Path) -> str:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from bertray import checkpoint, modeling

    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2,
                     id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    checkpoint.save(folder, BertForSequenceClassification(cfg), tok, {
        "kind": "classifier", "label_names": LABELS, "config": {"model": {"max_length": 64, "truncation": "head"}}})
    return str(folder)


def sst2_sentences() -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(SST2 / "train.parquet", columns=["text"]).column("text").to_pylist()


def long_docs(sentences: list[str], tokenizer, n: int, seed: int = 0) -> list[str]:
    """Documents of 200-500 tokens (target drawn uniformly per document) of consecutive SST-2 sentences."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = [len(x) for x in tokenizer(sentences[: n * 60], add_special_tokens=False)["input_ids"]]
    docs, i = [], 0
    for _ in range(n):
        target, parts, size = int(rng.integers(200, 501)), [], 2
        while size + lengths[i] <= target:
            parts.append(sentences[i])
            size += lengths[i]
            i += 1
        docs.append(" ".join(parts))
    return docs


def write_corpus(path: Path, texts: list[str], files: int = 1, row_group_size: int = 20_000) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    per = -(-len(texts) // files)
    for f in range(files):
        chunk = texts[f * per:(f + 1) * per]
        pq.write_table(pa.table({"id": pa.array(range(f * per, f * per + len(chunk)), pa.int64()),
                                 "text": pa.array(chunk, pa.string())}),
                       path / f"part-{f:03d}.parquet", row_group_size=row_group_size)
    return path


# --------------------------------------------------------------------------------------------------- measures


def time_pipeline(model_dir: str, texts: list[str], device: str = "cpu") -> float:
    from transformers import pipeline

    pipe = pipeline("text-classification", model=model_dir, tokenizer=model_dir, device=0 if device == "cuda" else -1)
    pipe(texts[:32], batch_size=32, truncation=True, max_length=512)  # warm-up
    t = time.perf_counter()
    out = pipe(texts, batch_size=32, truncation=True, max_length=512)
    elapsed = time.perf_counter() - t
    assert len(out) == len(texts)
    return elapsed


def time_predictor(model_dir: str, texts: list[str], quantize: str | None, device: str = "cpu",
                   backend: str = "torch") -> float:
    from bertray.label import CHUNK_ROWS
    from bertray.predictor import Predictor

    pred = Predictor(model_dir, device=device, quantize=quantize, backend=backend)
    pred.predict(texts[:32])  # warm-up
    t = time.perf_counter()
    for i in range(0, len(texts), CHUNK_ROWS):
        pred.predict(texts[i:i + CHUNK_ROWS])
    return time.perf_counter() - t


def time_label_run(model_dir: str, corpus: Path, out: Path, quantize: str, rows_per_file: int,
                   gpus_per_actor: float = 0.0, backend: str = "torch") -> tuple[float, dict]:
    """label.run on the running cluster: actor start and model load included."""
    from bertray import label
    from bertray.config import LabelConfig

    shutil.rmtree(out, ignore_errors=True)
    cfg = LabelConfig(model=model_dir, input=str(corpus), output=str(out), id_column=None, quantize=quantize,
                      rows_per_file=rows_per_file, gpus_per_actor=gpus_per_actor, backend=backend)
    t = time.perf_counter()
    summary = label.run(cfg)
    return time.perf_counter() - t, summary


def actor_seconds(output: Path) -> float:
    """Sum over units of the time an actor spent on each (read, tokenize, predict, write), from the part files."""
    import pyarrow.parquet as pq

    from bertray import label

    return sum(json.loads(pq.read_metadata(p).metadata[label.UNIT_META])["seconds"]
               for p in output.glob("part-*.parquet"))


def rows_per_unit(rows: int) -> int:
    return max(32, rows // 16)  # 16 units: enough to keep every actor busy to the end


def label_cli(model_dir: str, corpus: Path, out: Path, rows_per_file: int, extra: list[str] = (),
              sample_memory: bool = False) -> dict:
    """`bertray label` as a user runs it, on its own fresh local Ray; wall time (and RSS samples if asked)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "bertray.cli", "label", "--model", model_dir, "--input", str(corpus), "--output",
           str(out), "--rows-per-file", str(rows_per_file), "--id-column", "none", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OMP_NUM_THREADS")}
    # Files, not pipes: nobody reads a pipe while the RSS sampler runs, and a full pipe would stall the job.
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fout, stderr=ferr, text=True)
        mem = _sample_rss(proc) if sample_memory else None
        proc.wait()
        wall = time.perf_counter() - t
        fout.seek(0)
        ferr.seek(0)
        stderr = ferr.read()
    if proc.returncode != 0:
        raise SystemExit(f"bertray label failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"wall": wall, "summary": json.loads((out / "_summary.json").read_text()), "memory": mem,
            "command": " ".join(cmd[1:]).replace(str(REPO) + "/", "")}


def _sample_rss(proc: subprocess.Popen, every: float = 0.2) -> dict:
    """Peak RSS of the driver, of the largest other process, and of the sum over the driver's process tree.

    The sum over-counts pages shared between processes (Ray's object store is mapped into several), so it is an
    upper bound on the job's footprint; the per-process peaks are exact for each process."""
    import psutil

    root = psutil.Process(proc.pid)
    peak = {"driver": 0, "largest_other": 0, "sum": 0, "processes_seen": 0}
    seen = set()
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        total = 0
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                continue
            seen.add(p.pid)
            total += rss
            key = "driver" if p.pid == root.pid else "largest_other"
            peak[key] = max(peak[key], rss)
        peak["sum"] = max(peak["sum"], total)
        time.sleep(every)
    peak["processes_seen"] = len(seen)
    return peak


# --------------------------------------------------------------------------------------------------- modes


def speed(args) -> dict:
    import ray
    import torch

    from bertray import export, modeling, runtime
    from bertray.predictor import Predictor

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    device, gpus = ("cuda", 1.0) if args.gpu else ("cpu", 0.0)
    work = Path(args.work)
    model_dir = minilm_classifier(work / "minilm-cls", LABELS, max_length=512)
    pred = Predictor(model_dir)
    # The onnxruntime rows run exports made here, so that no timing includes exporting (a checkpoint given to the
    # onnxruntime backend is exported on first use).
    onnx_dirs = {} if args.gpu else {q: str(work / f"minilm-onnx-{q}") for q in ("none", "int8")}
    for q, folder in onnx_dirs.items():
        export.run(model_dir, folder, quantize=q)
    sentences = sst2_sentences()
    corpora = {"short (SST-2 sentences)": sentences[: args.short],
               "long (200-500 tokens)": long_docs(sentences, pred.tokenizer, args.long)}
    # On a GPU the predictor runs under bf16 autocast, so its roofline is the bf16 matmul rate. Timed only while
    # Ray is down, as the plain loops are: with an idle cluster up, timings came out 2-13% lower on 2 cores.
    peaks = []

    def time_peak() -> None:
        peaks.append(gpu_matmul_peak(torch.bfloat16) if args.gpu else matmul_peak(threads))

    time_peak()
    flops_per_token = 2 * modeling.count_params(pred.model, non_embedding=True)
    # The plain loops run before Ray starts, so an idle cluster's processes do not share the cores with them.
    plain = {}
    for name, texts in corpora.items():
        plain[name] = {"pipeline": time_pipeline(model_dir, texts, device),
                       "predictor fp32": time_predictor(model_dir, texts, None, device)}
        if not args.gpu:
            plain[name]["predictor int8"] = time_predictor(model_dir, texts, "int8")
            plain[name]["predictor bf16"] = time_predictor(model_dir, texts, "bf16")
            plain[name]["predictor onnxruntime fp32"] = time_predictor(onnx_dirs["none"], texts, None,
                                                                       backend="onnxruntime")
            plain[name]["predictor onnxruntime int8"] = time_predictor(onnx_dirs["int8"], texts, "int8",
                                                                       backend="onnxruntime")
        time_peak()
    runtime.init_ray(None)
    gpu_flags = ["--gpus-per-actor", "1"] if args.gpu else []
    rows = []
    for name, texts in corpora.items():
        lengths = [len(x) for x in pred.encode(texts)[0]]
        tokens = sum(lengths)
        # Attention scores and their weighted sum: 4 x length x width FLOPs per token per layer, on the text's own
        # length. Next to 2 x params it is small for sentences and ~16% more for 200-500-token documents.
        cfg = pred.model.config
        attention = 4 * cfg.hidden_size * cfg.num_hidden_layers * sum(n * n for n in lengths) / tokens
        corpus = write_corpus(work / f"corpus-{len(texts)}", texts)
        tiny = write_corpus(work / f"corpus-{len(texts)}-16", texts[:16])
        rpf = rows_per_unit(len(texts))
        m = dict(plain[name])
        runs = [("torch", q) for q in (("none",) if args.gpu else ("none", "int8", "bf16"))]
        runs += [("onnxruntime", q) for q in onnx_dirs]
        for backend, q in runs:
            model = model_dir if backend == "torch" else onnx_dirs[q]
            fixed, _ = time_label_run(model, tiny, work / "out-tiny", q, rpf, gpus, backend)
            full, summary = time_label_run(model, corpus, work / "out", q, rpf, gpus, backend)
            assert summary["rows_written"] == len(texts)
            precision = "fp32" if q == "none" else q
            tag = precision if backend == "torch" else f"onnxruntime {precision}"
            m[f"label {tag} (warm cluster)"] = full
            m[f"label {tag} marginal"] = full - fixed
            m[f"label {tag} actor compute"] = actor_seconds(work / "out") / summary["actors"]
        cli = label_cli(model_dir, corpus, work / "out-cli", rpf, gpu_flags)
        m["label fp32 (CLI, fresh Ray)"] = cli["wall"]
        k = args.cli_repeat[0 if name.startswith("short") else 1]
        if k > 1:
            # A small corpus is mostly Ray start-up and model loading for the CLI; a bulk job is larger. The same
            # texts repeated keep every other column valid: a plain loop's time per text does not depend on how
            # many texts follow, so the row is seconds per copy of the corpus.
            big = write_corpus(work / f"corpus-{len(texts)}-x{k}", texts * k)
            many = label_cli(model_dir, big, work / "out-cli-big", rows_per_unit(k * len(texts)), gpu_flags)
            assert many["summary"]["rows_written"] == k * len(texts)
            m[f"label fp32 (CLI, fresh Ray, {k}x the corpus, per copy)"] = many["wall"] / k
            shutil.rmtree(big)
            shutil.rmtree(work / "out-cli-big")
        rows.append({"corpus": name, "docs": len(texts), "tokens": tokens, "attention_flops_per_token": attention,
                     "seconds": m, "actors": summary["actors"], "command": cli["command"]})
    ray.shutdown()
    time_peak()
    time_peak()
    flops = statistics.median(peaks)
    return {"mode": "speed", "machine": machine(), "threads": threads, "device": device, "matmul_flops": flops,
            "matmul_flops_timings": peaks, "flops_per_token": flops_per_token,
            "roofline_tokens_per_s": flops / flops_per_token, "results": rows}


def memory(args) -> dict:
    work = Path(args.work)
    model_dir = tiny_checkpoint(work / "tiny-cls")
    sentences = sst2_sentences()
    out = {}
    for n in (args.memory_small, args.memory_large):
        texts = [sentences[i % len(sentences)] for i in range(n)]
        corpus = write_corpus(work / f"mem-{n}", texts, files=max(1, n // 100_000))
        del texts
        r = label_cli(model_dir, corpus, work / f"mem-out-{n}", rows_per_file=25_000, sample_memory=True)
        assert r["summary"]["rows_written"] == n
        out[n] = {"wall": r["wall"], "memory": r["memory"], "rows_per_s": r["summary"]["rows_per_s"],
                  "units": r["summary"]["units"], "actors": r["summary"]["actors"], "command": r["command"]}
        shutil.rmtree(corpus)
        shutil.rmtree(work / f"mem-out-{n}")
    return {"mode": "memory", "machine": machine(), "results": out}


# --------------------------------------------------------------------------------------------------- report


def report_speed(r: dict) -> str:
    m = r["machine"]
    timings = r.get("matmul_flops_timings", [r["matmul_flops"]])
    unit = (f"{r['results'][0]['actors']} GPU actor(s); predictor under bf16 autocast, pipeline in fp32"
            if r.get("device") == "cuda" else f"{r['results'][0]['actors']} actors x 1 thread")
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores{', ' + m['gpu'] if m.get('gpu') else ''} (load average at "
             f"the end {m['load_avg']}); torch threads {r['threads']}; label: {unit}.",
             f"Roofline: {'bf16' if r.get('device') == 'cuda' else 'fp32'} matmul "
             f"{r['matmul_flops'] / 1e9:.1f} GFLOP/s "
             f"(median of {len(timings)} timings in the run: {', '.join(f'{x / 1e9:.0f}' for x in timings)}) / "
             f"{r['flops_per_token'] / 1e6:.1f} MFLOP per token for the weights (2 x non-embedding params) = "
             f"{r['roofline_tokens_per_s']:,.0f} tokens/s, before attention's own FLOPs (per corpus, below).", ""]
    for row in r["results"]:
        s = row["seconds"]
        attention = row.get("attention_flops_per_token", 0.0)
        with_attention = r["flops_per_token"] / (r["flops_per_token"] + attention)
        lines += [f"**{row['corpus']}**: {row['docs']:,} docs, {row['tokens']:,} tokens (with [CLS]/[SEP], "
                  f"after truncation at 512); attention adds {attention / 1e6:.2f} MFLOP per token. "
                  f"Command: `{row['command']}`", "",
                  "| method | seconds | docs/s | tokens/s | x pipeline | x predictor fp32 | % of roofline, all FLOPs "
                  "| % of roofline, weights only |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, sec in s.items():
            dps, tps = row["docs"] / sec, row["tokens"] / sec
            share = tps / r["roofline_tokens_per_s"]
            lines.append(f"| {name} | {sec:.2f} | {dps:,.1f} | {tps:,.0f} | {s['pipeline'] / sec:.2f} | "
                         f"{s['predictor fp32'] / sec:.2f} | {100 * share / with_attention:.0f}% | "
                         f"{100 * share:.0f}% |")
        lines.append("")
    return "\n".join(lines)


def report_memory(r: dict) -> str:
    m = r["machine"]
    res = r["results"]
    small, large = sorted(res, key=int)
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores (load average at the end {m['load_avg']}). Tiny random BERT "
             "(2 layers, width 32); rows_per_file 25,000; RSS sampled every 0.2 s.", "",
             "| rows | units | actors | wall s | rows/s (label phase) | driver peak MB | largest other process MB "
             "| sum over process tree MB |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in (small, large):
        x = res[n]
        mem = x["memory"]
        lines.append(f"| {int(n):,} | {x['units']} | {x['actors']} | {x['wall']:.1f} | {x['rows_per_s']:,.0f} | "
                     f"{mem['driver'] / 2**20:.0f} | {mem['largest_other'] / 2**20:.0f} | {mem['sum'] / 2**20:.0f} |")
    a, b = res[small]["memory"], res[large]["memory"]
    lines += ["", f"Ratio {int(large):,} / {int(small):,} rows: driver {b['driver'] / a['driver']:.2f}x, largest other "
              f"process {b['largest_other'] / a['largest_other']:.2f}x, sum {b['sum'] / a['sum']:.2f}x.",
              f"Command: `{res[large]['command']}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", action="store_true", help="peak RSS check instead of the speed comparison")
    p.add_argument("--short", type=int, default=4000, help="SST-2 sentences in the short corpus")
    p.add_argument("--long", type=int, default=500, help="documents in the long corpus")
    p.add_argument("--cli-repeat", type=int, nargs=2, default=[10, 4], metavar=("SHORT", "LONG"),
                   help="also time the CLI on each corpus repeated this many times (1: skip)")
    p.add_argument("--memory-small", type=int, default=100_000)
    p.add_argument("--memory-large", type=int, default=1_000_000)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, deleted after)")
    p.add_argument("--json", default=None, help="also write the raw result here")
    p.add_argument("--gpu", action="store_true", help="CUDA: pipeline, predictor and 1-GPU label actors; no int8 or bf16")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = None
    if args.work is None:
        tmp = args.work = tempfile.mkdtemp(prefix="bench-label-")
    try:
        result = memory(args) if args.memory else speed(args)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result["command"] = "python bench/label_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\n`{result['command'].strip()}`\n")
    print(report_memory(result) if args.memory else report_speed(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

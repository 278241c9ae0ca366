"""Training throughput of `bertray finetune` against Hugging Face `Trainer`, in one run, on one machine.

    .venv/bin/python bench/finetune_throughput.py            # about 15 minutes on 2 quiet CPU cores

Contenders, all on the same SST-2 train subset (default 4,000 rows), the same model (the embedded MiniLM),
batch size 32 per step, max_length 128, AdamW + linear schedule + clipping, and the same total torch threads
(default: every core):

  bertray-1w    `bertray finetune`, 1 Ray Train worker using all threads
  bertray-2w    `bertray finetune`, 2 Ray Train workers (DDP), threads split between them, batch 32 per worker
  hf-maxlen     the tutorial recipe: `padding="max_length"` (128) at tokenization, HF `Trainer`, random batches
  hf-dynamic    the strongest single-process baseline: HF `Trainer`, `DataCollatorWithPadding`, length-grouped
                batches (transformers 5 renamed `group_by_length=True` to `train_sampling_strategy="group_by_length"`)

Each trains 2 epochs; the figure is the SECOND epoch (steady state: allocator, thread pools and caches warm),
so every contender is timed on exactly the same texts. Tokens are REAL tokens (sum of the attention masks of the
batches actually processed; padding excluded). bertray is timed by its own progress windows (one window per
epoch: wall time between two progress lines, i.e. data, forward, backward, optimizer and DDP all-reduce); its
real-token count is recomputed exactly from the batch plan (`finetune.plan_batches`, all ranks). HF Trainer is
timed by a callback at the same step boundaries and counts tokens in `training_step`.

Utilisation = 6 x non-embedding parameters x real tokens/s, over the best fp32 matmul FLOP/s measured here
(torch.matmul of 2048x2048 fp32 with the same thread count).

Internal: `--contender hf-maxlen|hf-dynamic` runs one HF contender in this process (the driver starts each
contender in its own process so none inherits another's thread pools or memory).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import machine, matmul_peak, shared_data

REPO = Path(__file__).resolve().parents[1]
SST2 = shared_data() / "sst2"
BATCH = 32
MAX_LENGTH = 128
EPOCHS = 2  # epoch 1 warms up, epoch 2 is measured
LR = 5e-5
SEED = 42
TARGETS = {"vs_hf_maxlen": 2.0, "vs_hf_dynamic": 0.95, "mfu": 0.35}


# --------------------------------------------------------------------------------------------------- machine


def non_embedding_params() -> int:
    from bertray import modeling
    from bertray.config import ModelConfig

    return modeling.count_params(modeling.build_classifier(ModelConfig(), ["negative", "positive"]), non_embedding=True)


# --------------------------------------------------------------------------------------------------- data


def make_data(root: Path, rows: int) -> Path:
    """A seeded `rows`-row sample of SST-2 train (the contenders' training set) and a 64-row validation file
    (bertray evaluates once at the end; it is not timed)."""
    import pyarrow.parquet as pq

    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(SST2 / "train.parquet")
    import numpy as np

    idx = np.sort(np.random.default_rng(SEED).choice(table.num_rows, size=rows, replace=False))
    pq.write_table(table.take(idx), folder / "train.parquet")
    pq.write_table(pq.read_table(SST2 / "validation.parquet").slice(0, 64), folder / "validation.parquet")
    shutil.copy(SST2 / "labels.json", folder / "labels.json")
    return folder


# --------------------------------------------------------------------------------------------------- bertray


def bertray_command(data: Path, storage: Path, workers: int, steps_per_epoch: int, name: str) -> list[str]:
    sets = {
        "data.train": data / "train.parquet",
        "data.validation": data / "validation.parquet",
        "model.max_length": MAX_LENGTH,
        "train.batch_size": BATCH,
        "train.epochs": EPOCHS,
        "train.log_every": steps_per_epoch,  # one progress window per epoch: the second one is the measurement
        "train.eval_every": steps_per_epoch * EPOCHS,  # evaluate only after the last window
        "optim.lr": LR,
        "run.num_workers": workers,
        "run.name": name,
        "run.storage": storage,
        "run.keep_checkpoints": 1,
    }
    return [sys.executable, "-m", "bertray.cli", "finetune", *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]


def run_bertray(data: Path, root: Path, workers: int, threads: int, src: Path = REPO) -> dict:
    """Run the real CLI in its own process; read the progress windows from the exported checkpoint.
    `src`: a checkout of bertray to measure instead of this one (to try a change before making it)."""
    import numpy as np

    from bertray import checkpoint, config, finetune, modeling

    name = f"tp-bertray-{workers}w-{int(time.time())}"
    probe = config.load(config.FinetuneConfig, data={
        "data": {"train": str(data / "train.parquet"), "validation": str(data / "validation.parquet")},
        "model": {"max_length": MAX_LENGTH}})
    train, _ = finetune.load_splits(probe)
    ids, _ = modeling.encode(modeling.load_tokenizer(modeling.resolve("embedded")), train.texts, MAX_LENGTH, "head")
    lengths = np.array([len(x) for x in ids])
    plan = finetune.plan_batches(lengths, BATCH, workers, SEED + 1, True)  # epoch 1 (the second), all ranks
    steps_per_epoch = len(plan) // workers
    rank0_samples = sum(len(b) for b in plan[0::workers])

    # Same total threads for every contender: all of them on one worker, or split evenly between workers.
    per_worker = max(1, threads // workers)
    env = {**os.environ, "BERTRAY_TORCH_THREADS": str(per_worker), "HF_HUB_OFFLINE": "1"}
    if src != REPO:
        # Ahead of the editable install on the driver and, inherited through the raylet, on the workers.
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = bertray_command(data, root / "runs", workers, steps_per_epoch, name)
    cmd += ["--set", f"run.cpus_per_worker={per_worker}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (root / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log: {root / f'{name}.log'}\n{proc.stderr[-3000:]}")
    meta = checkpoint.read_meta(root / "runs" / name / "model") or {}
    windows = [h for h in meta.get("history", []) if "samples_per_s" in h]
    if len(windows) < EPOCHS:
        raise RuntimeError(f"expected {EPOCHS} progress windows in {name}, got {windows}")
    last = windows[EPOCHS - 1]
    # The loop reports rank 0's samples x world; rank 0's batches are known, so its window time is exact.
    seconds = rank0_samples * workers / last["samples_per_s"]
    tokens = int(sum(lengths[b].sum() for b in plan))
    padded = int(sum(len(b) * lengths[b].max() for b in plan))
    return {
        "contender": f"bertray-{workers}w" + ("" if src == REPO else f" ({src})"),
        "command": "BERTRAY_TORCH_THREADS=%d bertray finetune --set run.num_workers=%d --set run.cpus_per_worker=%d "
                   "--set model.max_length=%d --set train.batch_size=%d ..." % (per_worker, workers, per_worker, MAX_LENGTH, BATCH),
        "threads": f"{workers} worker(s) x {per_worker}",
        "steps": steps_per_epoch,
        "seconds": seconds,
        "tokens": tokens,
        "padded_tokens": padded,
        "tokens_per_s": tokens / seconds,
        "loop_reported_tokens_per_s": last["tokens_per_s"],  # rank 0 tokens x world, for comparison
        "samples_per_s": rank0_samples * workers / seconds,
        "process_wall_s": wall,
        "log": str(root / f"{name}.log"),
    }


# --------------------------------------------------------------------------------------------------- HF Trainer


def run_hf(kind: str, data: Path, threads: int, out: Path) -> None:
    """One HF Trainer contender, in this process."""
    import datasets
    import pyarrow.parquet as pq
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    from bertray import modeling

    torch.set_num_threads(threads)
    path = modeling.resolve("embedded")
    tok = AutoTokenizer.from_pretrained(path)
    table = pq.read_table(data / "train.parquet")
    ds = datasets.Dataset.from_dict({"text": table.column("text").to_pylist(), "label": table.column("label").to_pylist()})
    dynamic = kind == "hf-dynamic"

    def tokenize(batch):
        if dynamic:
            return tok(batch["text"], truncation=True, max_length=MAX_LENGTH)
        return tok(batch["text"], padding="max_length", truncation=True, max_length=MAX_LENGTH)

    ds = ds.map(tokenize, batched=True, remove_columns=["text"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    steps_per_epoch = -(-len(ds) // BATCH)
    marks: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (steps_per_epoch, steps_per_epoch * EPOCHS):
                marks[state.global_step] = time.perf_counter()

    class CountingTrainer(Trainer):
        tokens = 0
        padded = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.state.global_step >= steps_per_epoch:  # the batch of step global_step + 1: epoch 2
                CountingTrainer.tokens += int(inputs["attention_mask"].sum())
                CountingTrainer.padded += int(inputs["attention_mask"].numel())
            return super().training_step(model, inputs, num_items_in_batch)

    args = TrainingArguments(
        output_dir=str(out.parent / f"hf-{kind}"),
        per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS,
        learning_rate=LR,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=int(0.06 * steps_per_epoch * EPOCHS),
        max_grad_norm=1.0,
        train_sampling_strategy="group_by_length" if dynamic else "random",
        use_cpu=True,
        dataloader_num_workers=0,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=SEED,
    )
    trainer = CountingTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                              data_collator=DataCollatorWithPadding(tok) if dynamic else None, callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    seconds = marks[steps_per_epoch * EPOCHS] - marks[steps_per_epoch]
    recipe = ('padding="max_length", max_length=128, random batches' if not dynamic else
              'DataCollatorWithPadding, train_sampling_strategy="group_by_length"')
    out.write_text(json.dumps({
        "contender": kind,
        "command": f"HF Trainer ({recipe}), torch.set_num_threads({threads}), optim={args.optim}",
        "threads": f"1 process x {torch.get_num_threads()}",
        "steps": steps_per_epoch,
        "seconds": seconds,
        "tokens": CountingTrainer.tokens,
        "padded_tokens": CountingTrainer.padded,
        "tokens_per_s": CountingTrainer.tokens / seconds,
        "samples_per_s": len(ds) / seconds,
        "process_wall_s": wall,
    }))


def run_hf_subprocess(kind: str, data: Path, root: Path, threads: int) -> dict:
    out = root / f"{kind}.json"
    cmd = [sys.executable, __file__, "--contender", kind, "--data", str(data), "--threads", str(threads), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    (root / f"{kind}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} failed ({proc.returncode}); log: {root / f'{kind}.log'}\n{proc.stderr[-3000:]}")
    return {**json.loads(out.read_text()), "log": str(root / f"{kind}.log")}


# --------------------------------------------------------------------------------------------------- report


def markdown(r: dict) -> str:
    m = r["machine"]
    by = {c["name"]: c for c in r["results"]}
    lines = [
        f"### Fine-tuning throughput: embedded MiniLM, SST-2 train subset ({r['rows']} rows), batch {BATCH}, "
        f"max_length {MAX_LENGTH}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; {r['threads']} torch threads in total for every contender; "
        f"load average before {m['load_avg_before']}, after {m['load_avg']}. fp32 matmul peak (2048x2048, "
        f"{r['threads']} threads, best of 10): {r['matmul_gflops']:.1f} GFLOP/s. Non-embedding parameters: "
        f"{r['non_embedding_params'] / 1e6:.2f} M (6 x that = {6 * r['non_embedding_params'] / 1e6:.1f} MFLOP per token).",
        "",
        "| contender | threads | steady-state window | real tokens/s | padding share | samples/s | "
        "x hf-maxlen | x hf-dynamic | % of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r["results"]:
        lines.append(
            f"| {c['contender']} | {c['threads']} | {c['steps']} steps, {c['seconds']:.1f} s | **{c['tokens_per_s']:.0f}** | "
            f"{1 - c['tokens'] / c['padded_tokens']:.0%} | {c['samples_per_s']:.1f} | "
            f"{c['tokens_per_s'] / by['hf-maxlen']['tokens_per_s']:.2f} | "
            f"{c['tokens_per_s'] / by['hf-dynamic']['tokens_per_s']:.2f} | {c['mfu']:.1%} |"
            if "hf-maxlen" in by and "hf-dynamic" in by else
            f"| {c['contender']} | {c['threads']} | {c['steps']} steps, {c['seconds']:.1f} s | **{c['tokens_per_s']:.0f}** | "
            f"{1 - c['tokens'] / c['padded_tokens']:.0%} | {c['samples_per_s']:.1f} | - | - | {c['mfu']:.1%} |")
    lines += ["", "Commands:"]
    lines += [f"- {c['contender']}: `{c['command']}`" for c in r["results"]]
    if r.get("targets"):
        lines += ["", "Targets: " + "; ".join(f"{k} {v}" for k, v in r["targets"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000, help="SST-2 train rows every contender trains on")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="total torch threads per contender")
    p.add_argument("--only", action="append", choices=["bertray-1w", "bertray-2w", "hf-maxlen", "hf-dynamic"],
                   help="run only these contenders (repeatable)")
    p.add_argument("--root", default="/tmp/bench-runs/throughput", help="scratch folder (data, runs, logs)")
    p.add_argument("--out", default=None, help="JSON result (default: <root>/result-<time>.json)")
    p.add_argument("--bertray-src", default=str(REPO), help="measure the bertray checkout at this path instead")
    p.add_argument("--contender", choices=["hf-maxlen", "hf-dynamic"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))

    if args.contender:
        run_hf(args.contender, Path(args.data), args.threads, Path(args.out))
        return 0

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    before = machine()
    data = make_data(root, args.rows)
    peak = matmul_peak(args.threads)
    n_params = non_embedding_params()
    order = args.only or ["hf-maxlen", "hf-dynamic", "bertray-1w", "bertray-2w"]
    results = []
    for name in order:
        print(f"running {name} ...", flush=True)
        if name.startswith("bertray"):
            c = run_bertray(data, root, int(name[-2]), args.threads, Path(args.bertray_src).resolve())
        else:
            c = run_hf_subprocess(name, data, root, args.threads)
        c["name"] = name
        c["mfu"] = 6 * n_params * c["tokens_per_s"] / peak
        print(f"  {name}: {c['tokens_per_s']:.0f} real tokens/s over {c['steps']} steps ({c['seconds']:.1f} s)", flush=True)
        results.append(c)
    by = {c["name"]: c for c in results}
    targets = {}
    for b in ("bertray-1w", "bertray-2w"):
        if b in by and "hf-maxlen" in by:
            targets[f"{b} / hf-maxlen >= {TARGETS['vs_hf_maxlen']}"] = round(by[b]["tokens_per_s"] / by["hf-maxlen"]["tokens_per_s"], 2)
        if b in by and "hf-dynamic" in by:
            targets[f"{b} / hf-dynamic >= {TARGETS['vs_hf_dynamic']}"] = round(by[b]["tokens_per_s"] / by["hf-dynamic"]["tokens_per_s"], 2)
        if b in by:
            targets[f"{b} matmul-peak share >= {TARGETS['mfu']:.0%}"] = f"{by[b]['mfu']:.1%}"
    result = {
        "rows": args.rows, "threads": args.threads, "matmul_gflops": peak / 1e9, "non_embedding_params": n_params,
        "machine": {**machine(), "load_avg_before": before["load_avg"]}, "results": results, "targets": targets,
        "versions": {"python": platform.python_version(), **_versions()},
    }
    out = Path(args.out or root / f"result-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\nJSON result: {out}")
    return 0


def _versions() -> dict:
    import ray
    import torch
    import transformers

    return {"ray": ray.__version__, "torch": torch.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":
    sys.exit(main())

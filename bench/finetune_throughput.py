"""Training throughput of `bertray finetune` against Hugging Face `Trainer`, in one run, on one machine.

    .venv/bin/python bench/finetune_throughput.py            # about 15 minutes on 2 quiet CPU cores
    .venv/bin/python bench/finetune_throughput.py --rows 2000 --repeat 3 --only hf-dynamic --only bertray-1w
                                                             # medians of 3 runs in turns, about 7 minutes

Contenders, all on the same SST-2 train subset (default 4,000 rows), the same model (the embedded MiniLM),
batch size 32 per step, max_length 128, AdamW + linear schedule + clipping, and the same total torch threads
(default: every core):

  bertray-1w    `bertray finetune`, 1 Ray Train worker using all threads
  bertray-2w    `bertray finetune`, 2 Ray Train workers (DDP), threads split between them, batch 32 per worker
  hf-maxlen     the tutorial recipe: `padding="max_length"` (128) at tokenization, HF `Trainer`, random batches
  hf-dynamic    the strongest single-process baseline: HF `Trainer`, `DataCollatorWithPadding`, length-grouped
                batches (transformers 5 renamed `group_by_length=True` to `train_sampling_strategy="group_by_length"`)

and two diagnostics that split bertray's time between its loop and the Ray process it runs in:

  bertray-loop      bertray's own batch plan, collate, model, fused AdamW, clipping and schedule, with no Ray: one
                    plain process, as the HF contenders run
  bertray-1w-nice0  bertray-1w with RAY_worker_niceness=0: Ray starts its workers at niceness 15, below its own
                    raylet, GCS and driver, which share these cores

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


BERTRAY = {"bertray-1w": (1, {}), "bertray-2w": (2, {}), "bertray-1w-nice0": (1, {"RAY_worker_niceness": "0"})}


def run_bertray(data: Path, root: Path, workers: int, threads: int, src: Path = REPO, extra_env: dict | None = None) -> dict:
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
    env = {**os.environ, "BERTRAY_TORCH_THREADS": str(per_worker), "HF_HUB_OFFLINE": "1", **(extra_env or {})}
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
        "command": "".join(f"{k}={v} " for k, v in (extra_env or {}).items()) + "BERTRAY_TORCH_THREADS=%d bertray finetune --set run.num_workers=%d --set run.cpus_per_worker=%d "
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


def run_loop(data: Path, threads: int, out: Path) -> None:
    """bertray's training step with no Ray around it, in this process: the same plan, collate, model and optimizer
    as `bertray finetune` (train_loop.Loop's per-step work: forward, loss, backward, clip, fused AdamW, schedule)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import get_scheduler

    from bertray import finetune, modeling, train_loop
    from bertray.config import FinetuneConfig, load

    torch.set_num_threads(threads)
    cfg = load(FinetuneConfig, data={"data": {"train": str(data / "train.parquet")},
                                     "model": {"max_length": MAX_LENGTH}, "optim": {"lr": LR},
                                     "train": {"batch_size": BATCH}})
    table = pq.read_table(data / "train.parquet")
    labels = np.asarray(table.column("label").to_pylist())
    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    ids = modeling.TokenIds.from_lists(modeling.encode(tok, table.column("text").to_pylist(), MAX_LENGTH, "head")[0])
    model = modeling.build_classifier(cfg.model, ["negative", "positive"])
    optimizer = train_loop._setup_optimizer(model, cfg.optim, torch.device("cpu"))
    plans = [finetune.plan_batches(ids.lengths, BATCH, 1, SEED + e, True) for e in range(EPOCHS)]
    total = sum(len(p) for p in plans)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(0.06 * total), num_training_steps=total)
    model.train()
    for epoch, plan in enumerate(plans):
        t0, tokens, padded = time.perf_counter(), 0, 0
        for rows in plan:
            batch = finetune.collate(ids, rows, tok.pad_token_id, 1, labels)
            tokens += int(batch["attention_mask"].sum())
            padded += int(batch["attention_mask"].numel())
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
    out.write_text(json.dumps({
        "contender": "bertray-loop", "command": f"bertray's step, no Ray: torch.set_num_threads({threads})",
        "threads": f"1 process x {torch.get_num_threads()}", "steps": len(plans[-1]), "seconds": seconds,
        "tokens": tokens, "padded_tokens": padded, "tokens_per_s": tokens / seconds,
        "samples_per_s": len(labels) / seconds,
    }))


def run_in_subprocess(kind: str, data: Path, root: Path, threads: int) -> dict:
    """One contender that runs without Ray (an HF Trainer recipe, or bertray-loop) in a fresh process of its own."""
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
        f"{r['non_embedding_params'] / 1e6:.2f} M (6 x that = {6 * r['non_embedding_params'] / 1e6:.1f} MFLOP per token)."
        + (f" Each contender ran {r['repeat']} times, in turns; each row is its median run." if r.get("repeat", 1) > 1 else ""),
        "",
        "| contender | threads | steady-state window | real tokens/s | padding share | samples/s | "
        "x hf-maxlen | x hf-dynamic | % of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    def ratio(c: dict, base: str) -> str:
        return f"{c['tokens_per_s'] / by[base]['tokens_per_s']:.2f}" if base in by else "-"

    for c in r["results"]:
        lines.append(
            f"| {c['contender']} | {c['threads']} | {c['steps']} steps, {c['seconds']:.1f} s | **{c['tokens_per_s']:.0f}**"
            + (f" (runs: {', '.join(map(str, c['runs_tokens_per_s']))})" if len(c.get("runs_tokens_per_s", [])) > 1 else "")
            + f" | {1 - c['tokens'] / c['padded_tokens']:.0%} | {c['samples_per_s']:.1f} | {ratio(c, 'hf-maxlen')} | "
            f"{ratio(c, 'hf-dynamic')} | {c['mfu']:.1%} |")
    lines += ["", "Commands:"]
    lines += [f"- {c['contender']}: `{c['command']}`" for c in r["results"]]
    if r.get("targets"):
        lines += ["", "Targets: " + "; ".join(f"{k} {v}" for k, v in r["targets"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000, help="SST-2 train rows every contender trains on")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="total torch threads per contender")
    p.add_argument("--only", action="append", choices=[*BERTRAY, "bertray-loop", "hf-maxlen", "hf-dynamic"],
                   help="run only these contenders (repeatable)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each contender, taken in turns; the median is reported")
    p.add_argument("--root", default="/tmp/bench-runs/throughput", help="scratch folder (data, runs, logs)")
    p.add_argument("--out", default=None, help="JSON result (default: <root>/result-<time>.json)")
    p.add_argument("--bertray-src", default=str(REPO), help="measure the bertray checkout at this path instead")
    p.add_argument("--also-src", default=None,
                   help="also run each bertray contender from the checkout at this path, in turns with this one "
                        "(a change against the code before it, in the same run)")
    p.add_argument("--contender", choices=["hf-maxlen", "hf-dynamic", "bertray-loop"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))

    if args.contender == "bertray-loop":
        run_loop(Path(args.data), args.threads, Path(args.out))
        return 0
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
    srcs = {name: Path(args.bertray_src).resolve() for name in order if name in BERTRAY}
    if args.also_src:
        also = Path(args.also_src).resolve()
        order = [n for name in order for n in ([name, f"{name} ({also})"] if name in BERTRAY else [name])]
        srcs.update({f"{name} ({also})": also for name in list(srcs)})
    runs: dict[str, list[dict]] = {name: [] for name in order}
    # Contenders take turns (A B A B ...), so a slow spell of a shared machine falls on all of them alike.
    for rep in range(args.repeat):
        for name in order:
            print(f"running {name}" + (f" ({rep + 1} of {args.repeat})" if args.repeat > 1 else "") + " ...", flush=True)
            if name in srcs:
                workers, extra_env = BERTRAY[name.split(" (")[0]]
                c = run_bertray(data, root, workers, args.threads, srcs[name], extra_env)
                c["contender"] = name
            else:
                c = run_in_subprocess(name, data, root, args.threads)
            print(f"  {name}: {c['tokens_per_s']:.0f} real tokens/s over {c['steps']} steps ({c['seconds']:.1f} s)", flush=True)
            runs[name].append(c)
    results = []
    for name, cs in runs.items():
        c = sorted(cs, key=lambda c: c["tokens_per_s"])[(len(cs) - 1) // 2]  # the median run (the lower middle)
        c = {**c, "name": name, "mfu": 6 * n_params * c["tokens_per_s"] / peak,
             "runs_tokens_per_s": [round(x["tokens_per_s"]) for x in cs]}
        results.append(c)
    by = {c["name"]: c for c in results}
    targets = {}
    for b in BERTRAY:
        if b in by and "hf-maxlen" in by:
            targets[f"{b} / hf-maxlen >= {TARGETS['vs_hf_maxlen']}"] = round(by[b]["tokens_per_s"] / by["hf-maxlen"]["tokens_per_s"], 2)
        if b in by and "hf-dynamic" in by:
            targets[f"{b} / hf-dynamic >= {TARGETS['vs_hf_dynamic']}"] = round(by[b]["tokens_per_s"] / by["hf-dynamic"]["tokens_per_s"], 2)
        if b in by:
            targets[f"{b} matmul-peak share >= {TARGETS['mfu']:.0%}"] = f"{by[b]['mfu']:.1%}"
    result = {
        "rows": args.rows, "repeat": args.repeat, "threads": args.threads, "matmul_gflops": peak / 1e9, "non_embedding_params": n_params,
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

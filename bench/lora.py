"""LoRA adapters against full fine-tuning, at the same step budget, in one run on one machine.

    .venv/bin/python bench/lora.py                          # the embedded MiniLM on SST-2; adds BERT-base on a GPU
    .venv/bin/python bench/lora.py --steps 4 --rows 256 --validation-rows 64   # smoke: the plumbing, in a minute

Each contender is the real `bertray finetune` stage (`finetune.run`, one Ray Train worker) on the same SST-2 train
rows, batch size, max_length, schedule and seed, for the same number of optimizer steps, evaluated on SST-2
validation every `--eval-every` steps:

  full   every weight trains (model.adapter.kind none), at lr --lr
  lora   PEFT LoRA on query and value (model.adapter: r --r, alpha --alpha), the base frozen, the head trained in
         full, at lr --lora-lr (adapters want a larger step than full fine-tuning)

Columns: accuracy and macro-F1 of the best checkpoint (what the run exports) and accuracy at the last step;
trainable parameters; peak memory of the training worker (on CPU its resident set's high-water mark, VmHWM; on a GPU
the memory nvidia-smi shows the worker process holding, CUDA context and the allocator's cache included), sampled by
the driver every 0.2 s; real (unpadded) tokens/s over training, as the loop reports it; and the bytes of the last
training checkpoint (weights or adapter, optimizer state, tokenizer).

On a GPU (found by torch, or --device gpu), the same pair also runs on a randomly initialised BERT-base-sized
encoder (12 layers, width 768) with the MiniLM's tokenizer, in bf16 autocast: its memory and speed are what LoRA
changes at that size; its accuracy after a few hundred steps from random weights says nothing about quality.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import machine, shared_data

REPO = Path(__file__).resolve().parents[1]
SST2 = shared_data() / "sst2"
SEED = 42
LABELS = ["negative", "positive"]


# --------------------------------------------------------------------------------------------------- data and models


def make_data(root: Path, rows: int | None, validation_rows: int | None) -> Path:
    """SST-2 train (a seeded sample of `rows`, or all of it) and validation (the first `validation_rows`, or all)."""
    import numpy as np
    import pyarrow.parquet as pq

    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    train = pq.read_table(SST2 / "train.parquet")
    if rows and rows < train.num_rows:
        train = train.take(np.sort(np.random.default_rng(SEED).choice(train.num_rows, size=rows, replace=False)))
    val = pq.read_table(SST2 / "validation.parquet")
    pq.write_table(train, folder / "train.parquet")
    pq.write_table(val.slice(0, validation_rows) if validation_rows else val, folder / "validation.parquet")
    shutil.copy(SST2 / "labels.json", folder / "labels.json")
    return folder


def bert_base(folder: Path) -> str:
    """A random BERT-base-sized encoder with the embedded MiniLM's tokenizer (the same uncased vocabulary)."""
    import torch
    from transformers import BertConfig, BertModel

    from bertray import modeling

    if not (folder / "config.json").exists():
        tok = modeling.load_tokenizer(modeling.resolve("embedded"))
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=tok.vocab_size)).save_pretrained(folder)  # defaults: BERT-base
        tok.save_pretrained(folder)
    return str(folder)


def trainable_params(model_cfg) -> tuple[int, int]:
    """(trainable, all) parameters of the classifier the run builds."""
    from bertray import modeling

    model = modeling.build_classifier(model_cfg, LABELS)
    params = {id(p): p for p in model.parameters()}.values()  # PEFT keeps a frozen copy of the head beside the trained one
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --------------------------------------------------------------------------------------------------- memory


class PeakWatcher:
    """The highest memory any Ray Train worker of this driver's local cluster reached while it ran, in bytes."""

    def __init__(self, gpu: bool):
        self.gpu, self.peak = gpu, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "PeakWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            pids = _train_worker_pids()
            if pids:
                self.peak = max(self.peak, *(_gpu_bytes(pids) if self.gpu else map(_rss_hwm, pids)))


def _train_worker_pids() -> list[int]:
    """Processes titled ray::RayTrainWorker under this driver's raylet (other Ray clusters on the machine are not
    ours to measure)."""
    import psutil
    import ray

    node = ray._private.worker._global_node  # private Ray API: the local cluster this driver started
    if node is None or "raylet" not in node.all_processes:
        return []
    out = []
    for proc in psutil.Process(node.all_processes["raylet"][0].process.pid).children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::RayTrainWorker"):
                out.append(proc.pid)
        except psutil.Error:
            continue
    return out


def _rss_hwm(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return kb * 1024


def _gpu_bytes(pids: list[int]) -> list[int]:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    used = {int(p): int(m) for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)}
    return [used.get(pid, 0) * 2**20 for pid in pids] or [0]


# --------------------------------------------------------------------------------------------------- one run


def run_one(args, data: Path, root: Path, model: str, base: str, adapter: bool, gpu: bool) -> dict:
    from bertray import config as C
    from bertray import finetune

    name = f"lora-bench-{model}-{'lora' if adapter else 'full'}"
    cfg = C.load(C.FinetuneConfig, data={
        "model": {"base": base, "max_length": args.max_length,
                  "adapter": {"kind": "lora", "r": args.r, "alpha": args.alpha} if adapter else {}},
        "data": {"train": str(data / "train.parquet"), "validation": str(data / "validation.parquet")},
        "optim": {"lr": args.lora_lr if adapter else args.lr},
        "train": {"batch_size": args.batch_size, "max_steps": args.steps, "eval_every": min(args.eval_every, args.steps),
                  "log_every": max(1, min(args.log_every, args.steps)), "seed": SEED},
        "run": {"name": name, "storage": str(root / "runs"), "num_workers": 1, "use_gpu": gpu,
                "cpus_per_worker": 1 if gpu else args.threads, "keep_checkpoints": 1, "overwrite": True},
    })
    trainable, total = trainable_params(cfg.model)
    t0 = time.perf_counter()
    with PeakWatcher(gpu) as watch:
        summary = finetune.run(cfg)
    wall = time.perf_counter() - t0
    run_dir = root / "runs" / name
    last = max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    m, fm = summary["metrics"], summary["final_metrics"]
    return {
        "model": model, "method": "lora" if adapter else "full", "lr": cfg.optim.lr,
        "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "final_accuracy": fm.get("accuracy"),
        "best_step": summary["best_step"], "final_step": summary["final_step"],
        "trainable_params": trainable, "total_params": total, "peak_memory_bytes": watch.peak,
        "memory_kind": "GPU (nvidia-smi)" if gpu else "RSS high-water mark",
        "tokens_per_s": fm.get("tokens_per_s"), "samples_per_s": fm.get("samples_per_s"),
        "checkpoint_bytes": _bytes(last), "model_bytes": _bytes(run_dir / "model"),
        **({"adapter_bytes": _bytes(run_dir / "adapter")} if adapter else {}), "wall_s": round(wall, 1),
    }


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# --------------------------------------------------------------------------------------------------- report


def markdown(r: dict) -> str:
    a, m = r["args"], r["machine"]
    lines = [
        f"### LoRA vs full fine-tuning on SST-2: {a['steps']} steps of batch {a['batch_size']}, max_length "
        f"{a['max_length']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if m.get("gpu") else "")
        + f"; load average before {m['load_avg_before']}, after {m['load_avg']}. Train rows: {r['train_rows']:,}; "
        f"validation rows: {r['validation_rows']:,}. LoRA: r {a['r']}, alpha {a['alpha']}, on query and value.",
        "",
        "| model | method | lr | trainable params | accuracy (best) | macro-F1 (best) | accuracy (last step) | "
        "peak memory | real tokens/s | checkpoint |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in r["results"]:
        lines.append(
            f"| {c['model']} | {c['method']} | {c['lr']:g} | {c['trainable_params'] / 1e6:.2f} M of "
            f"{c['total_params'] / 1e6:.2f} M ({c['trainable_params'] / c['total_params']:.1%}) | "
            f"**{c['accuracy']:.4f}** (step {c['best_step']}) | {c['macro_f1']:.4f} | "
            f"{c['final_accuracy']:.4f} | {c['peak_memory_bytes'] / 2**20:,.0f} MiB ({c['memory_kind']}) | "
            f"{c['tokens_per_s']:,.0f} | {c['checkpoint_bytes'] / 2**20:,.1f} MiB |")
    lines += ["", f"Command: `{' '.join(['python bench/lora.py', *r['argv']])}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600, help="optimizer steps every contender trains")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5, help="full fine-tuning's learning rate")
    p.add_argument("--lora-lr", type=float, default=5e-4, help="LoRA's learning rate")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--rows", type=int, default=None, help="SST-2 train rows (a seeded sample); default: all")
    p.add_argument("--validation-rows", type=int, default=None, help="first SST-2 validation rows; default: all")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="gpu: train on one GPU and add the BERT-base-sized pair; auto: gpu when torch sees one")
    p.add_argument("--only", action="append", choices=["full", "lora"], help="run only this method (repeatable)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the CPU worker")
    p.add_argument("--root", default="/tmp/bench-runs/lora", help="scratch folder (data, runs)")
    p.add_argument("--out", default=None, help="JSON result (default: <root>/result-<time>.json)")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # Ray starts a worker with OMP_NUM_THREADS = its CPU share; one CPU worker uses them all.
    os.environ["BERTRAY_TORCH_THREADS"] = str(args.threads)
    sys.path.insert(0, str(REPO))
    import pyarrow.parquet as pq
    import torch

    from bertray import runtime

    gpu = args.device == "gpu" or (args.device == "auto" and torch.cuda.is_available())
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    before = machine()
    data = make_data(root, args.rows, args.validation_rows)
    runtime.init_ray(None)
    models = [("MiniLM-L6", "embedded")] + ([("BERT-base (random)", bert_base(root / "bert-base"))] if gpu else [])
    results = []
    for model, base in models:
        for method in args.only or ["full", "lora"]:
            print(f"running {model} {method} ...", flush=True)
            c = run_one(args, data, root, model, base, method == "lora", gpu)
            print(f"  accuracy {c['accuracy']:.4f}, {c['tokens_per_s']:,.0f} tokens/s, peak "
                  f"{c['peak_memory_bytes'] / 2**20:,.0f} MiB", flush=True)
            results.append(c)
    result = {
        "args": vars(args), "argv": sys.argv[1:] if argv is None else argv, "results": results,
        "train_rows": pq.read_metadata(data / "train.parquet").num_rows,
        "validation_rows": pq.read_metadata(data / "validation.parquet").num_rows,
        "machine": {**machine(), "load_avg_before": before["load_avg"]},
        "versions": {"python": platform.python_version(), **_versions()},
    }
    out = Path(args.out or root / f"result-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))
    print(f"\nJSON result: {out}")
    return 0


def _versions() -> dict:
    import peft
    import ray
    import torch
    import transformers

    return {"ray": ray.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


if __name__ == "__main__":
    sys.exit(main())

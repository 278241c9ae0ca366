"""What every benchmark records about the machine, and the fp32 matmul peak its utilisation figures divide by.

The scripts run as `python bench/NAME.py`, so this folder is on sys.path and `from common import ...` works."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """The shared datasets (SST-2, 20 Newsgroups, ...): beside the repository, or where BERTRAY_SHARED_DATA points.
    Read when called, so that a script may point it at data of its own first (bench/gpu.py does)."""
    return Path(os.environ.get("BERTRAY_SHARED_DATA", REPO.parent / "shared" / "data"))


def machine() -> dict:
    """CPU model, cores and versions, plus the load average: other work on the machine skews every figure."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "torch": version("torch"), "python": platform.python_version()}
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def matmul_peak(threads: int, n: int = 2048, reps: int = 10) -> float:
    """Best fp32 matmul FLOP/s of `reps` timed n x n products (after two untimed ones) on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def gpu_matmul_peak(dtype, n: int = 8192, reps: int = 10, tf32: bool = False) -> float:
    """Best FLOP/s of `reps` timed n x n CUDA matmuls in `dtype` (for fp32, TF32 tensor cores only if `tf32`)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b)
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    torch.backends.cuda.matmul.allow_tf32 = False
    return 2 * n ** 3 / best


def minilm_classifier(folder: Path, labels: list[str], max_length: int = 128) -> str:
    """The embedded MiniLM with a fresh, random classification head, saved as a bertray checkpoint: what the
    speed benchmarks run (speed does not depend on the weights)."""
    import dataclasses

    from bertray import checkpoint, modeling
    from bertray.config import ModelConfig

    cfg = ModelConfig(max_length=max_length)
    model = modeling.build_classifier(cfg, labels)
    tok = modeling.load_tokenizer(modeling.resolve(cfg.base))
    checkpoint.save(folder, model, tok, {"kind": "classifier", "base_model": cfg.base, "label_names": labels,
                                         "config": {"model": dataclasses.asdict(cfg)}, "metrics": {}})
    return str(folder)


def tiny_bert(folder: Path) -> str:
    """A random BERT encoder of 2 layers, width 32, with the embedded MiniLM's tokenizer: for benchmarks of what
    surrounds the model (ingest, start-up, memory of the data), where the model's own cost would only add noise."""
    from transformers import BertConfig, BertModel

    from bertray import modeling

    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def command(script: str, argv: list[str] | None) -> str:
    """How this run was started, for the Markdown a benchmark prints."""
    return f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:])


def report(out: dict, json_path: str | None, markdown) -> int:
    """Write the raw result to `json_path` if given and print its Markdown; the exit code of a benchmark's main."""
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
    print(markdown(out))
    return 0


def run_on_trained_model(args, measure, report) -> int:
    """What the benchmarks of a trained classifier (precision.py, packing.py) do around their measurement: refuse a
    missing --model with the way to make one, measure, write the raw result to --json if given, print Markdown."""
    if not Path(args.model).is_dir():
        sys.exit(f"--model {args.model}: no such folder; run `make demo` first, or pass a trained classifier")
    r = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    print(report(r))
    return 0

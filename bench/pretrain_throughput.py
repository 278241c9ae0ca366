"""Masked-LM pretraining throughput (issue 4) through the real `bertray pretrain`, on CPU or one GPU.

    python bench/pretrain_throughput.py --device cpu --steps 60 --batch 8          # embedded MiniLM, fp32
    python bench/pretrain_throughput.py --device cuda --steps 400 --batch 64       # BERT-base, bf16 autocast

Runs `pretrain.run` on SST-2 train sentences packed into full 128-token sequences (every token is real), one
worker. On CPU: the embedded MiniLM with all the machine's cores as torch threads, against the measured fp32 matmul
rate. On a GPU: a randomly initialised BERT-base (12 layers, width 768; speed does not depend on the weights) with
the MiniLM tokenizer, under bf16 autocast, against the measured bf16 matmul rate (fp32 and TF32 rates printed too).
Tokens/s is the median of the progress windows after warm-up; utilisation counts 6 x non-embedding parameters
FLOPs per token (forward 2, backward 4; attention's own FLOPs left out, as in the fine-tuning figures).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import gpu_matmul_peak, machine, matmul_peak, shared_data

REPO = Path(__file__).resolve().parents[1]
SST2 = shared_data() / "sst2"


def bert_base(folder: Path) -> str:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from bertray import modeling

    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size))  # BertConfig's defaults are BERT-base
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=8, help="packed sequences per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", default="/tmp/bench-runs/pretrain-throughput")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bertray import checkpoint, config as C, modeling, pretrain, runtime

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    threads = os.cpu_count() or 1
    if gpu:
        peaks = {"fp32": gpu_matmul_peak(torch.float32), "tf32": gpu_matmul_peak(torch.float32, tf32=True),
                 "bf16": gpu_matmul_peak(torch.bfloat16)}
        base = bert_base(out / "bert-base-random")
    else:
        peaks = {"fp32": matmul_peak(threads)}
        base = "embedded"
        os.environ["BERTRAY_TORCH_THREADS"] = str(threads)  # one worker with every core
    from transformers import AutoModelForMaskedLM

    params = modeling.count_params(AutoModelForMaskedLM.from_pretrained(modeling.resolve(base)), non_embedding=True)
    peak_name = "bf16" if gpu else "fp32"
    cfg = C.load(C.PretrainConfig, data={
        "model": {"base": base, "max_length": args.max_length},
        "data": {"train": str(SST2 / "train.parquet")},
        "optim": {"lr": 1e-4, "warmup_ratio": 0.06},
        "train": {"batch_size": args.batch, "max_steps": args.steps, "eval_every": args.steps,
                  "log_every": 10 if gpu else 5, "mixed_precision": "bf16" if gpu else "no"},
        "mlm": {"eval_rows": 256},
        "run": {"name": f"{args.device}-{int(time.time())}", "storage": str(out / "runs"), "num_workers": 1,
                # On CPU, 1 CPU in Ray's books leaves one for Ray Data's reads; torch still uses every core.
                "use_gpu": gpu, "cpus_per_worker": 4 if gpu else 1, "keep_checkpoints": 1},
    })
    runtime.init_ray(None)
    t0 = time.perf_counter()
    summary = pretrain.run(cfg)
    wall = time.perf_counter() - t0
    meta = checkpoint.read_meta(summary["model"])
    # Skip the first windows (CUDA warm-up, allocator growth) and the one holding the final evaluation/checkpoint.
    warm = 30 if gpu else 10
    windows = [h["tokens_per_s"] for h in meta["history"] if "tokens_per_s" in h and warm < h["step"] < args.steps]
    tps = statistics.median(windows)
    util = 6 * params * tps / peaks[peak_name]
    result = {"machine": machine(), "peaks_flops": peaks, "non_embedding_params": params, "tokens_per_s_median": tps,
              "tokens_per_s_overall": summary["final_metrics"].get("tokens_per_s"), "utilisation": util,
              "peak": peak_name, "model": "BERT-base (random init)" if gpu else "embedded MiniLM-L6",
              "perplexity_start": summary["initial_metrics"]["perplexity"],
              "perplexity_end": summary["final_metrics"].get("perplexity"), "wall_s": wall, "args": vars(args)}
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    m = result["machine"]
    print(f"Machine: {m.get('gpu') or m['cpu']}, {m['cores']} CPU cores, torch {m['torch']}; load average "
          f"{m['load_avg']}.")
    print(f"Command: `python bench/pretrain_throughput.py {' '.join(argv or sys.argv[1:])}`")
    print("Matmul rates: " + ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in peaks.items()) + ".")
    print(f"{result['model']} ({params / 1e6:.1f} M non-embedding parameters), 1 worker "
          f"({'bf16 autocast' if gpu else f'fp32, {threads} torch threads'}), {args.batch} x {args.max_length} packed "
          f"tokens per step, {args.steps} steps: {tps:,.0f} tokens/s (median progress window), "
          f"{result['tokens_per_s_overall']:,.0f} over the whole run; {util:.1%} of the {peak_name} matmul rate; "
          f"perplexity {result['perplexity_start']:.0f} -> {result['perplexity_end']:.0f}; wall {wall:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

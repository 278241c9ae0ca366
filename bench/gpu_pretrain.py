"""Masked-LM pretraining throughput on a GPU (issue 4): a BERT-base-sized model through the real `bertray pretrain`.

    python bench/gpu_pretrain.py --steps 300 --batch 64

Builds a randomly initialised BERT-base (12 layers, width 768, 110M parameters) with the embedded MiniLM's
tokenizer (speed does not depend on the weights), then runs `pretrain.run` on SST-2 train sentences, packed into
full 128-token sequences, on one GPU worker under bf16 autocast. Reports real tokens/s (every packed token is real)
from the progress windows after warm-up, and the fraction of the GPU's measured bf16 matmul rate that training
reaches, counting 6 x non-embedding parameters FLOPs per token (forward 2, backward 4; attention's own FLOPs left
out, as in the CPU figures). Also prints the fp32 (TF32 off), TF32 and bf16 matmul rates it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from common import gpu_matmul_peak, machine

REPO = Path(__file__).resolve().parents[1]
SST2 = Path(os.environ.get("BERTRAY_SHARED_DATA", REPO.parent / "shared" / "data")) / "sst2"


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
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64, help="packed 128-token sequences per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", default="/tmp/bench-runs/gpu-pretrain")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bertray import checkpoint, config as C, modeling, pretrain, runtime

    if not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out)
    peaks = {"fp32": gpu_matmul_peak(torch.float32), "bf16": gpu_matmul_peak(torch.bfloat16)}
    torch.backends.cuda.matmul.allow_tf32 = True
    peaks["tf32"] = gpu_matmul_peak(torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = False
    base = bert_base(out / "bert-base-random")
    from transformers import BertForMaskedLM

    params = modeling.count_params(BertForMaskedLM.from_pretrained(base), non_embedding=True)
    cfg = C.load(C.PretrainConfig, data={
        "model": {"base": base, "max_length": args.max_length},
        "data": {"train": str(SST2 / "train.parquet")},
        "optim": {"lr": 1e-4, "warmup_ratio": 0.06},
        "train": {"batch_size": args.batch, "max_steps": args.steps, "eval_every": args.steps, "log_every": 10,
                  "mixed_precision": "bf16"},
        "mlm": {"eval_rows": 256},
        "run": {"name": f"bert-base-{int(time.time())}", "storage": str(out / "runs"), "num_workers": 1,
                "use_gpu": True, "cpus_per_worker": 4, "keep_checkpoints": 1},
    })
    runtime.init_ray(None)
    t0 = time.perf_counter()
    summary = pretrain.run(cfg)
    wall = time.perf_counter() - t0
    meta = checkpoint.read_meta(summary["model"])
    # Skip the first windows (CUDA warm-up, allocator growth) and the one holding the final evaluation/checkpoint.
    windows = [h["tokens_per_s"] for h in meta["history"] if "tokens_per_s" in h and 30 < h["step"] < args.steps]
    tps = statistics.median(windows)
    util = 6 * params * tps / peaks["bf16"]
    result = {"machine": machine(), "peaks_flops": peaks, "non_embedding_params": params, "tokens_per_s_median": tps,
              "tokens_per_s_overall": summary["final_metrics"].get("tokens_per_s"), "bf16_utilisation": util,
              "perplexity_start": summary["initial_metrics"]["perplexity"],
              "perplexity_end": summary["final_metrics"].get("perplexity"), "wall_s": wall, "args": vars(args)}
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    m = result["machine"]
    print(f"Machine: {m.get('gpu')}, {m['cores']} CPU cores, torch {m['torch']}.")
    print(f"Command: `python bench/gpu_pretrain.py {' '.join(argv or sys.argv[1:])}`")
    print(f"Matmul 8192^3: fp32 {peaks['fp32'] / 1e12:.1f} TFLOP/s, TF32 {peaks['tf32'] / 1e12:.1f}, "
          f"bf16 {peaks['bf16'] / 1e12:.1f}.")
    print(f"BERT-base ({params / 1e6:.1f} M non-embedding parameters), 1 GPU worker, bf16 autocast, "
          f"{args.batch} x {args.max_length} packed tokens per step, {args.steps} steps: {tps:,.0f} tokens/s "
          f"(median progress window), {result['tokens_per_s_overall']:,.0f} over the whole run; "
          f"{util:.1%} of the bf16 matmul rate; perplexity {result['perplexity_start']:.0f} -> "
          f"{result['perplexity_end']:.0f}; wall {wall:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

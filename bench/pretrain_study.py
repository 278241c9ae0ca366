"""A small domain-adaptive pretraining study on SST-2, on this machine: does further masked-LM pretraining of the
embedded MiniLM on SST-2 sentences help fine-tuning on a small labeled subset?

    .venv/bin/python bench/pretrain_study.py                  # about 15 minutes on 2 quiet CPU cores
    .venv/bin/python bench/pretrain_study.py --steps 100 --ft-rows 2000 --out /tmp/bench-runs/pretrain-study

1. `pretrain.run` on the SST-2 train sentences as unlabeled text (packed to `--max-length`), 2N optimizer steps,
   evaluating held-out masked-LM perplexity every N/2 steps on the first `--eval-rows` train sentences (which
   pretraining skips). Step 0 is the driver's evaluation before training (`initial_metrics`).
2. The checkpoints at steps N and 2N are exported beside the run.
3. `finetune.run` from (a) the base model, (b) the step-N and (c) the step-2N checkpoint: the same seeded
   `--ft-rows` SST-2 train rows, the same seed, epochs and learning rate; accuracy on all of SST-2 validation.
4. Pretraining throughput: real tokens/s (median over progress windows that contain no evaluation), and its
   fraction of the measured fp32 matmul rate, counting 6 x non-embedding parameters FLOPs per token (the
   masked-only vocabulary projection and the attention scores are not counted, so this understates the work).

Prints Markdown (machine, command, load, figures) and writes it with the raw figures to `--out`. Each finished
phase is saved there too; `--resume` reuses them (on a busy shared machine a study may need two sittings).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import machine, matmul_peak, shared_data

REPO = Path(__file__).resolve().parents[1]
SST2 = shared_data() / "sst2"


def others_running() -> list[str]:
    """The busiest processes that are not this study's (this process and its descendants)."""
    import psutil

    mine = {os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))}
    procs = []
    for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
        if p.info["pid"] in mine or not p.info["cmdline"]:
            continue
        t = p.info["cpu_times"]
        procs.append((t.user + t.system if t else 0.0, " ".join(" ".join(p.info["cmdline"]).split())[:90]))
    return [c for _, c in sorted(procs, reverse=True)[:6]]


def checkpoint_at(run_dir: Path, step: int) -> Path:
    for meta in run_dir.glob("checkpoint_*/bertray.json"):
        if json.loads(meta.read_text()).get("step") == step:
            return meta.parent
    raise SystemExit(f"no checkpoint at step {step} under {run_dir} (raise --keep)")


def pretrain_phase(args, out: Path) -> dict:
    from bertray import checkpoint, config as C, pretrain

    cfg = C.load(C.PretrainConfig, data={
        "model": {"base": "embedded", "max_length": args.max_length},
        "data": {"train": str(SST2 / "train.parquet")},
        "optim": {"lr": args.lr, "warmup_ratio": 0.06},
        "train": {"batch_size": args.batch, "max_steps": 2 * args.steps, "eval_every": max(1, args.steps // 2),
                  "log_every": 5, "seed": args.seed},
        "mlm": {"eval_rows": args.eval_rows},
        "run": {"name": "pretrain", "storage": str(out / "runs"), "num_workers": args.workers,
                "cpus_per_worker": args.cpus_per_worker, "keep_checkpoints": 8},
    })
    t0 = time.perf_counter()
    summary = pretrain.run(cfg)
    wall = time.perf_counter() - t0
    run_dir = out / "runs" / "pretrain"
    exports = {}
    for step in (args.steps, 2 * args.steps):
        exports[step] = checkpoint.export(checkpoint_at(run_dir, step), str(out / "models" / f"mlm-step{step}"))
    meta = checkpoint.read_meta(exports[2 * args.steps])
    evals = {0: summary["initial_metrics"]["perplexity"]}
    evals.update({h["step"]: h["perplexity"] for h in meta["history"] if "perplexity" in h})
    eval_steps = {h["step"] for h in meta["history"] if "perplexity" in h}
    # A progress window that ends right after an evaluation step includes the evaluation and checkpoint time.
    windows = [h for h in meta["history"] if "tokens_per_s" in h and h["step"] > 5 and (h["step"] - 5) not in eval_steps]
    return {"summary": summary, "wall_s": wall, "exports": {int(k): v for k, v in exports.items()},
            "perplexity": evals, "head_initialised": meta["head_initialised"],
            "tokens_per_s_median": statistics.median(h["tokens_per_s"] for h in windows) if windows else None,
            "tokens_per_s_overall": summary["final_metrics"].get("tokens_per_s"),
            "eval_report": meta["data_report"]["eval"], "stream": meta["data_report"]["train"]["stream"]}


def finetune_phase(args, out: Path, name: str, base: str) -> dict:
    from bertray import config as C, finetune

    cfg = C.load(C.FinetuneConfig, data={
        "model": {"base": base, "max_length": 64},
        "data": {"train": str(SST2 / "train.parquet"), "validation": str(SST2 / "validation.parquet"),
                 "max_train_rows": args.ft_rows},
        "optim": {"lr": args.ft_lr, "warmup_ratio": 0.06},
        "train": {"batch_size": 32, "epochs": float(args.ft_epochs), "seed": args.seed, "log_every": 20},
        "run": {"name": f"ft-{name}", "storage": str(out / "runs"), "num_workers": args.workers,
                "cpus_per_worker": args.cpus_per_worker, "keep_checkpoints": 1},
    })
    t0 = time.perf_counter()
    s = finetune.run(cfg)
    history = json.loads((Path(s["model"]) / "bertray.json").read_text())["history"]
    per_epoch = [round(h["accuracy"], 4) for h in history if "accuracy" in h]
    return {"best_accuracy": s["metrics"]["accuracy"], "best_step": s["best_step"], "accuracy_per_eval": per_epoch,
            "final_accuracy": per_epoch[-1] if per_epoch else None, "wall_s": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100, help="N: checkpoints at N and 2N optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="packed sequences per worker per step")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4, help="pretraining peak learning rate")
    p.add_argument("--eval-rows", type=int, default=512)
    p.add_argument("--ft-rows", type=int, default=2000, help="labeled SST-2 train rows for every fine-tune")
    p.add_argument("--ft-epochs", type=int, default=2)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    # 2 workers x 1 thread (see bench/configs/sst2-full.yaml: on 2 shared cores a 2-thread worker stalls at every
    # OpenMP barrier); half a CPU each leaves one Ray CPU for Ray Data's reads.
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (BERTRAY_TORCH_THREADS)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="/tmp/bench-runs/pretrain-study")
    p.add_argument("--resume", action="store_true", help="reuse the phases a previous run of this study finished")
    args = p.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["BERTRAY_TORCH_THREADS"] = str(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    if not args.resume:
        subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True, exist_ok=True)

    from bertray import config as C, modeling, runtime

    def phase(name: str, fn):
        """Run `fn` or, with --resume, load what an earlier run of it saved."""
        saved = out / f"phase-{name}.json"
        if args.resume and saved.exists():
            return json.loads(saved.read_text())
        result = fn()
        saved.write_text(json.dumps(result, indent=2, default=str))
        return result

    load_before = os.getloadavg()
    others = others_running()
    # Measured next to the pretraining it is compared with (and reused with it on --resume).
    peak = phase("matmul", lambda: matmul_peak(args.workers * args.threads))
    model, _ = modeling.build_masked_lm(C.ModelConfig())
    params = modeling.count_params(model, non_embedding=True)
    del model
    runtime.init_ray(None)
    t0 = time.perf_counter()
    pre = phase("pretrain", lambda: pretrain_phase(args, out))
    pre["perplexity"] = {int(k): v for k, v in pre["perplexity"].items()}
    pre["exports"] = {int(k): v for k, v in pre["exports"].items()}
    fts = {"base (step 0)": phase("ft-base", lambda: finetune_phase(args, out, "base", "embedded"))}
    for step, uri in pre["exports"].items():
        fts[f"pretrained step {step}"] = phase(f"ft-step{step}", lambda uri=uri, step=step: finetune_phase(
            args, out, f"step{step}", uri))
    total = time.perf_counter() - t0
    load_after = os.getloadavg()

    tps = pre["tokens_per_s_median"] or 0.0
    util = tps * 6 * params / peak
    n, lines = args.steps, []
    lines += ["### Further pretraining on SST-2 sentences (embedded MiniLM, CPU)", "",
              f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
              f"Machine: {machine()['cpu']}, {machine()['cores']} cores, torch {machine()['torch']}; "
              f"{args.workers} Ray Train worker(s) x {args.threads} torch thread(s)  ",
              f"Load average (1/5/15 min) before {tuple(round(x, 1) for x in load_before)}, after "
              f"{tuple(round(x, 1) for x in load_after)}; busiest other processes at the start: "
              + "; ".join(f"`{o}`" for o in others[:4]), "",
              f"Pretraining: {2 * n} steps x {args.workers} workers x {args.batch} packed sequences of {args.max_length} "
              f"tokens, lr {args.lr:g} (warmup 6%, linear decay), 15% masking; masked-LM head "
              f"{'newly initialised (MiniLM ships none)' if pre['head_initialised'] else 'from the base'}. Held-out: "
              f"first {pre['eval_report']['rows_used']} SST-2 train sentences ({pre['eval_report']['masked_tokens']} "
              f"masked tokens, fixed masks), skipped by pretraining ({pre['stream']['held_out']} copies). "
              f"Fine-tuning: {args.ft_rows} seeded SST-2 train rows, {args.ft_epochs} epochs, batch 32 per worker, "
              f"lr {args.ft_lr:g}, seed {args.seed}; accuracy on the 872 SST-2 validation sentences after each epoch.", "",
              "| further pretraining steps | held-out MLM perplexity | fine-tuned val. accuracy (per epoch) | best |",
              "|---|---|---|---|"]
    for (label, ft), step in zip(fts.items(), (0, n, 2 * n)):
        lines.append(f"| {step} | {pre['perplexity'][step]:.1f} | {' / '.join(f'{a:.4f}' for a in ft['accuracy_per_eval'])} "
                     f"| {ft['best_accuracy']:.4f} |")
    curve = ", ".join(f"{s}: {v:.1f}" for s, v in sorted(pre["perplexity"].items()))
    lines += ["", f"Perplexity curve (step: perplexity): {curve}", "",
              f"Pretraining throughput: {tps:,.0f} real tokens/s (median of progress windows without an evaluation; "
              f"{pre['tokens_per_s_overall']:,.0f} over the whole run including evaluations, checkpoints and Ray Data "
              f"start-up), i.e. {tps * 6 * params / 1e9:.1f} GFLOP/s at 6 x {params / 1e6:.1f}M non-embedding parameters "
              f"per token = {util:.1%} of the measured fp32 matmul rate ({peak / 1e9:.1f} GFLOP/s, 2048x2048, "
              f"{args.workers * args.threads} threads).",
              f"Wall time: pretraining {pre['wall_s']:.0f} s, fine-tunes "
              + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in fts.items())
              + f"; this invocation {total:.0f} s" + (" (--resume: finished phases reused)" if args.resume else "") + "."]
    md = "\n".join(lines)
    print(md)
    (out / "study.md").write_text(md + "\n")
    (out / "study.json").write_text(json.dumps({"args": vars(args), "machine": machine(), "matmul_flops": peak,
                                                "non_embedding_params": params, "pretrain": pre, "finetune": fts,
                                                "load_before": load_before, "load_after": load_after, "others": others},
                                               indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

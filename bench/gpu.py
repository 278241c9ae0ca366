"""Issue 28 on one GPU: labeling, pretraining and fine-tuning throughput of a BERT-base-sized model, one table.

    bash bench/gpu.sh                  # on the GPU machine, after bench/gpu_prepare.sh here; under 8 minutes
    .venv/bin/python bench/gpu.py --smoke   # the same plumbing on this CPU: tiny model, tiny sizes, ~2 minutes

The model is a randomly initialised BertForSequenceClassification of BERT-base size (12 layers, width 768; speed
does not depend on the weights) with the embedded MiniLM's tokenizer, max_length 512. Texts are built here from
the bundled SST-2 demo sentences (jobs/data/sst2-demo): "short" is the sentences (reshuffled on every repeat),
"long" is documents of 200-500 tokens joined from consecutive ones. Rows, all in one run on one machine:

  bf16 peak          best of 10 timed 8192^3 bf16 torch.matmul (smoke: fp32 2048^3 on all cores)
  label              label.run on a warm local Ray, one GPU actor: wall time of the call (planning, actor start,
                     model load, reading, tokenizing, inference, writing). Without Ray (or --no-ray): bertray's
                     Predictor fed by a tokenizer process pool, marked "no Ray"
  pipeline           transformers.pipeline("text-classification"), fp32, batch 32, on the first texts of each
                     corpus (a per-text rate that does not depend on how many texts follow)
  model alone        the same model under bf16 autocast on pre-tokenized texts, cut into the Predictor's
                     length-sorted token-budgeted passes, all on the GPU before timing: labeling's GPU-side ceiling
  predict_ids        bertray's Predictor on the same pre-tokenized texts (pinned copies, pass planning; no Ray)
  tokenizer ceiling  the fast tokenizer batch-encoding the texts in one process per core (bench/feed.py)
  pretrain           bench/pretrain_throughput.py: pretrain.run through Ray Train, packed 128-token sequences
  MLM step alone     bertray's masked-LM batches, head, loss and AdamW on batches already on the GPU: pretraining's
                     GPU-side ceiling (no data pipeline, no Ray)
  finetune           finetune.run through Ray Train on the long documents

Ratios: "x pipeline" divides by pipeline on the same corpus; "x ceiling" divides label tokens/s by the lesser of
model alone and tokenizer ceiling on that corpus; "% of peak" is FLOPs over the peak, with 2 x non-embedding
parameters per token for inference and 6 x for training (attention's own FLOPs left out). Training rates are the
median progress window after warm-up, real tokens only. Targets (H100-class): label >= 3x pipeline and >= 0.8x
ceiling; pretraining >= 35% of bf16 peak.

Each part runs in its own process under its own time cap and a deadline for the whole run (--budget); a part that
fails or runs out of time leaves a row saying so, and the others still report. `--part` is internal.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import gpu_matmul_peak, machine, matmul_peak

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "data" / "sst2-demo"
LABELS = ["negative", "positive"]
MAX_LENGTH = 512  # the classifier's: long documents run whole
PRETRAIN_LENGTH = 128  # pretrain_throughput's packed sequence length
CORPORA = ("short", "long")
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}  # --smoke
CHUNK_ROWS = 2048  # texts per tokenize task of the no-Ray labeler: a label unit's chunk


@dataclasses.dataclass
class Sizes:
    short: int = 60_000  # sentences labeled
    long: int = 4_000  # documents labeled
    pipeline_short: int = 20_000  # of them, timed through pipeline
    pipeline_long: int = 1_500
    pretrain_steps: int = 120  # pretrain_throughput skips the first 30 on a GPU
    pretrain_batch: int = 256  # packed sequences per step: BERT's own phase-1 batch
    step_repeats: int = 30  # timed steps of the MLM step alone
    finetune_steps: int = 100
    finetune_batch: int = 32
    finetune_log_every: int = 10
    budget_s: float = 440.0  # the whole run; gpu.sh adds package installation and a margin


SMOKE = Sizes(short=600, long=40, pipeline_short=300, pipeline_long=20, pretrain_steps=16, pretrain_batch=2,
              step_repeats=3, finetune_steps=12, finetune_batch=8, finetune_log_every=2, budget_s=900.0)
# Seconds each part may take at most (it also stops at the run's deadline), and the least worth starting with.
# The smoke run multiplies the caps: on a shared 2-core machine starting Ray alone can take a minute.
CAPS = {"setup": 90, "model": 60, "tokenizer": 60, "pipeline": 90, "label": 150, "pretrain": 150, "mlm_step": 60,
        "finetune": 120}
MIN_START_S = 20
SMOKE_CAP_FACTOR = 3


# --------------------------------------------------------------------------------------------------- inputs


def demo_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` SST-2 demo sentences: all of them, reshuffled on every repeat."""
    import numpy as np
    import pyarrow.parquet as pq

    pool = [t for f in ("train", "validation", "corpus")
            for t in pq.read_table(DEMO / f"{f}.parquet", columns=["text"]).column("text").to_pylist()]
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        out += [pool[i] for i in rng.permutation(len(pool))]
    return out[:n]


def classifier(folder: Path, tokenizer, smoke: bool) -> str:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from bertray import checkpoint

    cfg = BertConfig(vocab_size=tokenizer.vocab_size, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                     label2id={n: i for i, n in enumerate(LABELS)}, **(TINY if smoke else {}))  # defaults: BERT-base
    torch.manual_seed(0)
    checkpoint.save(folder, BertForSequenceClassification(cfg).eval(), tokenizer, {
        "kind": "classifier", "label_names": LABELS,
        "config": {"model": {"max_length": MAX_LENGTH, "truncation": "head"}}})
    return str(folder)


def save_ids(path: Path, ids: list[list[int]]) -> None:
    import numpy as np

    np.savez(path, flat=np.concatenate([np.asarray(x, np.int32) for x in ids]),
             offsets=np.cumsum([0] + [len(x) for x in ids]))


def load_ids(path: Path) -> list[list[int]]:
    import numpy as np

    z = np.load(path)
    flat, off = z["flat"].tolist(), z["offsets"].tolist()
    return [flat[a:b] for a, b in zip(off, off[1:])]


# --------------------------------------------------------------------------------------------------- parts


def part_setup(args, sizes: Sizes, work: Path) -> dict:
    """Peak first, on an idle device; then the model, the corpora as texts, Parquet and token ids, the training data."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from bertray import modeling
    from bertray.predictor import Predictor
    from label_throughput import long_docs, rows_per_unit, write_corpus

    peak = matmul_peak(os.cpu_count() or 1) if args.smoke else gpu_matmul_peak(torch.bfloat16)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # this process alone: building the corpora uses every core
    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    model_dir = classifier(work / "model", tok, args.smoke)
    pool = demo_sentences(max(sizes.short, sizes.long * 60))  # long_docs reads up to 60 sentences a document
    texts = {"short": pool[: sizes.short], "long": long_docs(pool, tok, sizes.long)}
    pred = Predictor(model_dir)
    corpora = {}
    for name, t in texts.items():
        ids, _ = pred.encode(t)
        save_ids(work / f"ids-{name}.npz", ids)
        write_corpus(work / f"corpus-{name}", t)
        corpora[name] = {"docs": len(t), "tokens": sum(map(len, ids)), "rows_per_unit": rows_per_unit(len(t))}
    (work / "texts.json").write_text(json.dumps(texts))
    write_corpus(work / "corpus-warm", texts["short"][:16])
    # pretrain_throughput reads $BERTRAY_SHARED_DATA/sst2/train.parquet: both corpora, packed into sequences there.
    (work / "shared" / "sst2").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts["short"] + texts["long"]}), work / "shared" / "sst2" / "train.parquet")
    labels = [i % len(LABELS) for i in range(len(texts["long"]))]
    (work / "finetune").mkdir()
    pq.write_table(pa.table({"text": texts["long"], "label": labels}), work / "finetune" / "train.parquet")
    pq.write_table(pa.table({"text": texts["long"][:64], "label": labels[:64]}), work / "finetune" / "validation.parquet")
    return {"peak_flops": peak, "peak_name": "fp32 (CPU smoke)" if args.smoke else "bf16", "model_dir": model_dir,
            "non_embedding_params": modeling.count_params(pred.model, non_embedding=True), "corpora": corpora,
            "machine": machine(), "versions": _versions()}


def part_model(args, sizes: Sizes, work: Path) -> dict:
    from bertray.predictor import Predictor

    pred = Predictor(_setup(work)["model_dir"], device=_device(args))
    out = {}
    for name in CORPORA:
        ids = load_ids(work / f"ids-{name}.npz")
        out[f"model alone {name}"] = {"seconds": model_alone(pred, ids)}
        pred.predict_ids(ids[:512])  # warm-up
        t = time.perf_counter()
        pred.predict_ids(ids)
        out[f"predict_ids {name}"] = {"seconds": time.perf_counter() - t}
        _save_partial(work, "model", out)
    return out


def model_alone(pred, ids: list[list[int]]) -> float:
    """Seconds for the forward passes alone: the Predictor's passes, padded and on the device beforehand, argmax
    kept on the device, one synchronisation at the end."""
    import numpy as np
    import torch

    from bertray.predictor import plan_passes

    order = np.argsort([len(x) for x in ids], kind="stable")
    lengths = [len(ids[i]) for i in order]
    batches = []
    for start, end in plan_passes(lengths, pred.max_batch, pred.token_budget, pred.pass_cost):
        x = torch.full((end - start, lengths[end - 1]), pred.pad_id, dtype=torch.long)
        for j, i in enumerate(order[start:end]):
            x[j, : len(ids[i])] = torch.as_tensor(ids[i])
        batches.append((x.to(pred.device), (x != pred.pad_id).long().to(pred.device)))

    def sweep() -> None:
        with torch.inference_mode(), torch.autocast(pred.device.type, dtype=pred.amp_dtype,
                                                    enabled=pred.amp_dtype is not None):
            for x, mask in batches:
                pred.model(input_ids=x, attention_mask=mask).logits.argmax(-1)
        if pred.device.type == "cuda":
            torch.cuda.synchronize()

    sweep()  # warm-up: every pass shape once
    t = time.perf_counter()
    sweep()
    return time.perf_counter() - t


def part_tokenizer(args, sizes: Sizes, work: Path) -> dict:
    from feed import ceiling

    texts, model_dir = json.loads((work / "texts.json").read_text()), _setup(work)["model_dir"]
    cores = len(os.sched_getaffinity(0))
    out = {}
    for name in CORPORA:
        c = ceiling(model_dir, texts[name], cores)
        out[f"tokenizer ceiling {name}"] = {"seconds": c["seconds"], "tokens": c["tokens"], "processes": cores}
        _save_partial(work, "tokenizer", out)
    return out


def part_pipeline(args, sizes: Sizes, work: Path) -> dict:
    from label_throughput import time_pipeline

    texts, model_dir = json.loads((work / "texts.json").read_text()), _setup(work)["model_dir"]
    out = {}
    for name, n in (("short", sizes.pipeline_short), ("long", sizes.pipeline_long)):
        n = min(n, len(texts[name]))
        tokens = sum(map(len, load_ids(work / f"ids-{name}.npz")[:n]))
        out[f"pipeline {name}"] = {"seconds": time_pipeline(model_dir, texts[name][:n], _device(args)), "docs": n,
                                   "tokens": tokens}
        _save_partial(work, "pipeline", out)
    return out


def part_label(args, sizes: Sizes, work: Path) -> dict:
    setup = _setup(work)
    if args.no_ray or not _has_ray():
        return label_without_ray(args, work, setup)
    from bertray import runtime
    from label_throughput import time_label_run

    gpus = 0.0 if args.smoke else 1.0
    runtime.init_ray(None)
    # Warm the cluster (worker processes, imports) on a 16-text corpus; its wall time is the fixed cost per job.
    # Not in the smoke run, where it is most of the time on a busy CPU.
    fixed = None if args.smoke else time_label_run(setup["model_dir"], work / "corpus-warm", work / "out-warm",
                                                   "none", 16, gpus)[0]
    out = {}
    for name in CORPORA:
        c = setup["corpora"][name]
        wall, summary = time_label_run(setup["model_dir"], work / f"corpus-{name}", work / f"out-{name}", "none",
                                       c["rows_per_unit"], gpus)
        assert summary.get("rows_written", c["docs"]) == c["docs"], summary
        out[f"label {name}"] = {"seconds": wall, "path": "Ray", "fixed_s_16_texts": fixed,
                                "label_phase_tokens_per_s": summary.get("tokens_per_s"),
                                "actors": summary.get("actors")}
        _save_partial(work, "label", out)
    return out


_encoder = None


def _init_encoder(model_dir: str, max_length: int, truncation: str) -> None:
    global _encoder
    from bertray import modeling

    _encoder = (modeling.load_tokenizer(model_dir), max_length, truncation)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    from bertray import modeling

    return modeling.encode(_encoder[0], texts, _encoder[1], _encoder[2])[0]


def label_without_ray(args, work: Path, setup: dict) -> dict:
    """Labeling without Ray: a process pool tokenizes chunks while this process runs the Predictor on the ids."""
    import multiprocessing as mp

    from bertray.predictor import Predictor

    texts = json.loads((work / "texts.json").read_text())
    pred = Predictor(setup["model_dir"], device=_device(args))
    workers = max(1, len(os.sched_getaffinity(0)) - 1)  # one core drives the model
    out = {}
    with mp.get_context("spawn").Pool(workers, initializer=_init_encoder,
                                      initargs=(setup["model_dir"], pred.max_length, pred.truncation)) as pool:
        pred.predict_ids(pool.map(_encode_chunk, [texts["short"][:64]] * workers)[0])  # start and warm everything
        for name in CORPORA:
            chunks = [texts[name][i:i + CHUNK_ROWS] for i in range(0, len(texts[name]), CHUNK_ROWS)]
            t = time.perf_counter()
            for ids in pool.imap(_encode_chunk, chunks):
                pred.predict_ids(ids)
            out[f"label {name}"] = {"seconds": time.perf_counter() - t, "path": "no Ray", "tokenize_processes": workers}
            _save_partial(work, "label", out)
    return out


def part_pretrain(args, sizes: Sizes, work: Path) -> dict:
    if args.no_ray or not _has_ray():
        return {"pretrain": {"skipped": "Ray not importable" if not args.no_ray else "--no-ray"}}
    os.environ["BERTRAY_SHARED_DATA"] = str(work / "shared")  # read when pretrain_throughput is imported
    import pretrain_throughput

    folder = work / "pretrain"
    pretrain_throughput.main(["--device", "cpu" if args.smoke else "cuda", "--steps", str(sizes.pretrain_steps),
                              "--batch", str(sizes.pretrain_batch), "--max-length", str(PRETRAIN_LENGTH),
                              "--out", str(folder)])
    r = json.loads((folder / "result.json").read_text())
    return {"pretrain": {"tokens_per_s": r["tokens_per_s_median"], "non_embedding_params": r["non_embedding_params"],
                         "model": r["model"], "own_peak_utilisation": r["utilisation"], "path": "Ray Train"}}


def part_mlm_step(args, sizes: Sizes, work: Path) -> dict:
    import numpy as np
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from bertray import modeling, pretrain, train_loop
    from bertray.config import MLMConfig, OptimConfig

    device = torch.device(_device(args))
    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, **(TINY if args.smoke else {}))).to(device).train()
    vocab, rng = pretrain.Vocab(tok), np.random.default_rng(0)
    # Random tokens in full packed sequences, masked as pretraining masks them; speed does not depend on the text.
    body = [rng.choice(vocab.random_ids, (sizes.pretrain_batch, PRETRAIN_LENGTH - 2)) for _ in range(4)]
    batches = [{k: v.to(device) for k, v in pretrain.make_batch(
        [[vocab.cls_id, *row.tolist(), vocab.sep_id] for row in b], vocab, MLMConfig(), rng).items()} for b in body]
    gather = pretrain.attach_gather(model)
    optimizer = train_loop._setup_optimizer(model, OptimConfig(), device)
    amp = modeling.amp_dtype("bf16", device)

    def step(batch: dict) -> None:
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits, labels = pretrain.masked_logits(model, batch, gather)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OptimConfig().max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(n: int) -> float:
        t = time.perf_counter()
        for i in range(n):
            step(batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(3)  # warm-up: allocator, kernels, optimizer state
    seconds = timed(sizes.step_repeats)
    tokens = sizes.step_repeats * sizes.pretrain_batch * PRETRAIN_LENGTH
    return {"MLM step alone": {"tokens_per_s": tokens / seconds, "path": "no Ray",
                               "non_embedding_params": modeling.count_params(model, non_embedding=True)}}


def part_finetune(args, sizes: Sizes, work: Path) -> dict:
    if args.no_ray or not _has_ray():
        return {"finetune": {"skipped": "Ray not importable" if not args.no_ray else "--no-ray"}}
    from bertray import checkpoint, config as C, finetune, runtime

    setup = _setup(work)
    if args.smoke:
        os.environ["BERTRAY_TORCH_THREADS"] = str(os.cpu_count() or 1)  # one worker with every core
    steps = sizes.finetune_steps
    cfg = C.load(C.FinetuneConfig, data={
        "model": {"base": setup["model_dir"], "max_length": MAX_LENGTH},
        "data": {"train": str(work / "finetune" / "train.parquet"),
                 "validation": str(work / "finetune" / "validation.parquet"), "labels": LABELS},
        "train": {"batch_size": sizes.finetune_batch, "max_steps": steps, "eval_every": steps,
                  "log_every": sizes.finetune_log_every, "mixed_precision": "no" if args.smoke else "bf16"},
        "run": {"name": "gpu-bench-finetune", "storage": str(work / "runs"), "num_workers": 1,
                "use_gpu": not args.smoke, "cpus_per_worker": 1 if args.smoke else 4, "keep_checkpoints": 1,
                "overwrite": True},
    })
    runtime.init_ray(None)
    summary = finetune.run(cfg)
    history = checkpoint.read_meta(summary["model"])["history"]
    # As pretrain_throughput: leave out the first windows (warm-up) and the last (it holds the final evaluation).
    warm = 2 * sizes.finetune_log_every
    windows = [h["tokens_per_s"] for h in history if "tokens_per_s" in h and warm < h["step"] < steps]
    return {"finetune": {"tokens_per_s": statistics.median(windows), "windows": len(windows), "path": "Ray Train",
                         "non_embedding_params": setup["non_embedding_params"]}}


PARTS = {"setup": part_setup, "model": part_model, "tokenizer": part_tokenizer, "pipeline": part_pipeline,
         "label": part_label, "pretrain": part_pretrain, "mlm_step": part_mlm_step, "finetune": part_finetune}


def _setup(work: Path) -> dict:
    return json.loads((work / "part-setup.json").read_text())


def _device(args) -> str:
    return "cpu" if args.smoke else "cuda"


def _has_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def _save_partial(work: Path, part: str, result: dict) -> None:
    """What a part measured so far: a part stopped at its cap still reports its finished rows."""
    (work / f"part-{part}.json").write_text(json.dumps(result, indent=2, default=str))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "tokenizers", "ray"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# --------------------------------------------------------------------------------------------------- driver


def run_parts(args, work: Path, deadline: float) -> dict:
    """Each part in its own process (own CUDA context, own Ray), under min(its cap, time left); killed with its
    whole process group (Ray's raylet and workers too) when over."""
    status = {}
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    for name in PARTS:
        left = deadline - time.monotonic()
        if name != "setup" and not status["setup"].startswith("ok"):
            status[name] = "not run: setup failed"
            continue
        if left < MIN_START_S:
            status[name] = f"not run: {left:.0f} s left of the run's budget"
            continue
        cap = min(CAPS[name] * (SMOKE_CAP_FACTOR if args.smoke else 1), left)
        cmd = [sys.executable, __file__, "--part", name, "--work", str(work)] + (["--smoke"] if args.smoke else []) + (
            ["--no-ray"] if args.no_ray else [])
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        if name == "tokenizer":
            env["OMP_NUM_THREADS"] = "1"  # one thread per pool process: the pool is the parallelism
        t = time.monotonic()
        print(f"[gpu.py] {name} (cap {cap:.0f} s) ...", file=sys.stderr, flush=True)
        with open(logs / f"{name}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
            try:
                rc = proc.wait(timeout=cap)
                status[name] = "ok" if rc == 0 else f"failed (exit {rc}): {_last_line(logs / f'{name}.log')}"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status[name] = f"stopped at its {cap:.0f} s cap"
        status[name] += f" in {time.monotonic() - t:.0f} s"
        print(f"[gpu.py] {name}: {status[name]}", file=sys.stderr, flush=True)
    return status


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, tiny sizes: checks the plumbing")
    p.add_argument("--no-ray", action="store_true", help="label without Ray; skip the Ray Train rows")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default: 440, smoke 900)")
    p.add_argument("--work", help="scratch folder, kept (default: a temporary one, deleted)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="write gpu.md, gpu.json, gpu-logs.txt here ($OUT)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    for f in dataclasses.fields(Sizes):
        if f.name != "budget_s":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=int, help=f"default {f.default} (smoke "
                           f"{getattr(SMOKE, f.name)})")
    args = p.parse_args(argv)
    sizes = dataclasses.replace(SMOKE if args.smoke else Sizes(), **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)
        if f.name != "budget_s" and getattr(args, f.name) is not None})
    if args.part:
        work = Path(args.work)
        result = PARTS[args.part](args, sizes, work)
        _save_partial(work, args.part, result)
        return 0
    from gpu_report import report  # the table is its own module: this one measures

    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device; use --smoke for the CPU check")
    deadline = time.monotonic() + (args.budget or sizes.budget_s)
    with tempfile.TemporaryDirectory(prefix="bertray-gpu-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        status = run_parts(args, work, deadline)
        results = {name: json.loads(f.read_text()) for name in PARTS
                   if (f := work / f"part-{name}.json").exists()}
        logs = "\n".join(f"===== {name} ({status[name]})\n{(work / 'logs' / f'{name}.log').read_text(errors='replace')[-20000:]}"
                         for name in PARTS if (work / "logs" / f"{name}.log").exists())
    run = {"smoke": args.smoke, "no_ray": args.no_ray, "sizes": dataclasses.asdict(sizes), "status": status,
           "results": results, "command": "bench/gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    table = report(run)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.md").write_text(table + "\n")
        (out / "gpu.json").write_text(json.dumps(run, indent=2, default=str))
        (out / "gpu-logs.txt").write_text(logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

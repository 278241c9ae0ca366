"""The one Markdown table of bench/gpu.py: rates, ratios to their baselines, share of the matmul peak, targets."""
from __future__ import annotations

TARGET_X_PIPELINE = 3.0  # label tokens/s over pipeline's, same corpus, same GPU
TARGET_X_CEILING = 0.8  # label tokens/s over the lesser of model alone and tokenizer ceiling
TARGET_PRETRAIN_PEAK = 0.35  # pretraining FLOPs over the bf16 matmul peak

# (row, part that measures it, FLOPs per token per parameter: 2 forward only, 6 forward and backward)
ROWS = [(f"{kind} {corpus}", part, 2) for corpus in ("short", "long") for kind, part in (
    ("label", "label"), ("pipeline", "pipeline"), ("model alone", "model"), ("predict_ids", "model"),
    ("tokenizer ceiling", "tokenizer"))] + [("pretrain", "pretrain", 6), ("MLM step alone", "mlm_step", 6),
                                            ("finetune", "finetune", 6)]


def report(run: dict) -> str:
    res, status, sizes = run["results"], run["status"], run["sizes"]
    setup = res.get("setup", {})
    peak, peak_name = setup.get("peak_flops"), setup.get("peak_name", "bf16")
    rows = {name: m for part, r in res.items() if part != "setup" for name, m in r.items()}
    corpora = setup.get("corpora", {})
    rates = {name: _rate(name, m, corpora) for name, m in rows.items()}
    m = setup.get("machine", {})
    # The smoke run is on CPU, where nothing runs under autocast.
    path = (lambda *a: _path(*a).replace("bf16 autocast", "fp32").replace(", bf16", ", fp32")) if run["smoke"] else _path
    lines = [f"`{run['command'].strip()}`" + (" (CPU smoke: tiny model, tiny sizes; figures mean nothing)"
                                                 if run["smoke"] else ""), "",
             f"Model: random BertForSequenceClassification, {_mega(setup.get('non_embedding_params'))} non-embedding "
             f"parameters{' (tiny)' if run['smoke'] else ' (BERT-base)'}, max_length 512. Corpora: "
             + "; ".join(f"{c} {v['docs']:,} texts, {v['tokens']:,} tokens" for c, v in corpora.items())
             + f". Versions: {setup.get('versions')}.", "",
             "| measurement | path | docs/s | tokens/s | x pipeline | x ceiling | % of peak | target | met | notes |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---|",
             f"| device | | | | | | | | | {m.get('gpu') or m.get('cpu', '?')}, {m.get('cores', '?')} cores |",
             f"| {peak_name} matmul peak | | | | | | | | | "
             f"{_flops(peak)}, best of 10, this run |"]
    for name, part, per_param in ROWS:
        corpus = name.rsplit(" ", 1)[-1]
        meas, rate = rows.get(name, {}), rates.get(name)
        if rate is None:
            why = meas.get("skipped") or status.get(part, "not run")
            lines.append(f"| {name} | {path(name, meas, sizes)} | | | | | | {_target(name)} | | {why} |")
            continue
        docs_s, tokens_s = rate
        base = rates.get(f"pipeline {corpus}")
        x_pipe = tokens_s / base[1] if base else None
        ceilings = [rates[c][1] for c in (f"model alone {corpus}", f"tokenizer ceiling {corpus}") if c in rates]
        x_ceiling = tokens_s / min(ceilings) if name.startswith("label") and len(ceilings) == 2 else None
        params = meas.get("non_embedding_params") or setup.get("non_embedding_params")
        share = per_param * params * tokens_s / peak if peak and params else None
        lines.append(f"| {name} | {path(name, meas, sizes)} | {_num(docs_s)} | {_num(tokens_s)} | {_x(x_pipe)} | "
                     f"{_x(x_ceiling)} | {_pct(share)} | {_target(name)} | {_met(name, x_pipe, x_ceiling, share)} | "
                     f"{_notes(name, meas, status.get(part, ''))} |")
    return "\n".join(lines)


def _rate(name: str, m: dict, corpora: dict) -> tuple[float | None, float] | None:
    """(docs/s, tokens/s) of a row, or None if it has no measurement."""
    if "tokens_per_s" in m:
        return None, m["tokens_per_s"]
    if "seconds" not in m:
        return None
    c = corpora.get(name.rsplit(" ", 1)[-1], {})
    docs, tokens = m.get("docs", c.get("docs")), m.get("tokens", c.get("tokens"))
    return docs / m["seconds"], tokens / m["seconds"]


def _path(name: str, m: dict, sizes: dict) -> str:
    """How the row ran, and whether through Ray."""
    if name.startswith("label"):
        if m.get("path") == "no Ray":
            return f"**no Ray**: Predictor fed by a pool of {m.get('tokenize_processes', '?')} tokenizer process(es)"
        return f"**Ray Data**: label.run, warm local Ray, {m.get('actors', '?')} actor(s)"
    return {
        "pipeline": f"no Ray: transformers.pipeline, fp32, batch 32, first {m.get('docs', '?'):,} texts"
        if m.get("docs") else "no Ray: transformers.pipeline, fp32, batch 32",
        "model alone": "no Ray: forward passes only, bf16 autocast, pre-tokenized, on device",
        "predict_ids": "no Ray: Predictor.predict_ids on pre-tokenized texts",
        "tokenizer ceiling": f"no Ray: fast tokenizer, {m.get('processes', 'all')} processes",
        "pretrain": f"**Ray Train**: pretrain.run, {sizes['pretrain_batch']} x 128 packed, bf16 autocast",
        "MLM step alone": f"no Ray: bertray's MLM step, {sizes['pretrain_batch']} x 128, batches on device",
        "finetune": f"**Ray Train**: finetune.run, long texts, batch {sizes['finetune_batch']}, <= 512 tokens, bf16",
    }[name.rsplit(" ", 1)[0] if name.endswith(("short", "long")) else name]


def _target(name: str) -> str:
    if name.startswith("label"):
        return f">= {TARGET_X_PIPELINE:g}x pipeline, >= {TARGET_X_CEILING:g}x ceiling"
    return f">= {TARGET_PRETRAIN_PEAK:.0%} of peak" if name == "pretrain" else ""


def _met(name: str, x_pipe: float | None, x_ceiling: float | None, share: float | None) -> str:
    if name.startswith("label"):
        if x_pipe is None or x_ceiling is None:
            return "?"
        ok = x_pipe >= TARGET_X_PIPELINE and x_ceiling >= TARGET_X_CEILING
        return "yes" if ok else "**no**"
    if name == "pretrain":
        return "?" if share is None else "yes" if share >= TARGET_PRETRAIN_PEAK else "**no**"
    return ""


def _notes(name: str, m: dict, status: str) -> str:
    notes = []
    if m.get("fixed_s_16_texts"):
        notes.append(f"a 16-text job takes {m['fixed_s_16_texts']:.1f} s")
    if m.get("label_phase_tokens_per_s"):
        notes.append(f"label phase {m['label_phase_tokens_per_s']:,.0f} tokens/s")
    if "model" in m:
        notes.append(str(m["model"]))
    if "windows" in m:
        notes.append(f"median of {m['windows']} windows")
    if not status.startswith("ok"):
        notes.append(f"part {status}")
    return "; ".join(notes)


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def _x(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def _mega(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def _flops(x: float | None) -> str:
    return "?" if x is None else f"{x / 1e12:,.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:,.1f} GFLOP/s"

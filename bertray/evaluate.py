"""`bertray evaluate MODEL DATA`: accuracy, macro-F1, per-class precision/recall/F1 and a confusion matrix,
written as metrics.json and confusion_matrix.png. Runs in-process through the shared Predictor."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bertray import data as D
from bertray import metrics as M
from bertray import storage
from bertray.config import DataConfig
from bertray.predictor import Predictor


def evaluate(model: str, data_uri: str, out: str, text_columns: list[str] | None = None, label_column: str = "label",
             quantize: str | None = None, max_rows: int | None = None) -> dict:
    predictor = Predictor(model, quantize=quantize)
    dcfg = DataConfig(train=data_uri, text_columns=text_columns or ["text"], label_column=label_column)
    labeled = D.load_labeled(data_uri, dcfg, label_names=predictor.label_names)
    labeled = D.sample(labeled, max_rows, seed=0)
    start = time.perf_counter()
    pred = predictor.predict(labeled.texts)
    seconds = time.perf_counter() - start
    cm = M.confusion(labeled.labels, pred.probs.argmax(-1), len(predictor.label_names))
    result = M.from_confusion(cm, predictor.label_names)
    result.update({
        "model": model,
        "data": data_uri,
        "quantize": quantize or "none",
        "data_report": labeled.report,
        "truncated": pred.truncated,
        "seconds": seconds,
        "rows_per_s": len(labeled.texts) / seconds if seconds else 0.0,
    })
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(result, indent=2))
    png = M.plot_confusion(result["confusion_matrix"], predictor.label_names,
                           Path(storage.local_dir(out) if not storage.is_remote(out) else "/tmp") / "confusion_matrix.png",
                           title=f"{os.path.basename(model.rstrip('/'))} on {os.path.basename(data_uri.rstrip('/'))}")
    if storage.is_remote(out):
        storage.write_bytes(storage.join(out, "confusion_matrix.png"), png.read_bytes())
    result["summary"] = {k: result[k] for k in ("accuracy", "macro_f1", "n", "rows_per_s", "quantize")}
    result["summary"].update({"dropped": labeled.report.get("dropped", {}), "out": out})
    return result


def run_cli(args) -> dict:
    out = args.out or os.path.join("outputs", "evaluate-" + os.path.basename(args.model.rstrip("/")))
    return evaluate(args.model, args.data, out, args.text_columns, args.label_column, args.quantize, args.max_rows)

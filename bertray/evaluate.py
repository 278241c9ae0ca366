"""`bertray evaluate MODEL DATA`: accuracy, macro-F1, per-class precision/recall/F1 and a confusion matrix,
written as metrics.json and confusion_matrix.png; for a multi-label model micro/macro/sample F1, subset accuracy,
per-label scores at the checkpoint's thresholds (and at one global 0.5) and per_label.png. Runs in-process through
the shared Predictor."""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from bertray import data as D
from bertray import hf_data
from bertray import metrics as M
from bertray import storage
from bertray.config import DataConfig
from bertray.predictor import Predictor


def evaluate(model: str, data_uri: str, out: str, text_columns: list[str] | None = None, label_column: str = "label",
             quantize: str | None = None, max_rows: int | None = None, backend: str = "torch",
             text_pair_column: str | None = None, label_delimiter: str | None = None,
             long_text: str | None = None, max_length: int | None = None) -> dict:
    if not hf_data.is_hf(data_uri):
        D.data_files(data_uri)  # a wrong data path fails in one line before the model loads
    predictor = Predictor(model, quantize=quantize, backend=backend, long_text=long_text, max_length=max_length)
    if predictor.text_pair and not text_pair_column:
        raise D.DataError(f"{model}: the model was trained on sentence pairs; name the second text's column with "
                          "--text-pair-column")
    dcfg = DataConfig(train=data_uri, text_columns=text_columns or ["text"], label_column=label_column,
                      text_pair_column=text_pair_column, label_delimiter=label_delimiter,
                      task="multi_label" if predictor.multi_label else "single_label")
    labeled = D.load_labeled(data_uri, dcfg, label_names=predictor.label_names)
    labeled = D.sample(labeled, max_rows, seed=0)
    start = time.perf_counter()
    pred = predictor.predict(labeled.texts, labeled.pairs)
    seconds = time.perf_counter() - start
    if predictor.multi_label:
        result = M.multilabel_report(labeled.labels, pred.probs, predictor.thresholds, predictor.label_names)
    else:
        cm = M.confusion(labeled.labels, pred.probs.argmax(-1), len(predictor.label_names))
        result = M.from_confusion(cm, predictor.label_names)
    result.update({
        "model": model,
        "data": data_uri,
        "quantize": quantize or "none",
        "backend": backend,
        "data_report": labeled.report,
        "max_length": predictor.max_length,
        "truncated": pred.truncated,
        "long_text": predictor.describe()["long_text"],
        **({"windows": int(pred.windows.sum()), "documents_over_one_window": int((pred.windows > 1).sum())}
           if pred.windows is not None else {}),
        "seconds": seconds,
        "rows_per_s": len(labeled.texts) / seconds if seconds else 0.0,
    })
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(result, indent=2))
    title = f"{os.path.basename(model.rstrip('/'))} on {os.path.basename(data_uri.rstrip('/'))}"
    with tempfile.TemporaryDirectory(prefix="bertray-evaluate-") as tmp:
        if predictor.multi_label:
            png = M.plot_per_label(result["per_class"], Path(tmp) / "per_label.png", title=title)
        else:
            png = M.plot_confusion(result["confusion_matrix"], predictor.label_names, Path(tmp) / "confusion_matrix.png",
                                   title=title)
        storage.write_bytes(storage.join(out, png.name), png.read_bytes())
    result["summary"] = {k: result[k] for k in ("accuracy", "micro_f1", "macro_f1", "n", "rows_per_s", "quantize",
                                               "backend")}
    result["summary"].update({"dropped": labeled.report.get("dropped", {}), "out": out})
    return result


def run_cli(args) -> dict:
    out = args.out or os.path.join("outputs", "evaluate-" + os.path.basename(args.model.rstrip("/")))
    return evaluate(args.model, args.data, out, args.text_columns, args.label_column, args.quantize, args.max_rows,
                    args.backend, args.text_pair_column, args.label_delimiter, args.long_text, args.max_length)

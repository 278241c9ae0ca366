"""Classification metrics from a confusion matrix (so data-parallel workers can sum theirs), and plots."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def mode_of(metric: str) -> str:
    """'min' for loss, 'max' for the scores: how Ray Train's checkpoint ranking and Tune compare a metric."""
    return "min" if metric == "loss" else "max"


def confusion(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """cm[true, predicted] counts."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


def from_confusion(cm: np.ndarray, label_names: list[str]) -> dict:
    """accuracy, macro-F1, per-class precision/recall/F1/support and the matrix itself."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    # A class never predicted (or absent) has precision (or recall) 0, as scikit-learn's zero_division=0.
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "micro_f1": float(tp.sum() / total) if total else 0.0,  # one label per text: micro-F1 is accuracy
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "macro_precision": float(precision.mean()) if len(f1) else 0.0,
        "macro_recall": float(recall.mean()) if len(f1) else 0.0,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "labels": list(label_names),
        "n": int(total),
    }


# Candidate decision thresholds per label, tuned on validation: a grid coarse enough that a few hundred validation
# rows do not overfit it.
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


def tune_thresholds(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per label, the grid threshold with the best F1 on (labels, probs); 0.5 for a label with no positive row,
    where F1 cannot tell thresholds apart. Ties go to the threshold nearest 0.5."""
    y = np.asarray(labels, dtype=bool)
    out = np.full(y.shape[1], 0.5)
    order = np.argsort(np.abs(THRESHOLD_GRID - 0.5), kind="stable")  # the first best wins: nearest 0.5
    grid = THRESHOLD_GRID[order]
    for k in range(y.shape[1]):
        if not y[:, k].any():
            continue
        pred = probs[:, k][None, :] >= grid[:, None]  # (thresholds, rows)
        tp = (pred & y[:, k]).sum(axis=1)
        f1 = 2 * tp / (pred.sum(axis=1) + y[:, k].sum())
        out[k] = grid[int(np.argmax(f1))]
    return out


def multilabel(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, label_names: list[str]) -> dict:
    """Multi-label metrics at the given per-label thresholds: micro/macro/sample F1, subset accuracy ('accuracy'),
    label cardinality (true and predicted), and per-label precision/recall/F1/support/threshold."""
    y = np.asarray(labels, dtype=bool)
    pred = probs >= np.asarray(thresholds)[None, :]
    tp = (pred & y).sum(axis=0).astype(np.float64)
    fp = (pred & ~y).sum(axis=0).astype(np.float64)
    fn = (~pred & y).sum(axis=0).astype(np.float64)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    micro = 2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1)
    # Per row: F1 of its predicted set against its true set; a row with neither counts as right (sklearn's
    # zero_division=1 would too, but it warns).
    row_tp, row_sum = (pred & y).sum(axis=1), pred.sum(axis=1) + y.sum(axis=1)
    samples = np.where(row_sum > 0, np.divide(2 * row_tp, row_sum, out=np.ones(len(y)), where=row_sum > 0), 1.0)
    n = len(y)
    return {
        "accuracy": float((pred == y).all(axis=1).mean()) if n else 0.0,
        "micro_f1": float(micro),
        "macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "samples_f1": float(samples.mean()) if n else 0.0,
        "macro_precision": float(precision.mean()) if len(f1) else 0.0,
        "macro_recall": float(recall.mean()) if len(f1) else 0.0,
        "label_cardinality": float(y.sum() / n) if n else 0.0,
        "predicted_cardinality": float(pred.sum() / n) if n else 0.0,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(y[:, i].sum()), "threshold": float(thresholds[i])}
            for i, name in enumerate(label_names)
        },
        "labels": list(label_names),
        "n": int(n),
    }


def multilabel_report(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, label_names: list[str]) -> dict:
    """multilabel at the given thresholds, with micro- and macro-F1 at one global 0.5 beside them: what tuning the
    thresholds gained (fine-tuning's evaluations and `bertray evaluate` report both)."""
    out = multilabel(labels, probs, thresholds, label_names)
    at_half = multilabel(labels, probs, np.full(len(label_names), 0.5), label_names)
    out["micro_f1_at_0_5"], out["macro_f1_at_0_5"] = at_half["micro_f1"], at_half["macro_f1"]
    return out


def plot_per_label(per_class: dict, path: str | Path, title: str = "Per-label F1") -> Path:
    """A horizontal bar per label: F1, with precision and recall marked (multi-label has no confusion matrix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_class)
    f1 = [per_class[n]["f1"] for n in names]
    fig, ax = plt.subplots(figsize=(7, max(3, 0.3 * len(names) + 1)))
    pos = np.arange(len(names))
    ax.barh(pos, f1, color="tab:blue", label="F1")
    ax.plot([per_class[n]["precision"] for n in names], pos, "|", color="tab:orange", markersize=10, label="precision")
    ax.plot([per_class[n]["recall"] for n in names], pos, "|", color="tab:green", markersize=10, label="recall")
    ax.set_yticks(pos, [f"{n} ({per_class[n]['support']})" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (support in brackets)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_confusion(cm: list[list[int]], label_names: list[str], path: str | Path, title: str = "Confusion matrix") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    size = max(4, 0.6 * len(label_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(label_names)), label_names, rotation=45, ha="right")
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_curves(history: list[dict], path: str | Path, metric: str) -> Path:
    """Training loss per logged step and the eval metric per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax1 = plt.subplots(figsize=(7, 4))
    train = [h for h in history if "train_loss" in h]
    evals = [h for h in history if metric in h]
    ax1.plot([h["step"] for h in train], [h["train_loss"] for h in train], label="train loss", color="tab:blue")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("train loss")
    ax2 = ax1.twinx()
    ax2.plot([h["step"] for h in evals], [h[metric] for h in evals], "o-", label=f"eval {metric}", color="tab:orange")
    ax2.set_ylabel(f"eval {metric}")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def labels_on(probs: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multi-label decisions for rows of probabilities: each row's label ids, most probable first, and whether each
    is at or over its threshold (in that order). The one rule label, serve and predict apply."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    return order, np.take_along_axis(probs >= np.asarray(thresholds, dtype=probs.dtype), order, axis=-1)

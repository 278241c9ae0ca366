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

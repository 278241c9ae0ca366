"""bertray.metrics: single- and multi-label scores agree with scikit-learn's, and thresholds are tuned per label."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from bertray import metrics as M


def _scores(seed: int = 0, n: int = 400, k: int = 6):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < np.linspace(0.05, 0.5, k)).astype(np.int8)
    y[:, -1] = 0  # a label nobody has
    probs = np.clip(0.55 * y + 0.5 * rng.random((n, k)), 0, 1).astype(np.float32)
    return y, probs


@pytest.mark.parametrize("seed", [0, 1])
def test_multilabel_scores_match_scikit_learn(seed):
    y, probs = _scores(seed)
    t = np.array([0.3, 0.4, 0.5, 0.6, 0.7, 0.5])
    m = M.multilabel(y, probs, t, list("abcdef"))
    pred = (probs >= t).astype(int)
    assert m["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))
    assert m["samples_f1"] == pytest.approx(f1_score(y, pred, average="samples", zero_division=1))
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))  # subset accuracy
    per = precision_score(y, pred, average=None, zero_division=0), recall_score(y, pred, average=None, zero_division=0)
    assert [m["per_class"][n]["precision"] for n in "abcdef"] == pytest.approx(per[0].tolist())
    assert [m["per_class"][n]["recall"] for n in "abcdef"] == pytest.approx(per[1].tolist())
    assert m["label_cardinality"] == pytest.approx(y.sum() / len(y))
    assert m["per_class"]["f"]["support"] == 0 and m["per_class"]["c"]["threshold"] == 0.5


def test_tuned_thresholds_maximise_each_labels_f1_and_default_to_half_without_positives():
    y, probs = _scores(2)
    t = M.tune_thresholds(y, probs)
    assert t[-1] == 0.5 and set(t) <= set(M.THRESHOLD_GRID.tolist())
    for k in range(y.shape[1] - 1):
        best = max(f1_score(y[:, k], probs[:, k] >= g, zero_division=0) for g in M.THRESHOLD_GRID)
        assert f1_score(y[:, k], probs[:, k] >= t[k], zero_division=0) == pytest.approx(best)
    tuned = M.multilabel(y, probs, t, list("abcdef"))["macro_f1"]
    assert tuned >= M.multilabel(y, probs, np.full(6, 0.5), list("abcdef"))["macro_f1"]


def test_single_label_micro_f1_is_accuracy():
    cm = np.array([[5, 1], [2, 7]])
    m = M.from_confusion(cm, ["a", "b"])
    assert m["micro_f1"] == m["accuracy"] == pytest.approx(12 / 15)


def test_labels_on_orders_each_rows_labels_by_probability_and_keeps_those_at_their_threshold():
    probs = np.array([[0.2, 0.9, 0.6], [0.1, 0.1, 0.1], [0.5, 0.5, 0.3]], dtype=np.float32)
    order, on = M.labels_on(probs, np.array([0.5, 0.95, 0.3], dtype=np.float32))
    assert [order[i][on[i]].tolist() for i in range(3)] == [[2], [], [0, 2]]  # at a threshold counts; ties keep id order
    one_order, one_on = M.labels_on(probs[2], np.array([0.5, 0.5, 0.5], dtype=np.float32))  # one row, as Predictor
    assert one_order[one_on].tolist() == [0, 1]


def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    p[:5] = 0
    m = M.from_confusion(M.confusion(y, p, 3), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    prec, rec, f1, sup = precision_recall_fscore_support(y, p)
    assert [m["per_class"][k]["recall"] for k in "abc"] == pytest.approx(rec.tolist())
    assert m["confusion_matrix"][0][0] == int(((y == 0) & (p == 0)).sum())

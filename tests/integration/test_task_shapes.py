"""Multi-label and sentence-pair models end to end on a real local Ray cluster: fine-tune (Ray Train) -> evaluate ->
label (Ray Data) -> serve (Ray Serve over HTTP), each stage scoring through the checkpoint's own head and thresholds."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

pytestmark = pytest.mark.timeout(600)

COLOURS = ["red", "blue", "green"]  # the multi-label toy task's labels: which colour words a text holds
FILLER = ["the", "a", "car", "house", "was", "very", "small", "and", "old", "new", "door"]


def _colour_texts(n: int, seed: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        on = [c for c in COLOURS if rng.random() < 0.4]
        words = on + [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(on)
    return texts, labels


def _pair_texts(n: int, seed: int) -> tuple[list[str], list[str], list[int]]:
    """Label 1 when the second sentence says 'yes': learnable only from the second text of the pair."""
    rng = random.Random(seed)
    first, second, labels = [], [], []
    for i in range(n):
        y = i % 2
        first.append(" ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 5))))
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 4))] + ["yes" if y else "no"]
        rng.shuffle(words)
        second.append(" ".join(words))
        labels.append(y)
    return first, second, labels


def _topic_docs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Documents of 15-45 words, a third of them words of their topic: every part of a document says its topic."""
    topics = {"animals": ["dog", "cat", "horse", "bird", "fish"], "vehicles": ["car", "bus", "train", "boat", "truck"]}
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        topic = sorted(topics)[i % 2]
        words = [rng.choice(topics[topic]) if rng.random() < 0.35 else rng.choice(FILLER[:8])
                 for _ in range(rng.randint(15, 45))]
        texts.append(" ".join(words))
        labels.append(topic)
    return texts, labels


def _finetune(tiny_bert: str, root: Path, data: dict, workers: int, metric: str, steps: int | None = 60,
              lr: float = 3e-3, model: dict | None = None, train: dict | None = None) -> dict:
    from bertray import config as C
    from bertray import finetune

    cfg = C.load(C.FinetuneConfig, data={
        "model": {"base": tiny_bert, "max_length": 32, **(model or {})},
        "data": data,
        "optim": {"lr": lr},
        "train": {"batch_size": 32, "max_steps": steps, "eval_every": (steps or 60) // 2, "log_every": 30,
                  "metric": metric, **(train or {})},
        "run": {"name": "shape", "storage": str(root / "runs"), "num_workers": workers, "max_failures": 0},
    })
    return finetune.run(cfg)


@pytest.fixture(scope="module")
def multi_label_model(ray_cluster, tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-label")
    for split, (n, seed) in {"train": (320, 1), "validation": (96, 2)}.items():
        texts, labels = _colour_texts(n, seed)
        pq.write_table(pa.table({"text": texts, "colours": labels}), root / f"{split}.parquet")
    (root / "labels.json").write_text(json.dumps(COLOURS))
    summary = _finetune(tiny_bert, root, {"train": str(root / "train.parquet"),
                                          "validation": str(root / "validation.parquet"),
                                          "label_column": "colours"}, workers=2, metric="micro_f1", steps=100, lr=6e-3)
    return summary, root


@pytest.fixture(scope="module")
def pair_model(ray_cluster, tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    for split, (n, seed) in {"train": (256, 3), "validation": (64, 4)}.items():
        a, b, y = _pair_texts(n, seed)
        pq.write_table(pa.table({"premise": a, "hypothesis": b, "label": y}), root / f"{split}.parquet")
    summary = _finetune(tiny_bert, root, {"train": str(root / "train.parquet"),
                                          "validation": str(root / "validation.parquet"),
                                          "text_columns": ["premise"], "text_pair_column": "hypothesis",
                                          "labels": ["no", "yes"]}, workers=1, metric="accuracy")
    return summary, root


@pytest.fixture(scope="module")
def served(multi_label_model, pair_model, healthy):
    """One Serve instance with both models as apps: '/ml' and '/pairs' (one start costs the suite less than two)."""
    from bertray.config import ServeConfig

    urls = _serve({name: ServeConfig(model=summary["model"], cpus_per_replica=0.5, max_texts=8)
                   for name, (summary, _) in {"ml": multi_label_model, "pairs": pair_model}.items()}, healthy)
    yield urls
    _stop_serve()


def test_multi_label_checkpoint_is_self_describing_and_plain_transformers_knows_its_head(multi_label_model):
    summary, _ = multi_label_model
    model = Path(summary["model"])
    meta = json.loads((model / "bertray.json").read_text())
    config = json.loads((model / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert meta["task"] == "multi_label" and set(meta["thresholds"]) == set(COLOURS)
    assert all(0 < t < 1 for t in meta["thresholds"].values())
    m = summary["metrics"]
    # Thresholds were tuned over the whole validation set, gathered from both workers.
    assert m["n"] == 96 and {"micro_f1", "macro_f1", "samples_f1", "label_cardinality"} <= set(m)
    assert m["micro_f1"] > 0.8, m  # the toy task is learned: the head is trained as a multi-label one
    assert (Path(summary["run_dir"]) / "per_label.png").exists()


def test_multi_label_evaluate_label_and_serve_decide_with_the_checkpoints_thresholds(multi_label_model, served,
                                                                                     tmp_path):
    from bertray import evaluate, label
    from bertray.config import LabelConfig
    from bertray.predictor import Predictor

    summary, root = multi_label_model
    model = summary["model"]
    pred = Predictor(model)
    assert pred.multi_label and pred.thresholds.tolist() == pytest.approx(
        [json.loads((Path(model) / "bertray.json").read_text())["thresholds"][c] for c in COLOURS])

    ev = evaluate.evaluate(model, str(root / "validation.parquet"), str(tmp_path / "eval"), label_column="colours")
    assert ev["n"] == 96 and ev["micro_f1"] == pytest.approx(summary["metrics"]["micro_f1"])
    assert (tmp_path / "eval" / "per_label.png").exists()

    texts, _ = _colour_texts(60, seed=9)
    texts += [None, "", "   "]  # rows with no text: a null label list, counted
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), tmp_path / "corpus.parquet")
    out = tmp_path / "labeled"
    s = label.run(LabelConfig(model=model, input=str(tmp_path / "corpus.parquet"), output=str(out),
                              probabilities=True))
    table = pq.read_table(out).sort_by("id")
    assert table.num_rows == 63 and table.column("id").to_pylist() == list(range(63))
    assert pa.types.is_list(table.schema.field("labels").type) and "label" not in table.column_names
    probs = pred.predict(texts[:60]).probs
    for i, row in enumerate(table.slice(0, 60).to_pylist()):
        want = [COLOURS[k] for k in np.argsort(-probs[i], kind="stable") if probs[i, k] >= pred.thresholds[k]]
        assert row["labels"] == want, (texts[i], row)
        assert row["scores"] == pytest.approx([float(probs[i, k]) for k in pred.chosen(probs[i])], abs=1e-5)
        assert [row[f"prob_{c}"] for c in COLOURS] == pytest.approx(probs[i].tolist(), abs=1e-5)
    assert table.column("labels").to_pylist()[60:] == [None] * 3
    assert s["rows_labeled"] == 60 and s["rows_without_label"] == {"null_text": 1, "empty_text": 2}
    assert s["label_counts"] == {c: int(sum(c in r for r in table.column("labels").to_pylist()[:60])) for c in COLOURS}
    assert "max_rate_change" in s["drift"]  # per-label rates, not one distribution

    r = requests.post(served["ml"] + "/v1/classify", json={"texts": texts[:8], "probabilities": True}, timeout=30)
    assert r.status_code == 200, r.text
    for i, p in enumerate(r.json()["predictions"]):
        want = [COLOURS[k] for k in np.argsort(-probs[i], kind="stable") if probs[i, k] >= pred.thresholds[k]]
        assert p["labels"] == want and "label" not in p
        assert p["scores"] == pytest.approx([float(probs[i, COLOURS.index(c)]) for c in want], abs=1e-5)
    info = requests.get(served["ml"] + "/v1/model", timeout=10).json()
    assert info["task"] == "multi_label" and set(info["thresholds"]) == set(COLOURS)


def test_multi_label_sweep_ranks_on_macro_f1_and_exports_the_winner_with_its_thresholds(ray_cluster, tiny_bert,
                                                                                        tmp_path):
    """Two trials on the colour task: each tunes its thresholds at its evaluations, the table ranks them by macro-F1,
    and best-model is the winner's checkpoint, whose stored thresholds give back the metric it was ranked by."""
    from bertray import config as C
    from bertray import evaluate, tune

    for split, (n, seed) in {"train": (320, 1), "validation": (96, 2)}.items():
        texts, labels = _colour_texts(n, seed)
        pq.write_table(pa.table({"text": texts, "colours": labels}), tmp_path / f"{split}.parquet")
    summary = tune.run(C.load(C.TuneConfig, data={
        "model": {"base": tiny_bert, "max_length": 32},
        "data": {"train": str(tmp_path / "train.parquet"), "validation": str(tmp_path / "validation.parquet"),
                 "label_column": "colours", "labels": COLOURS},
        "train": {"batch_size": 32, "max_steps": 40, "eval_every": 20, "log_every": 20, "metric": "macro_f1"},
        "run": {"name": "ml-sweep", "storage": str(tmp_path / "runs"), "max_failures": 0},
        "search": {"algorithm": "grid", "space": {"optim.lr": {"grid": [1e-4, 6e-3]}}, "max_concurrent_trials": 2},
    }))
    rows = list(csv.DictReader((tmp_path / "runs" / "ml-sweep" / "trials.csv").open()))
    assert [r["status"] for r in rows] == ["finished", "finished"]
    best = max(rows, key=lambda r: float(r["best macro_f1"]))
    assert summary["best"]["trial"] == best["trial"] and float(best["optim.lr"]) == 6e-3
    assert summary["best"]["value"] == pytest.approx(float(best["best macro_f1"]))
    model = Path(summary["model"])
    meta = json.loads((model / "bertray.json").read_text())
    assert meta["task"] == "multi_label" and set(meta["thresholds"]) == set(COLOURS)
    ev = evaluate.evaluate(str(model), str(tmp_path / "validation.parquet"), str(tmp_path / "eval"),
                           label_column="colours")
    assert ev["macro_f1"] == pytest.approx(float(best["best macro_f1"]))


def test_pairs_fine_tune_label_and_serve_as_pairs(pair_model, served, tmp_path):
    from bertray import evaluate, label
    from bertray.config import ConfigError, LabelConfig
    from bertray.predictor import Predictor

    summary, root = pair_model
    model = summary["model"]
    meta = json.loads((Path(model) / "bertray.json").read_text())
    assert meta["text_pair"] is True and summary["metrics"]["accuracy"] == 1.0, summary["metrics"]
    ev = evaluate.evaluate(model, str(root / "validation.parquet"), str(tmp_path / "eval"), text_columns=["premise"],
                           text_pair_column="hypothesis")
    assert ev["accuracy"] == 1.0

    a, b, y = _pair_texts(40, seed=8)
    pq.write_table(pa.table({"id": list(range(40)), "premise": a, "hypothesis": b}), tmp_path / "pairs.parquet")
    with pytest.raises(ConfigError, match="trained on sentence pairs"):  # the second text's column is needed
        label.make_plan(LabelConfig(model=model, input=str(tmp_path / "pairs.parquet"), output=str(tmp_path / "x"),
                                    text_column="premise"))
    out = tmp_path / "labeled"
    label.run(LabelConfig(model=model, input=str(tmp_path / "pairs.parquet"), output=str(out), text_column="premise",
                          text_pair_column="hypothesis"))
    got = pq.read_table(out).sort_by("id").column("label").to_pylist()
    assert got == [["no", "yes"][v] for v in y]
    probs = Predictor(model).predict(a, b).probs
    assert got == [["no", "yes"][k] for k in probs.argmax(1)]

    url = served["pairs"] + "/v1/classify"
    r = requests.post(url, json={"pairs": [[a[i], b[i]] for i in range(8)]}, timeout=30)
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == got[:8]
    r = requests.post(url, json={"texts": ["only one text"]}, timeout=30)
    assert r.status_code == 422 and "sentence pairs" in r.json()["detail"]
    r = requests.post(url, json={"pairs": [["a", "b"], ["c", " "]]}, timeout=30)
    assert r.status_code == 422 and "pairs[1][1]: empty text" in r.json()["detail"]


def _serve(configs: dict, healthy) -> dict:
    from ray import serve

    from bertray.runtime import free_ports
    from bertray.serve import build_app, start_http

    port = free_ports(1)[0]
    start_http("127.0.0.1", port, next(iter(configs.values())).ingress)
    serve.run_many([serve.RunTarget(build_app(cfg), name=name, route_prefix=f"/{name}")
                    for name, cfg in configs.items()])
    urls = {name: f"http://127.0.0.1:{port}/{name}" for name in configs}
    for url in urls.values():
        healthy(url)
    return urls


def _stop_serve() -> None:
    from ray import serve

    serve.shutdown()


def test_long_documents_train_on_every_window_and_validate_as_the_checkpoint_scores(ray_cluster, tiny_bert, tmp_path):
    """train_windows all: every window of a long text is a training example with its text's label, so an epoch is
    planned over the windows; validation pools each text's windows as the checkpoint does (so `evaluate` agrees),
    gathered from both workers."""
    from bertray import evaluate, modeling
    from bertray.predictor import Predictor

    for split, (n, seed) in {"train": (160, 5), "validation": (48, 6)}.items():
        texts, labels = _topic_docs(n, seed)
        pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / f"{split}.parquet")
    summary = _finetune(tiny_bert, tmp_path, {"train": str(tmp_path / "train.parquet"),
                                              "validation": str(tmp_path / "validation.parquet")},
                        workers=2, metric="accuracy", steps=None, lr=5e-3,
                        model={"max_length": 16, "long_text": "chunk", "chunk_overlap": 4, "train_windows": "all"},
                        train={"epochs": 2, "batch_size": 16, "eval_every": 10})
    tok = modeling.load_tokenizer(tiny_bert)
    _, train_windows = modeling.windows(tok, _topic_docs(160, 5)[0], 16, 4)
    _, val_windows = modeling.windows(tok, _topic_docs(48, 6)[0], 16, 4)
    assert train_windows.min() >= 2  # every text is longer than one window
    # Two epochs of length-grouped batches of 16 windows, split over 2 workers (not of 160 texts: 10 steps).
    assert summary["final_step"] == 2 * -(-(-(-int(train_windows.sum()) // 16)) // 2)
    meta = json.loads((Path(summary["model"]) / "bertray.json").read_text())
    report = meta["data_report"]
    assert report["train"]["windows"] == train_windows.sum() and report["validation"]["windows"] == val_windows.sum()
    assert meta["config"]["model"]["long_text"] == "chunk"
    m = summary["metrics"]
    assert m["n"] == 48 and m["accuracy"] > 0.9, m  # documents, not windows; and the topic is learned

    ev = evaluate.evaluate(summary["model"], str(tmp_path / "validation.parquet"), str(tmp_path / "eval"))
    assert ev["n"] == 48 and ev["windows"] == val_windows.sum()
    assert ev["confusion_matrix"] == m["confusion_matrix"]
    # The run's validation loss is the cross-entropy of the checkpoint's own pooled scores, text by text.
    texts, labels = _topic_docs(48, 6)
    probs = Predictor(summary["model"]).predict(texts).probs
    names = meta["label_names"]
    loss = -np.mean([np.log(probs[i, names.index(y)]) for i, y in enumerate(labels)])
    assert loss == pytest.approx(m["loss"], rel=1e-4)

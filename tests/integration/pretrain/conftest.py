"""Fixtures for the pretrain stage: a small repetitive corpus in several Parquet files, and one 2-worker
pretraining run on it from the loopback S3 server, resumed after a killed worker, that the tests below share."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

_SUBJECTS = ["the cat", "a dog", "the film", "my neighbour", "the old man", "a small bird"]
_VERBS = ["sat on", "looked at", "walked past", "talked about", "slept under", "ran to"]
_OBJECTS = ["the mat", "a tree", "the river", "the red house", "a quiet garden", "the station"]


def corpus(n: int, seed: int = 0) -> list[str]:
    """Short sentences over ~30 words: a tiny random BERT learns their distribution in a few dozen steps."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} ." for _ in range(n)]


def write_corpus(folder: Path, files: int = 3, rows: int = 1500) -> Path:
    """`files` Parquet files with a `text` column and an unrelated `id`, plus a few empty/null texts. Big enough for
    one pass to feed 30 steps of 2 workers (each new pass restarts the Ray Data read, seconds on a busy machine)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        texts = corpus(rows, seed=i)
        texts[5], texts[7] = "", None
        pq.write_table(pa.table({"id": list(range(i * rows, (i + 1) * rows)), "text": texts}), folder / f"part-{i}.parquet")
    return folder


def _config_data(base: str, texts: str, storage: str, name: str, **sections) -> dict:
    """Config sections for a tiny model: short packed sequences, high learning rate, frequent evaluations."""
    data = {
        "model": {"base": base, "max_length": 32},
        # Evaluate on the training text: holding out rows of a corpus this repetitive would hold out their
        # duplicates too, i.e. most of the corpus.
        "data": {"train": texts, "validation": texts},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"batch_size": 16, "max_steps": 30, "eval_every": 10, "log_every": 5},
        "mlm": {"eval_rows": 200},
        "run": {"name": name, "storage": storage, "num_workers": 2, "max_failures": 2},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return data


def _pretrain_config(base: str, texts: str, storage: str, name: str, **sections):
    from bertray import config as C

    return C.load(C.PretrainConfig, data=_config_data(base, texts, storage, name, **sections))


@pytest.fixture(scope="session")
def pretrain_config():
    """`f(base, texts, storage, name, **sections) -> PretrainConfig` for the tiny model (see _pretrain_config)."""
    return _pretrain_config


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("mlm-corpus"))


@pytest.fixture(scope="module")
def s3_pretrained(ray_cluster, s3_server, tiny_bert, corpus_dir, killing_a_worker, tmp_path_factory):
    """`bertray pretrain --config F.yaml --num-workers 2`: tiny_bert on the corpus read from S3, with checkpoints
    and the export on S3; evaluation on the training text. One worker is SIGKILLed once the controller has
    registered a checkpoint, so the run resumes from S3 mid-stream. Returns (config file data, run summary)."""
    import boto3
    import yaml

    from bertray import cli, storage

    bucket = "pretrain-shared"
    boto3.client("s3").create_bucket(Bucket=bucket)
    for f in sorted(corpus_dir.glob("*.parquet")):
        storage.write_bytes(f"s3://{bucket}/corpus/{f.name}", f.read_bytes())
    data = _config_data(tiny_bert, f"s3://{bucket}/corpus", f"s3://{bucket}/runs", "mlm-s3",
                        train={"max_steps": 40})
    del data["run"]["num_workers"]  # given as the flag below
    data["mlm"]["prefetch"] = 2  # batches padded and masked ahead, as a GPU run does by default
    path = tmp_path_factory.mktemp("mlm-config") / "pretrain.yaml"
    path.write_text(yaml.safe_dump(data))
    snapshot = f"s3://{bucket}/runs/mlm-s3/checkpoint_manager_snapshot.json"
    code = killing_a_worker(lambda: cli.main(["pretrain", "--config", str(path), "--num-workers", "2"]),
                            lambda: storage.read_text(snapshot) if storage.exists(snapshot) else None)
    assert code == 0
    return data, json.loads(storage.read_text(f"s3://{bucket}/runs/mlm-s3/metrics.json"))

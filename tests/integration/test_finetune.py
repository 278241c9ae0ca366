"""Fine-tuning on a real local Ray cluster: 2 DDP workers, S3 storage on a loopback server, fault tolerance."""
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray import config as C
from bertray import finetune, storage
from bertray.predictor import Predictor

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(base: str, data_dir, storage_uri: str, name: str, **overrides):
    data = {
        "model": {"base": base, "max_length": 48},
        "data": {"train": str(data_dir) + "/train.parquet", "validation": str(data_dir) + "/validation.parquet"},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 16, "max_steps": 12, "eval_every": 4, "log_every": 4},
        "run": {"name": name, "storage": storage_uri, "num_workers": 2},
    }
    return C.load(C.FinetuneConfig, data=data, overrides=[f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, s3_server, tiny_bert, sst2_small, tmp_path_factory):
    """One 2-worker fine-tune with its data, base model, checkpoints and export all on the loopback S3 server,
    shared by the tests that inspect its outputs (each Ray Train run costs ~20 s of start-up on two cores; the local
    storage path is run by the fault tests below). Returns (summary, the run folder downloaded to local disk)."""
    import boto3

    bucket = "s3://finetune-shared"
    boto3.client("s3").create_bucket(Bucket=bucket.removeprefix("s3://"))
    storage.upload_dir(sst2_small, f"{bucket}/data")
    storage.upload_dir(tiny_bert, f"{bucket}/models/tiny")
    summary = finetune.run(tiny_cfg(f"{bucket}/models/tiny", f"{bucket}/data", f"{bucket}/runs", "two-workers"))
    local = storage.download_dir(f"{bucket}/runs/two-workers", tmp_path_factory.mktemp("two-worker-run"))
    return summary, local


@pytest.mark.s3
def test_two_worker_finetune_exports_a_self_describing_checkpoint(two_worker_run):
    s, run_dir = two_worker_run
    assert s["final_step"] == 12 and len(s["worker_nodes"]) == 2
    assert set(s["metrics"]) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix", "loss"}
    assert sum(map(sum, s["metrics"]["confusion_matrix"])) == 100  # the whole validation set, summed over workers
    for f in ("metrics.json", "curves.png", "confusion_matrix.png", "model/bertray.json", "model/model.safetensors"):
        assert (run_dir / f).exists(), f
    assert not (run_dir / "model" / "train_state.pt").exists()
    meta = json.loads((run_dir / "model" / "bertray.json").read_text())
    assert meta["kind"] == "classifier" and meta["label_names"] == ["negative", "positive"]
    assert meta["config"]["optim"]["lr"] == 1e-3 and meta["base_model"] == "s3://finetune-shared/models/tiny"
    assert set(meta["train_label_distribution"]) == {"negative", "positive"}
    # Plain transformers loads it, with no bertray import.
    code = ("from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T; import sys;"
            f"m = M.from_pretrained({str(run_dir / 'model')!r}); t = T.from_pretrained({str(run_dir / 'model')!r});"
            "print(m.config.id2label[1], m(**t(['fine'], return_tensors='pt')).logits.shape[-1]);"
            "assert 'bertray' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["positive", "2"]


@pytest.mark.s3
def test_finetune_on_s3_checkpoints_there_and_serves_predictions_from_there(two_worker_run):
    s, _ = two_worker_run
    runs = "s3://finetune-shared/runs/two-workers"
    assert s["model"] == f"{runs}/model"
    listed = storage.list_files(runs)
    assert any("/checkpoint_" in f and f.endswith("train_state.pt") for f in listed)  # Ray Train's, with the optimizer
    assert f"{runs}/metrics.json" in listed
    pred = Predictor(s["model"])
    assert pred.label_names == ["negative", "positive"] and pred.predict(["a fine film"]).probs.shape == (1, 2)


@pytest.mark.slow
def test_rerunning_the_same_command_resumes_after_driver_dies(ray_cluster, tiny_bert, sst2_small, tmp_path):
    """SIGKILL the driver mid-run (its job's controller and workers die with it); the same command picks up at the
    last checkpoint. Both runs join the session's cluster (--address), as commands on a long-lived cluster do: only
    what the first run left in storage carries over, since none of its processes survive it."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "bertray.cli", "finetune", "--set", f"model.base={tiny_bert}", "--set", "model.max_length=48",
           "--set", f"data.train={sst2_small}/train.parquet", "--set", f"data.validation={sst2_small}/validation.parquet",
           "--set", "train.batch_size=8", "--set", "train.max_steps=30", "--set", "train.eval_every=5",
           "--set", "run.cpus_per_worker=1", "--name", "rerun", "--storage", str(runs),
           "--address", ray_cluster.get_runtime_context().gcs_address]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    snapshot = runs / "rerun" / "checkpoint_manager_snapshot.json"
    while time.time() < deadline and first.poll() is None and not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
        time.sleep(0.3)
    assert first.poll() is None, "the first run ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((runs / "rerun" / "metrics.json").read_text())
    assert summary["final_step"] == 30
    assert summary["resumed_at"] and summary["resumed_at"][0] >= 5


@pytest.mark.s3
def test_rerun_with_other_data_is_refused_before_training_and_overwrite_starts_afresh(two_worker_run, tiny_bert,
                                                                                       tmp_path, capsys):
    """The same run name with other data once resumed the old run and exported its weights under the new labels.
    Now it is refused in one line before anything is written; --overwrite replaces the folder and trains anew."""
    import shutil

    from bertray import cli

    words = {"negative": ["awful", "dreadful", "boring", "terrible"],
             "positive": ["wonderful", "superb", "delightful", "brilliant"]}
    rows = [(f"{a} and {b}", label) for label, ws in words.items() for a in ws for b in ws]
    for split in ("train", "validation"):
        pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [y for _, y in rows]}), tmp_path / f"{split}.parquet")
    args = ["finetune", "--set", "model.max_length=48", "--set", "optim.lr=1e-3", "--set", "train.batch_size=16",
            "--set", "train.max_steps=12", "--set", "train.eval_every=4", "--set", "train.log_every=4",
            "--set", f"data.train={tmp_path}/train.parquet", "--set", f"data.validation={tmp_path}/validation.parquet"]

    # The shared run's own settings, other data.
    bucket = "s3://finetune-shared"
    old_run = f"{bucket}/runs/two-workers"
    before = storage.list_files(old_run)
    assert cli.main([*args, "--set", f"model.base={bucket}/models/tiny", "--name", "two-workers",
                     "--storage", f"{bucket}/runs", "--num-workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"error: {old_run} already holds a run with other training data (train: "), err
    assert "with 400 rows then" in err[-1] and "with 32 rows now" in err[-1] and "other settings" not in err[-1]
    assert err[-1].endswith("start a new one with --set run.name=NAME, or pass --overwrite to replace it")
    assert storage.list_files(old_run) == before

    # A local copy of that run, replaced with --overwrite: trained from step 0 on the new data, long enough (at a
    # high rate) for the tiny model to learn it.
    _, old_local = two_worker_run
    runs = tmp_path / "runs"
    shutil.copytree(old_local, runs / "two-workers")
    (runs / "two-workers" / "stale.txt").write_text("from the old run")
    assert cli.main([*args, "--set", f"model.base={tiny_bert}", "--name", "two-workers", "--storage", str(runs),
                     "--num-workers", "1", "--set", "train.max_steps=24", "--set", "train.eval_every=12",
                     "--set", "optim.lr=1e-2", "--overwrite"]) == 0
    summary = json.loads((runs / "two-workers" / "metrics.json").read_text())
    assert summary["final_step"] == 24 and summary["resumed_at"] == []
    assert not (runs / "two-workers" / "stale.txt").exists()
    pred = Predictor(str(runs / "two-workers" / "model"))
    probs = pred.predict([t for t, _ in rows]).probs
    predicted = [pred.label_names[i] for i in probs.argmax(-1)]
    assert np.mean([p == y for p, (_, y) in zip(predicted, rows)]) >= 0.9


@pytest.mark.slow
def test_embedded_minilm_finetunes_for_a_few_steps(ray_cluster, sst2_small, tmp_path):
    cfg = C.load(C.FinetuneConfig, data={
        "model": {"base": "embedded", "max_length": 32},
        "data": {"train": f"{sst2_small}/train.parquet", "validation": f"{sst2_small}/validation.parquet"},
        "train": {"batch_size": 8, "max_steps": 4, "eval_every": 4},
        "run": {"name": "minilm", "storage": str(tmp_path / "runs"), "num_workers": 1}})
    s = finetune.run(cfg)
    assert s["final_step"] == 4
    pred = Predictor(s["model"])
    assert pred.meta["base_model"] == "embedded" and pred.model.config.hidden_size == 384
    assert np.allclose(pred.predict(["great", "awful"]).probs.sum(-1), 1.0, atol=1e-5)


def test_bad_data_fails_before_training_with_a_clear_error(ray_cluster, tiny_bert, tmp_path):
    pq.write_table(pa.table({"sentence": ["a", "b"], "label": [0, 1]}), tmp_path / "train.parquet")
    pq.write_table(pa.table({"text": ["a"], "label": [0]}), tmp_path / "validation.parquet")
    cfg = tiny_cfg(tiny_bert, tmp_path, str(tmp_path / "runs"), "bad")
    from bertray.data import DataError

    with pytest.raises(DataError, match=r"missing column\(s\) 'text'; the file has: sentence, label"):
        finetune.run(cfg)
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.s3
def test_cli_predict_and_evaluate(two_worker_run, sst2_small, tmp_path, capsys):
    from bertray import cli

    model = two_worker_run[0]["model"]
    # predict and the error case in this process (same parser and code path, no interpreter start-up);
    # evaluate as a real command line, exit code and files included.
    assert cli.main(["predict", model, "a gorgeous film", "dull"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("negative", "positive") for line in lines)
    assert cli.main(["evaluate", model, str(tmp_path / "missing.parquet")]) == 1
    err = capsys.readouterr().err
    assert "no data files found" in err and "Traceback" not in err

    out = tmp_path / "eval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "bertray.cli", "evaluate", model, f"{sst2_small}/validation.parquet",
                        "--out", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 100 and 0 <= m["accuracy"] <= 1 and (out / "confusion_matrix.png").stat().st_size > 1000


def test_a_loss_that_stops_being_finite_ends_the_run_in_one_line_and_exports_nothing(ray_cluster, tiny_bert,
                                                                                     sst2_small, tmp_path):
    """A learning rate no model survives: the run ends at the first progress line whose loss is not finite, with no
    retries (it would diverge again) and no export of a broken model."""
    from bertray.trainer import TrainingDiverged

    cfg = tiny_cfg(tiny_bert, sst2_small, str(tmp_path / "runs"), "diverged", **{
        "optim.lr": 1e30, "optim.max_grad_norm": 0, "run.num_workers": 1, "train.log_every": 2,
        "train.max_steps": 40, "train.eval_every": 40})
    with pytest.raises(TrainingDiverged, match=r"training diverged: the loss was not finite by step \d+") as e:
        finetune.run(cfg)
    assert "Lower optim.lr" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "runs" / "diverged" / "model").exists()


def test_texts_are_tokenized_once_across_the_cluster_in_order(ray_cluster, sst2_small, monkeypatch):
    """Ray Data tasks tokenize; the blocks come back in any order and are put back in row order, equal to
    tokenizing in one process. The workers then receive ids only."""
    from bertray import data as D
    from bertray import finetune, modeling

    sentences = pq.read_table(sst2_small / "train.parquet").column("text").to_pylist()
    texts = [f"{s} {i}" for i in range(15) for s in sentences]  # 6,000: several blocks of at least 2,048
    m = C.ModelConfig(base="embedded", max_length=24, truncation="head+tail")
    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    importlib.import_module("ray.data")  # which sets up its loggers, the console handler at INFO

    console = {h.get_name(): h for h in logging.getLogger("ray.data").handlers}["console"]
    monkeypatch.setattr(console, "level", logging.INFO)  # as a fresh driver has it
    ids, windows = finetune.tokenize(texts, m)
    expected, _ = modeling.encode(tok, texts, 24, "head+tail")
    assert windows is None
    assert len(ids) == len(texts) and all(ids[i].tolist() == expected[i] for i in range(len(texts)))
    # Not verbose (pytest's root logger is at WARNING): the pipeline's own lines went to Ray Data's log file only.
    assert console.level == logging.WARNING
    # Cut into windows: each text's windows, in text order, and how many each has.
    ids, windows = finetune.tokenize(texts, m, overlap=4)
    expected, counts = modeling.windows(tok, texts, 24, 4)
    assert counts.max() > 1 and windows.tolist() == counts.tolist()
    assert len(ids) == len(expected) and all(ids[i].tolist() == expected[i] for i in range(len(expected)))
    part = D.Labeled(texts, np.zeros(len(texts), dtype=np.int64), ["a", "b"], {"source": "mem"})
    ingested = finetune.ingest(part, m, training=True)
    assert ingested.texts is None and ingested.ids.values.dtype == np.int32 and ingested.windows is None

"""MLflow tracking and registry against real `mlflow server`s on loopback (SQLite store, local artifact folder).

One 2-worker fine-tune on a Hugging Face DatasetDict registers version 1 of a model, a 2-trial sweep registers
version 2 (its best trial), `bertray label --model models:/NAME/2` labels a corpus with it, a masked-LM pretraining
run registers its encoder as a fine-tuning base, and a second server is killed while a run is under way.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from bertray import config as C
from bertray import finetune, modeling, tune
from bertray.runtime import free_ports

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-sst2"
EXPERIMENT = "bertray-tests"


def _start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    folder.mkdir(parents=True)
    port = free_ports(1)[0]
    exe = Path(sys.executable).parent / "mlflow"
    cmd = [str(exe), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
           "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    # Job execution runs MLflow's own background jobs (GenAI scorers), which these tests never use; without it the
    # server starts seconds sooner. Its own process group, so the test can stop it and its workers together.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(cmd, stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait(proc: subprocess.Popen, uri: str, folder: Path) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"mlflow server at {uri} did not start: {(folder / 'server.log').read_text()[-2000:]}")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers, started side by side and waited for only when first used (each takes seconds to start, which
    the Ray cluster and data fixtures overlap): one for the module, one to be killed. [(process, uri, folder)]"""
    root = tmp_path_factory.mktemp("mlflow")
    started = [(*_start_server(root / name), root / name) for name in ("main", "doomed")]
    try:
        yield started
    finally:
        for proc, _, _ in started:
            _stop(proc)


@pytest.fixture(scope="module")
def mlflow_uri(servers):
    proc, uri, folder = servers[0]
    _wait(proc, uri, folder)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        yield uri


@pytest.fixture(scope="module")
def client(mlflow_uri):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_uri)


@pytest.fixture(scope="module")
def hf_sst2(sst2_small, tmp_path_factory) -> Path:
    """The SST-2 slice as a DatasetDict on disk: a 'sentence' column and a ClassLabel named unlike labels.json."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    splits = {}
    for split in ("train", "validation"):
        t = pq.read_table(sst2_small / f"{split}.parquet")
        splits[split] = Dataset.from_dict({"sentence": t.column("text").to_pylist(),
                                           "label": t.column("label").to_pylist()}, features=features)
    out = tmp_path_factory.mktemp("hf") / "sst2"
    DatasetDict(splits).save_to_disk(str(out))
    return out


def _cfg(cls, tiny_bert, hf_sst2, storage, name, **sections):
    data = {
        "model": {"base": tiny_bert, "max_length": 64},
        "data": {"train": f"{hf_sst2}?split=train", "validation": f"{hf_sst2}?split=validation",
                 "text_columns": ["sentence"]},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 16, "max_steps": 8, "eval_every": 4, "log_every": 2},
        "run": {"name": name, "storage": str(storage), "tracking": "mlflow", "experiment": EXPERIMENT},
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return C.load(cls, data=data)


@pytest.fixture(scope="module")
def tracked_finetune(servers, ray_cluster, tiny_bert, hf_sst2, mlflow_uri, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    cfg = _cfg(C.FinetuneConfig, tiny_bert, hf_sst2, storage, "tracked", run={"num_workers": 2, "register_as": MODEL})
    return finetune.run(cfg), storage / "tracked"


@pytest.fixture(scope="module")
def tracked_sweep(tracked_finetune, tiny_bert, hf_sst2, tmp_path_factory):
    """A 2-trial grid sweep registering its best model after the fine-tune registered its own."""
    storage = tmp_path_factory.mktemp("sweeps")
    cfg = _cfg(C.TuneConfig, tiny_bert, hf_sst2, storage, "sweep", train={"max_steps": 4, "eval_every": 2},
               data={"max_train_rows": 160, "max_validation_rows": 64},
               run={"register_as": MODEL, "max_failures": 0},
               search={"algorithm": "grid", "space": {"optim.lr": {"grid": [1e-3, 3e-4]}}, "max_concurrent_trials": 2})
    return tune.run(cfg)


# --------------------------------------------------------------------------------------------------- fine-tune


def test_finetune_is_one_mlflow_run_with_params_metrics_at_steps_and_artifacts(tracked_finetune, client):
    summary, run_dir = tracked_finetune
    run_id = summary["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    p = run.data.params
    assert p["optim.lr"] == "0.001" and p["run.num_workers"] == "2" and p["model.max_length"] == "64"
    assert p["data.train"].endswith("?split=train") and p["data.text_columns"] == '["sentence"]'
    assert run.data.tags["bertray.stage"] == "finetune"
    # Progress metrics at every log_every step and evaluation metrics at every evaluation, each once: only rank 0
    # of the two workers logs.
    steps = {k: [m.step for m in client.get_metric_history(run_id, k)]
             for k in ("train_loss", "lr", "accuracy", "loss")}
    assert steps == {"train_loss": [2, 4, 6, 8], "lr": [2, 4, 6, 8], "accuracy": [4, 8], "loss": [4, 8]}
    assert run.data.metrics["best_accuracy"] == pytest.approx(summary["metrics"]["accuracy"])
    top = {a.path for a in client.list_artifacts(run_id)}
    assert top >= {"metrics.json", "curves.png", "confusion_matrix.png", "run.json", "data_report.json", "model"}
    assert {a.path for a in client.list_artifacts(run_id, "model")} >= {
        "model/config.json", "model/model.safetensors", "model/bertray.json"}
    local = json.loads((run_dir / "metrics.json").read_text())
    assert local["mlflow"]["run_id"] == run_id  # the run folder says where its MLflow run is
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == run_id


def test_classlabel_names_of_a_datasetdict_reach_the_checkpoint(tracked_finetune):
    summary, run_dir = tracked_finetune
    config = json.loads((run_dir / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}  # not labels.json's negative/positive: the ClassLabel's
    assert json.loads((run_dir / "model" / "bertray.json").read_text())["label_names"] == ["neg", "pos"]
    train = summary["data_report"]["train"]
    assert train["rows_read"] == 400 and train["source"].endswith("?split=train")


def test_registering_makes_version_1_then_the_sweep_version_2(tracked_finetune, tracked_sweep, client):
    summary, _ = tracked_finetune
    v1, v2 = client.get_model_version(MODEL, "1"), client.get_model_version(MODEL, "2")
    assert summary["mlflow"]["registered"] == f"models:/{MODEL}/1" and v1.run_id == summary["mlflow"]["run_id"]
    assert float(v1.tags["best_accuracy"]) == pytest.approx(summary["metrics"]["accuracy"])
    assert tracked_sweep["mlflow"]["registered"] == f"models:/{MODEL}/2"
    assert v2.run_id == tracked_sweep["mlflow"]["run_id"]


# --------------------------------------------------------------------------------------------------- pretrain


def test_pretrain_is_one_mlflow_run_and_its_registered_encoder_is_a_fine_tuning_base(ray_cluster, mlflow_uri, client,
                                                                                     tiny_bert, tmp_path, monkeypatch):
    """A masked-LM run: its params, perplexity from step 0 (before training) on, the artifacts and the exported
    encoder, registered; `models:/NAME/1` then resolves to that encoder as a fine-tuning base."""
    import torch
    from safetensors.torch import load_file

    from bertray import pretrain
    from bertray.config import ModelConfig

    monkeypatch.setenv("BERTRAY_CACHE", str(tmp_path / "cache"))
    words = "the a cat dog film plot sat ran on under mat log red blue".split()
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(4 + i % 9)) for i in range(600)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "corpus.parquet")
    corpus = str(tmp_path / "corpus.parquet")
    cfg = C.load(C.PretrainConfig, data={
        "model": {"base": tiny_bert, "max_length": 32},
        "data": {"train": corpus, "validation": corpus},
        "optim": {"lr": 1e-2, "warmup_steps": 2},
        "train": {"batch_size": 16, "max_steps": 8, "eval_every": 4, "log_every": 2},
        "mlm": {"eval_rows": 64},
        "run": {"name": "tracked-mlm", "storage": str(tmp_path / "runs"), "num_workers": 1, "max_failures": 0,
                "tracking": "mlflow", "experiment": EXPERIMENT, "register_as": "tiny-mlm"},
    })
    summary = pretrain.run(cfg)
    run_id = summary["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["bertray.stage"] == "pretrain"
    assert run.data.params["mlm.probability"] == "0.15" and run.data.params["data.train"] == corpus
    # Logged as they happen; step 0's perplexity (measured before training) once the run has ended.
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
               for k in ("train_loss", "perplexity")}
    assert {k: [s for s, _ in v] for k, v in history.items()} == {"train_loss": [2, 4, 6, 8], "perplexity": [0, 4, 8]}
    assert history["perplexity"][0][1] == pytest.approx(summary["initial_metrics"]["perplexity"])
    assert {a.path for a in client.list_artifacts(run_id)} >= {"metrics.json", "curves.png", "run.json",
                                                               "data_report.json", "model"}
    assert summary["mlflow"]["registered"] == "models:/tiny-mlm/1"
    assert Path(modeling.resolve("models:/tiny-mlm/1")).is_relative_to(tmp_path / "cache")  # from the registry
    clf = modeling.build_classifier(ModelConfig(base="models:/tiny-mlm/1"), ["a", "b"])
    exported = load_file(str(Path(summary["model"]) / "model.safetensors"))
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(clf.bert.get_parameter(name), exported["bert." + name])


# --------------------------------------------------------------------------------------------------- sweep


def test_sweep_is_a_parent_run_with_one_child_per_trial_and_the_best_tagged(tracked_sweep, client):
    parent_id = tracked_sweep["mlflow"]["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["bertray.stage"] == "sweep"
    assert parent.data.tags["bertray.best_trial"] == tracked_sweep["best"]["trial"]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2
    assert sorted(float(c.data.params["optim.lr"]) for c in children) == [3e-4, 1e-3]
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "accuracy")] == [2, 4]
    best = [c for c in children if c.data.tags.get("bertray.best") == "true"]
    assert [c.data.tags["bertray.trial"] for c in best] == [tracked_sweep["best"]["trial"]]
    files = {a.path for a in client.list_artifacts(parent_id)}
    assert files >= {"trials.csv", "trials.md", "summary.json", "learning_curves.png", "model"}


# --------------------------------------------------------------------------------------------------- registry in


def test_label_takes_a_registered_model_version(tracked_sweep, ray_cluster, mlflow_uri, tmp_path):
    (tmp_path / "corpus").mkdir()
    corpus = tmp_path / "corpus" / "part-0.parquet"
    pq.write_table(pa.table({"id": list(range(40)), "text": [f"a film of {i} scenes" for i in range(40)]}), corpus)
    out = tmp_path / "labeled"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "BERTRAY_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "bertray.cli", "label", "--model", f"models:/{MODEL}/2",
                        "--input", str(corpus.parent), "--output", str(out), "--actors", "1",
                        "--address", ray_cluster.get_runtime_context().gcs_address],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["rows_written"] == 40 and set(summary["label_counts"]) <= {"neg", "pos"}


def test_models_uris_resolve_by_version_and_alias_and_fail_in_one_line(tracked_sweep, client, tmp_path, monkeypatch):
    monkeypatch.setenv("BERTRAY_CACHE", str(tmp_path / "cache"))
    client.set_registered_model_alias(MODEL, "champion", "1")
    by_alias = Path(modeling.resolve(f"models:/{MODEL}@champion"))
    assert json.loads((by_alias / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    assert by_alias == Path(modeling.resolve(f"models:/{MODEL}/1"))  # one download per version
    for uri, says in ((f"models:/{MODEL}/9", "no such registered model version"),
                      ("models:/no-such-model/1", "no such registered model version"),
                      (f"models:/{MODEL}", "expected models:/NAME/VERSION")):
        with pytest.raises(modeling.ModelError, match=says) as exc:
            modeling.resolve(uri)
        assert "\n" not in str(exc.value)


# --------------------------------------------------------------------------------------------------- failures


def test_server_killed_mid_run_warns_and_the_run_finishes(ray_cluster, servers, tiny_bert, hf_sst2, tmp_path,
                                                          monkeypatch, caplog):
    proc, uri, folder = servers[1]
    _wait(proc, uri, folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the driver's side: no waiting on a dead server
    cfg = _cfg(C.FinetuneConfig, tiny_bert, hf_sst2, tmp_path, "doomed", data={"max_train_rows": 96})
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(finetune.run(cfg)))
    with caplog.at_level(logging.WARNING, logger="bertray.tracking"):
        worker.start()
        # The MLflow run exists once the run folder records it; Ray Train has yet to start then.
        deadline = time.time() + 120
        while not (tmp_path / "doomed" / "mlflow.json").exists() and worker.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        _stop(proc, signal.SIGKILL)
        worker.join(timeout=300)
    assert not worker.is_alive() and result, "the run did not finish"
    assert result["final_step"] == 8 and (tmp_path / "doomed" / "model" / "model.safetensors").exists()
    assert json.loads((tmp_path / "doomed" / "metrics.json").read_text())["metrics"]["accuracy"] >= 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("MLflow: could not" in w and "the run goes on" in w for w in warnings), warnings

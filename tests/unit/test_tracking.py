"""bertray.tracking without an MLflow server: a config as params, the tracking URI every process agrees on, the
models:/ URIs (their syntax, the cache a version is downloaded into once, the registry's errors in one line), and a
Run that logs in batches, travels without its client and stops logging after its first failed request."""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from bertray import config as C
from bertray import modeling, tracking, trainer
from bertray.runtime import free_ports


def test_params_are_the_config_flattened_to_dotted_keys_with_json_values():
    config = {"optim": {"lr": 3e-5, "schedule": "linear"}, "run": {"use_gpu": False, "name": None},
              "data": {"text_columns": ["title", "body"], "labels": {}},
              "search": {"space": {"optim.lr": {"choice": [1e-5, 3e-5]}}},
              "model": {"base": "embedded", "adapter": {"kind": "lora", "r": 8}}, "notes": "x" * 7000}
    assert tracking.params(config) == {
        "optim.lr": "3e-05", "optim.schedule": "linear",  # strings as they are, numbers as JSON
        "run.use_gpu": "false", "run.name": "null",
        "data.text_columns": '["title", "body"]', "data.labels": "{}",  # an empty section is a value
        "search.space": '{"optim.lr": {"choice": [1e-05, 3e-05]}}',  # one param: its keys hold dots already
        "model.base": "embedded", "model.adapter.kind": "lora", "model.adapter.r": "8",
        "notes": "x" * 6000,  # MLflow's limit on a param's length
    }


def test_the_params_of_a_real_config_cover_every_key():
    cfg = C.load(C.TuneConfig, data={"data": {"train": "x"}, "search": {"space": {"optim.lr": {"choice": [1e-5]}}}})
    params = tracking.params(C.to_dict(cfg))
    assert params["search.space"] == '{"optim.lr": {"choice": [1e-05]}}' and params["data.train"] == "x"
    assert all(isinstance(v, str) for v in params.values()) and "optim.lr" in params and "train.epochs" in params


@pytest.mark.parametrize("uri", ["models:/", "models:/name", "models:/name/", "models:/name/v1", "models:/name/1/2",
                                 "models:/name@", "models:/a/b@c", "models:/name@x/1"])
def test_a_malformed_models_uri_is_one_clear_error_before_any_server_is_asked(uri, monkeypatch):
    monkeypatch.setattr(tracking, "_client", lambda uri: pytest.fail("a malformed URI reached the registry"))
    with pytest.raises(modeling.ModelError) as exc:
        tracking.model_dir(uri)
    assert str(exc.value) == f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS"
    with pytest.raises(modeling.ModelError, match="expected models:/NAME/VERSION"):
        modeling.resolve(uri)  # how every stage reaches it


class _Registry:
    """Stands in for MlflowClient's registry calls: version 3 of 'm', also known as @champion."""

    def __init__(self, calls: list, error: Exception | None = None):
        self.calls, self.error = calls, error

    def _version(self, name, version):
        if self.error is not None:
            raise self.error
        return SimpleNamespace(name=name, version=version, source="mlflow-artifacts:/1/abc/artifacts/model")

    def get_model_version(self, name, version):
        self.calls.append(("version", name, version))
        return self._version(name, version)

    def get_model_version_by_alias(self, name, alias):
        self.calls.append(("alias", name, alias))
        return self._version(name, "3")


@pytest.fixture()
def registry(monkeypatch, tmp_path):
    """`f(error=None)`: a registry (no server) that answers, or raises `error`; returns the list of its calls,
    downloads included. Downloads land in this test's own model cache."""
    monkeypatch.setenv("BERTRAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens: only the fakes answer

    def download(artifact_uri, dst_path, tracking_uri):
        calls.append(("download", artifact_uri))
        Path(dst_path).mkdir(parents=True)
        (Path(dst_path) / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "1": "pos"}}))
        return dst_path

    calls: list = []
    monkeypatch.setattr("mlflow.artifacts.download_artifacts", download)

    def make(error: Exception | None = None) -> list:
        monkeypatch.setattr(tracking, "_client", lambda uri: _Registry(calls, error))
        return calls

    return make


def test_a_registered_version_is_downloaded_once_into_the_private_cache(registry, tmp_path):
    calls = registry()
    folder = tracking.model_dir("models:/m/3")
    assert folder.parent == tmp_path / "cache" and (folder / "config.json").exists()
    assert calls == [("version", "m", "3"), ("download", "mlflow-artifacts:/1/abc/artifacts/model")]
    assert tracking.model_dir("models:/m/3") == folder and len(calls) == 2  # a version's files never change
    assert tracking.model_dir("models:/m@champion") == folder  # the alias is asked for, its version is cached
    assert calls[2:] == [("alias", "m", "champion")]
    assert not [p for p in (tmp_path / "cache").iterdir() if p != folder]  # no download folder left behind


def test_a_version_is_cached_per_tracking_server(registry, monkeypatch):
    calls = registry()
    first = tracking.model_dir("models:/m/3")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:10")  # another server's version 3 of 'm'
    assert tracking.model_dir("models:/m/3") != first and [c[0] for c in calls].count("download") == 2


def _mlflow_error(code: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    return MlflowException(f"{code} happened\nmore detail", error_code=getattr(databricks_pb2, code))


@pytest.mark.parametrize("error,says", [
    (lambda: _mlflow_error("RESOURCE_DOES_NOT_EXIST"), "no such registered model version in the MLflow registry at "
                                                       "http://127.0.0.1:9 (set MLFLOW_TRACKING_URI"),
    (lambda: _mlflow_error("INVALID_PARAMETER_VALUE"), "no such registered model version"),
    (lambda: _mlflow_error("INTERNAL_ERROR"), "cannot use the MLflow registry at http://127.0.0.1:9: "
                                              "INTERNAL_ERROR happened"),
    (lambda: requests.ConnectionError("refused\nat 127.0.0.1:9"), "cannot use the MLflow registry at "
                                                                  "http://127.0.0.1:9: refused"),
])
def test_registry_errors_are_one_line_naming_the_uri_and_server(registry, error, says):
    registry(error())
    with pytest.raises(modeling.ModelError) as exc:
        tracking.model_dir("models:/m/3")
    assert str(exc.value).startswith(f"models:/m/3: {says}") and "\n" not in str(exc.value), str(exc.value)


def test_first_line_of_an_error():
    assert tracking._first_line(ValueError("\n  first line\nsecond line")) == "first line"
    assert tracking._first_line(ConnectionError()) == "ConnectionError"  # no message: its kind
    assert tracking._first_line(ValueError("x" * 400)) == "x" * 300


def test_the_tracking_uri_is_absolute_so_every_process_finds_the_same_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking.tracking_uri()  # MLflow's default store, here a SQLite file in the working folder
    assert default.startswith(("sqlite:////", "file:///")) and str(tmp_path) in default, default
    for given, absolute in (("sqlite:///rel/m.db", f"sqlite:///{tmp_path}/rel/m.db"),
                            ("./mlruns", (tmp_path / "mlruns").as_uri()),
                            ("file:mlruns", (tmp_path / "mlruns").as_uri()),
                            ("http://127.0.0.1:5000", "http://127.0.0.1:5000")):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", given)
        assert tracking.tracking_uri() == absolute, given


class _Client:
    """Records log_batch calls; `fail` makes every call raise, as a server that went away does."""

    def __init__(self, fail: bool = False):
        self.batches, self.fail = [], fail

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        if self.fail:
            raise OSError("connection refused")
        self.batches.append((run_id, list(metrics), list(params), list(tags)))


def _run(client: _Client) -> tracking.Run:
    run = tracking.Run("http://127.0.0.1:9", "7", "run-1")
    run._state["client"] = client
    return run


def test_params_go_in_batches_of_100_and_metrics_leave_out_what_is_not_a_number():
    client = _Client()
    run = _run(client)
    run.log_params({f"k{i}": str(i) for i in range(250)})
    assert [len(params) for _, _, params, _ in client.batches] == [100, 100, 50]
    client.batches.clear()
    run.log_metrics({"loss": 0.5, "step": 4, "accuracy": 1, "done": True, "note": "x"}, step=4)
    ((run_id, metrics, _, _),) = client.batches
    assert run_id == "run-1" and {(m.key, m.value, m.step) for m in metrics} == {("loss", 0.5, 4), ("accuracy", 1.0, 4)}


def test_a_failed_request_warns_once_and_the_run_and_its_children_log_nothing_more(caplog):
    client = _Client(fail=True)
    run = _run(client)
    with caplog.at_level(logging.WARNING, logger="bertray.tracking"):
        run.log_params({"a": "1"})
        client.fail = False  # even once the server is back: this process has stopped logging
        run.log_metrics({"loss": 0.5}, step=1)
        run.child("run-2").set_tags({"best": "yes"})
    assert client.batches == []
    (record,) = caplog.records
    assert "MLflow: could not log params at http://127.0.0.1:9 (connection refused)" in record.getMessage()
    assert "the run goes on" in record.getMessage()


def test_a_run_travels_to_the_workers_without_its_client():
    run = _run(_Client())  # a client of a class defined here: pickling it would fail
    copy = pickle.loads(pickle.dumps(run))
    assert copy.describe() == {"tracking_uri": "http://127.0.0.1:9", "experiment_id": "7", "run_id": "run-1"}
    assert copy._state == {}  # opens its own client when it first logs


def test_unreachable_server_at_start_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = C.load(C.FinetuneConfig, data={"data": {"train": "train.parquet"}, "run": {
        "name": "nowhere", "storage": str(tmp_path), "tracking": "mlflow", "experiment": "bertray-tests"}})
    with pytest.raises(C.ConfigError, match="run.tracking: cannot use the MLflow tracking server at http://127"):
        trainer.start_run(cfg, "finetune", {"train": {"source": "x", "rows": 1, "sha256": "0"}})

"""bertray.tracking without an MLflow server: a config as params, the tracking URI every process agrees on, the
models:/ URIs (their syntax, a registry that does not answer), and a Run, against a real MLflow SQLite store, that
logs everything in requests MLflow accepts, travels without its client and stops logging after its first failed
request. What a server adds is tested against a real `mlflow server` in tests/integration/test_mlflow.py."""
from __future__ import annotations

import logging
import pickle

import pytest

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


def test_a_registry_that_does_not_answer_is_one_line_naming_the_uri_and_server(monkeypatch, tmp_path):
    # A real request to a port nothing listens on (the registry's own behaviour is tested against a real
    # `mlflow server` in tests/integration/test_mlflow.py).
    port = free_ports(1)[0]
    monkeypatch.setenv("BERTRAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(modeling.ModelError) as exc:
        tracking.model_dir("models:/m/3")
    says = str(exc.value)
    assert says.startswith(f"models:/m/3: cannot use the MLflow registry at http://127.0.0.1:{port}: ") and \
        "\n" not in says, says
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


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


@pytest.fixture()
def store(tmp_path):
    """A real MLflow store (SQLite, in this process: no server) with one experiment and two runs:
    (tracking URI, client, experiment id, run id, another run id)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("unit", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client, exp, client.create_run(exp).info.run_id, client.create_run(exp).info.run_id


def test_more_params_than_one_request_takes_all_arrive_and_metrics_leave_out_what_is_not_a_number(store):
    uri, client, exp, run_id, _ = store
    run = tracking.Run(uri, exp, run_id)
    run.log_params({f"k{i}": str(i) for i in range(250)})  # MLflow refuses more than 100 in one request
    run.log_metrics({"loss": 0.5, "step": 4, "accuracy": 1, "done": True, "note": "x"}, step=4)
    data = client.get_run(run_id).data
    assert data.params == {f"k{i}": str(i) for i in range(250)}
    assert data.metrics == {"loss": 0.5, "accuracy": 1.0}
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [4]


def test_a_failed_request_warns_once_and_the_run_and_its_children_log_nothing_more(store, caplog):
    uri, client, exp, run_id, other = store
    run = tracking.Run(uri, exp, "no-such-run")
    with caplog.at_level(logging.WARNING, logger="bertray.tracking"):
        run.log_params({"a": "1"})
        run.child(other).set_tags({"best": "yes"})  # a run that exists: still nothing, this process has stopped
        run.log_metrics({"loss": 0.5}, step=1)
    assert "best" not in client.get_run(other).data.tags
    (record,) = caplog.records
    assert f"MLflow: could not log params at {uri} (" in record.getMessage()
    assert "the run goes on" in record.getMessage()


def test_a_run_travels_to_the_workers_without_its_client(store):
    uri, client, exp, run_id, _ = store
    run = tracking.Run(uri, exp, run_id)
    run.set_tags({"opened": "a client"})
    assert "client" in run._state
    copy = pickle.loads(pickle.dumps(run))
    assert copy.describe() == {"tracking_uri": uri, "experiment_id": exp, "run_id": run_id}
    assert copy._state == {}  # opens its own client when it first logs
    copy.set_tags({"from": "a copy"})
    assert {"opened", "from"} <= set(client.get_run(run_id).data.tags)


def test_unreachable_server_at_start_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = C.load(C.FinetuneConfig, data={"data": {"train": "train.parquet"}, "run": {
        "name": "nowhere", "storage": str(tmp_path), "tracking": "mlflow", "experiment": "bertray-tests"}})
    with pytest.raises(C.ConfigError, match="run.tracking: cannot use the MLflow tracking server at http://127"):
        trainer.start_run(cfg, "finetune", {"train": {"source": "x", "rows": 1, "sha256": "0"}})

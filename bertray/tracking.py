"""MLflow tracking and model registry: `run.tracking: mlflow`.

A fine-tuning or pretraining run is one MLflow run: the driver starts it (the resolved config as params) when the
run claims its folder, rank 0 of the workers logs every progress and evaluation metric at its optimizer step, and
the driver ends it with the artifacts, the exported model and, with `run.register_as`, a new registered model
version. A sweep is a parent run with one child run per trial (TrialRuns, a Ray Tune callback on the driver).

The server is MLFLOW_TRACKING_URI (unset: MLflow's local default, made absolute so every process of this machine
finds the same store). Once a run has started, tracking never stops training: the first request that fails logs a
warning and that process logs nothing more; the run's metrics.json and artifacts are written as always.

`model_dir` resolves `models:/NAME/VERSION` and `models:/NAME@ALIAS` to a local folder for `modeling.resolve`.
Callers import this module only when a run is tracked or a models:/ URI is given, and it imports MLflow only when
it talks to a server: each takes a second or two to import.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from ray.tune import Callback  # TrialRuns is one; Ray Tune pickles a sweep's callbacks by reference

from bertray import storage
from bertray.config import ConfigError, to_dict

log = logging.getLogger(__name__)

RUN_FILE = "mlflow.json"  # in the run folder: which MLflow run it is, so a resumed run goes on logging there
MODELS = "models:/"
_MODEL_URI = re.compile(r"models:/([^/@]+)(?:/(\d+)|@([^/@]+))/?$")
# A Tune result's bookkeeping, not the trial's metrics.
_TUNE_KEYS = {"step", "planned_steps", "epoch", "best", "training_iteration", "time_this_iter_s", "time_total_s",
              "timestamp", "pid", "time_since_restore", "iterations_since_restore", "timesteps_total", "episodes_total",
              "timesteps_since_restore", "done"}


def _mlflow():
    # MLflow retries a failed request for minutes by default (it expects rate limits); a training run should notice
    # a server that went away in seconds, warn and go on. Settings already in the environment win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    import mlflow

    return mlflow


def _client(uri: str):
    return _mlflow().MlflowClient(uri, registry_uri=os.environ.get("MLFLOW_REGISTRY_URI") or uri)


def _errors() -> tuple[type, ...]:
    import requests
    from mlflow.exceptions import MlflowException

    return MlflowException, requests.RequestException, OSError


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or MLflow's default; a local store as an absolute path (Ray workers run elsewhere)."""
    uri = _mlflow().get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if "://" not in uri and not uri.startswith("databricks"):
        return Path(uri.removeprefix("file:")).resolve().as_uri()
    return uri


class Run:
    """An MLflow run that bertray logs to. Picklable (rank 0 of the workers gets it in its loop config); each
    process opens its own client, and stops logging after its first failed request (warning once)."""

    def __init__(self, tracking_uri: str, experiment_id: str, run_id: str):
        self.tracking_uri, self.experiment_id, self.run_id = tracking_uri, experiment_id, run_id
        self._state: dict = {}  # the client, and whether a request failed; shared with child runs

    def __getstate__(self) -> dict:
        return self.describe()

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def child(self, run_id: str) -> "Run":
        """Another run on the same client, which stops with this one (a sweep's trials)."""
        run = Run(self.tracking_uri, self.experiment_id, run_id)
        run._state = self._state
        return run

    def describe(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def client(self):
        if "client" not in self._state:
            self._state["client"] = _client(self.tracking_uri)
        return self._state["client"]

    def call(self, what: str, fn):
        """fn(client), or None once a request has failed: then a warning, and the run goes on untracked."""
        if self._state.get("failed"):
            return None
        try:
            return fn(self.client())
        except _errors() as exc:
            self._state["failed"] = True
            log.warning("MLflow: could not %s at %s (%s); this process logs nothing more to MLflow, and the run "
                        "goes on (its metrics are still written to metrics.json)", what, self.tracking_uri,
                        _first_line(exc))
            return None

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step or 0)) for k, v in metrics.items()
                 if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.call("log metrics", lambda c: c.log_batch(self.run_id, metrics=batch))

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a request
            self.call("log params", lambda c, part=items[i:i + 100]: c.log_batch(self.run_id, params=part))

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.call("set tags", lambda c: c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def log_files(self, uris: list[str], artifact_path: str | None = None) -> None:
        """Files local or remote (a run folder on S3), as artifacts under `artifact_path`."""
        def log_file(client, uri: str, tmp: str) -> None:
            local = uri if not storage.is_remote(uri) else os.path.join(tmp, uri.rstrip("/").rsplit("/", 1)[-1])
            if local != uri:
                Path(local).write_bytes(storage.read_bytes(uri))
            client.log_artifact(self.run_id, local, artifact_path)

        with tempfile.TemporaryDirectory(prefix="bertray-mlflow-") as tmp:
            for uri in uris:
                if storage.exists(uri):
                    self.call(f"log {uri.rsplit('/', 1)[-1]}", lambda c, u=uri: log_file(c, u, tmp))

    def log_json(self, name: str, obj) -> None:
        with tempfile.TemporaryDirectory(prefix="bertray-mlflow-") as tmp:
            path = os.path.join(tmp, name)
            Path(path).write_text(json.dumps(obj, indent=2, default=str))
            self.call(f"log {name}", lambda c: c.log_artifact(self.run_id, path))

    def log_model(self, model_uri: str, register_as: str | None, tags: dict) -> str | None:
        """Log the exported model folder as the artifact 'model'; with `register_as`, register it as a new model
        version (once per run: a re-run of a finished run does not add another). Returns its models:/ URI."""
        self.call("log the model", lambda c: c.log_artifacts(self.run_id, str(storage.local_dir(model_uri)), "model"))
        if not register_as:
            return None
        version = self.call("register the model", lambda c: self._register(c, register_as, tags))
        return None if version is None else f"{MODELS}{register_as}/{version}"

    def _register(self, client, name: str, tags: dict) -> str:
        from mlflow.exceptions import MlflowException

        for mv in client.search_model_versions(f"run_id='{self.run_id}'"):
            if mv.name == name:
                return mv.version
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(self.run_id).info.artifact_uri}/model"
        tags = {k: str(v) for k, v in tags.items()}
        return client.create_model_version(name, source, run_id=self.run_id, tags=tags).version

    def end(self, status: str = "FINISHED") -> None:
        self.call("end the run", lambda c: c.set_terminated(self.run_id, status))

    def finish(self, files: list[str], model_uri: str | None, metrics: dict, register_as: str | None = None,
               report: dict | None = None, tags: dict | None = None) -> dict:
        """End the run: `metrics` (the best values), `files` and `report` as artifacts, the model (registered with
        `metrics` as its version's tags). Returns what to record of it."""
        self.log_metrics(metrics)
        self.set_tags(tags or {})
        self.log_files(files)
        if report:
            self.log_json("data_report.json", report)
        registered = self.log_model(model_uri, register_as, metrics) if model_uri else None
        self.end("FINISHED")
        if registered:
            log.info("MLflow: registered the model as %s", registered)
        return {**self.describe(), **({"registered": registered} if registered else {})}

    def tag_trial(self, trial_id: str, tags: dict) -> None:
        """Tag the child run of one trial of this sweep (e.g. the best one)."""
        runs = self.call("find a trial's run", lambda c: c.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`bertray.trial` = '{trial_id}'"))
        for r in runs or []:
            self.child(r.info.run_id).set_tags(tags)

    def fail(self, reason: str) -> None:
        self.set_tags({"bertray.failure": reason[:5000]})
        self.end("FAILED")


# --------------------------------------------------------------------------------------------------- runs


def start(cfg, stage: str, rdir: str, fingerprint: dict) -> Run:
    """Start (or, for a resumed run, continue) the MLflow run of the run in `rdir`, with the config as params.
    A server that cannot be reached is a ConfigError: better now than after the run."""
    uri = tracking_uri()
    saved = _saved(rdir)
    try:
        client = _client(uri)
        run = _continued(client, saved) if saved and saved.get("tracking_uri") == uri else None
        if run is None:
            experiment_id = _experiment(client, cfg.run.experiment)
            created = client.create_run(experiment_id, run_name=cfg.run.name, tags={
                "bertray.stage": stage, "bertray.run_dir": rdir, "bertray.fingerprint": fingerprint["fingerprint"],
                "bertray.data_sha256": fingerprint["data_sha256"]})
            run = Run(uri, experiment_id, created.info.run_id)
            storage.write_text(storage.join(rdir, RUN_FILE), json.dumps(run.describe(), indent=2))
            known: set = set()
        else:
            known = set(client.get_run(run.run_id).data.params)
            client.update_run(run.run_id, status="RUNNING")
    except _errors() as exc:
        raise ConfigError([f"run.tracking: cannot use the MLflow tracking server at {uri} ({_first_line(exc)}); "
                           "start it or set MLFLOW_TRACKING_URI, or set run.tracking=none"], "tracking") from None
    # A resumed run keeps the params it started with: MLflow refuses to change one, and only keys that do not change
    # what is trained (trainer.RESUMABLE_KEYS) may differ.
    run.log_params({k: v for k, v in params(to_dict(cfg)).items() if k not in known})
    log.info("MLflow: run %s in experiment %r at %s", run.run_id, cfg.run.experiment, uri)
    return run


def attached(cfg, rdir: str) -> Run | None:
    """The MLflow run `start` began for the run in `rdir`, or None when the run is not tracked."""
    if cfg.run.tracking != "mlflow" or not (saved := _saved(rdir)):
        return None
    return Run(saved["tracking_uri"], saved["experiment_id"], saved["run_id"])


def params(config: dict) -> dict[str, str]:
    """A config as MLflow params: dotted keys, JSON values (strings as they are), within MLflow's length limit."""
    out = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and v and prefix + k != "search.space":
                walk(v, f"{prefix}{k}.")
            else:
                text = v if isinstance(v, str) else json.dumps(v, default=str)
                out[prefix + k] = text[:6000]

    walk(config, "")
    return out


def _saved(rdir: str) -> dict | None:
    path = storage.join(rdir, RUN_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def _continued(client, saved: dict) -> Run | None:
    """The saved run, if the server still has it (a store that was reset or a deleted run starts a new one)."""
    from mlflow.exceptions import MlflowException

    try:
        info = client.get_run(saved["run_id"]).info
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return Run(saved["tracking_uri"], info.experiment_id, info.run_id) if info.lifecycle_stage == "active" else None


def _experiment(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage != "active":
        raise ConfigError([f"run.experiment: MLflow experiment {name!r} is deleted; restore it (mlflow experiments "
                           "restore) or choose another name"], "tracking")
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as exc:  # created by a run starting beside this one
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


# --------------------------------------------------------------------------------------------------- sweeps


class TrialRuns(Callback):
    """A Ray Tune callback (on the driver) giving each trial a child run of the sweep's run: the trial's sampled
    values as params, every report's metrics at its optimizer step, FINISHED or FAILED at the end. Its state (which
    trial has which run) is saved with the sweep, so a resumed sweep goes on logging to the same runs."""

    def __init__(self, parent: Run):
        self.parent = parent
        self.runs: dict[str, str] = {}  # trial id -> MLflow run id

    def get_state(self) -> dict:
        return {"runs": dict(self.runs)}

    def set_state(self, state: dict) -> None:
        self.runs = dict(state.get("runs") or {})

    def _run(self, trial) -> Run | None:
        if trial.trial_id not in self.runs:
            created = self.parent.call("start a trial's run", lambda c: c.create_run(
                self.parent.experiment_id, run_name=f"trial-{trial.trial_id}",
                tags={"mlflow.parentRunId": self.parent.run_id, "bertray.trial": trial.trial_id}))
            if created is None:
                return None
            self.runs[trial.trial_id] = created.info.run_id
            self.parent.child(created.info.run_id).log_params(params(dict(trial.config)))
        return self.parent.child(self.runs[trial.trial_id])

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if (run := self._run(trial)) is not None:
            run.log_metrics({k: v for k, v in result.items() if k not in _TUNE_KEYS}, result.get("step"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        if (run := self._run(trial)) is not None:
            run.end("FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        if (run := self._run(trial)) is not None:
            run.end("FAILED")


# --------------------------------------------------------------------------------------------------- registry in


def model_dir(uri: str) -> Path:
    """A local folder holding the registered model `models:/NAME/VERSION` or `models:/NAME@ALIAS`: downloaded once
    per machine and version into bertray's model cache (a version's files never change)."""
    from bertray.modeling import ModelError

    m = _MODEL_URI.match(uri)
    if not m:
        raise ModelError(f"{uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    name, version, alias = m.groups()
    tracker = tracking_uri()
    cache = storage.model_cache()

    def target(v: str) -> Path:
        return cache / ("mlflow-" + hashlib.sha256(f"{tracker}|{name}|{v}".encode()).hexdigest()[:16])

    if version and (target(version) / ".complete").exists():
        return target(version)
    client = _client(tracker)
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        out = target(mv.version)
        if not (out / ".complete").exists():
            tmp = Path(tempfile.mkdtemp(dir=cache))
            got = Path(_mlflow().artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp / "dl"),
                                                              tracking_uri=tracker))
            got.rename(tmp / "model")
            (tmp / "model" / ".complete").write_text(f"{uri} -> {mv.source}")
            try:
                (tmp / "model").rename(out)
            except OSError:  # another process of this machine won the race; its copy is as good
                pass
            shutil.rmtree(tmp, ignore_errors=True)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise ModelError(f"{uri}: no such registered model version in the MLflow registry at {tracker} (set "
                             "MLFLOW_TRACKING_URI to the server that holds it)") from None
        raise ModelError(f"{uri}: cannot use the MLflow registry at {tracker}: {_first_line(exc)}") from None
    except _errors() as exc:  # the server cannot be reached, or the download failed
        raise ModelError(f"{uri}: cannot use the MLflow registry at {tracker}: {_first_line(exc)}") from None
    return out


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]

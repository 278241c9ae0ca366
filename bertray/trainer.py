"""Driver side of training, shared by pretraining, fine-tuning and sweeps: name the run and claim its folder,
build the Ray `TorchTrainer`, then export the best checkpoint and write the run's artifacts."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from bertray import checkpoint as ckpt_io
from bertray import metrics as M
from bertray import runtime, storage
from bertray.config import ConfigError, to_dict
from bertray.train_loop import Objective, TrainingDiverged, train_loop_per_worker

log = logging.getLogger(__name__)

RUN_FILE = "run.json"  # what the run in a folder was started with: its config and data fingerprints
# Keys a re-run may change and still resume: where the run lives and runs, its retry budget, its CPUs and its
# progress lines, none of which changes what is trained (a sweep keeps the retry budget it started with). The data
# paths are left out because the data itself is fingerprinted: by content (fine-tuning) or file listing (pretraining).
RESUMABLE_KEYS = ("run.name", "run.storage", "run.overwrite", "run.ray_address", "run.max_failures",
                  "run.cpus_per_worker", "run.tracking", "run.experiment", "run.register_as", "train.log_every",
                  "data.train", "data.validation", "search.resume_failed", "search.keep_train_state")


class RunConflict(ConfigError):
    """The run folder holds another run: one line saying what differs and how to start afresh."""

    def __init__(self, message: str):
        self.errors = [message]
        ValueError.__init__(self, message)


def run_dir(cfg) -> str:
    return storage.join(cfg.run.storage if storage.is_remote(cfg.run.storage) else os.path.abspath(cfg.run.storage),
                        cfg.run.name)


# --------------------------------------------------------------------------------------------------- run identity


def start_run(cfg, stage: str, data: dict):
    """Name the run and claim its folder, before Ray Train starts; returns `cfg` with `run.name` set.

    A run is its stage, its config less RESUMABLE_KEYS, and `data` (from labeled_data or files_part). Without a
    run.name it is named `<stage>-<first 8 hex digits of that fingerprint>`: the same command finds its folder
    again, other settings or data get another. A folder holding the same run resumes it; one holding another run,
    or files but no RUN_FILE, is refused in one line, unless run.overwrite empties it first."""
    _check_gpus(cfg)
    fp = fingerprint(cfg, stage, data)
    if cfg.run.name is None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=f"{stage}-{fp['fingerprint'][:8]}"))
    rdir = run_dir(cfg)
    path = storage.join(rdir, RUN_FILE)
    fresh = "; start a new one with --set run.name=NAME, or pass --overwrite to replace it"
    if cfg.run.overwrite and storage.exists(rdir):
        log.warning("run.overwrite: deleting %s to start afresh", rdir)
        storage.delete(rdir)
    elif storage.exists(path):
        before = json.loads(storage.read_text(path))
        if before.get("fingerprint") == fp["fingerprint"]:
            log.info("run %s: same settings and data as when it started; resuming", rdir)
            _start_tracking(cfg, stage, rdir, fp)
            return cfg
        raise RunConflict(f"{rdir} already holds {describe_difference(before, fp)}{fresh}")
    elif _holds_files(rdir):
        raise RunConflict(f"{rdir} holds files but no {RUN_FILE} (a run of an older bertray, or no run at all), so "
                          f"whether it is this run is unknown{fresh}")
    fp["config"] = to_dict(cfg)  # with the name it was given
    storage.write_text(path, json.dumps(fp, indent=2, default=str))
    log.info("run %s: new", rdir)
    _start_tracking(cfg, stage, rdir, fp)
    return cfg


def _start_tracking(cfg, stage: str, rdir: str, fp: dict) -> None:
    if cfg.run.tracking == "mlflow":
        from bertray import tracking  # only then: MLflow is slow to import

        tracking.start(cfg, stage, rdir, fp)


def tracked_run(cfg):
    """The MLflow run of this run (bertray.tracking.Run), or None when the run is not tracked."""
    if cfg.run.tracking != "mlflow":
        return None
    from bertray import tracking

    return tracking.attached(cfg, run_dir(cfg))


def _check_gpus(cfg) -> None:
    """Ray Train would wait, and time out again and again, for GPUs the cluster does not have: refuse first."""
    if not cfg.run.use_gpu:
        return
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus < cfg.run.num_workers:
        raise ConfigError([f"run.use_gpu: {cfg.run.num_workers} worker(s) need a GPU each, and the Ray cluster has "
                           f"{gpus:g}; drop --use-gpu, or lower run.num_workers"], "cluster")


def fingerprint(cfg, stage: str, data: dict) -> dict:
    """What makes two runs the same run: {stage, fingerprint, config_sha256, data_sha256, data, config}."""
    config = to_dict(cfg)
    config_sha, data_sha = _sha(_run_settings(config)), _sha(_content(data))
    return {"stage": stage, "fingerprint": _sha({"stage": stage, "config": config_sha, "data": data_sha}),
            "config_sha256": config_sha, "data_sha256": data_sha, "data": data, "config": config}


def labeled_data(train, val) -> dict:
    """A classifier run's data: every text and label id trained and validated on, and the class names."""
    return {"train": _rows_part(train), "validation": _rows_part(val), "classes": list(train.label_names)}


def files_part(source: str, files: list[str]) -> dict:
    """A file listing's fingerprint (paths, sizes, modification times) without reading any data. One listing per
    folder, not a request per file, which on S3 would cost a round trip each."""
    import pyarrow.fs as pafs

    fs, _ = storage.filesystem(files[0])
    paths = [storage.filesystem(f)[1] for f in files]
    infos = {}
    for folder in dict.fromkeys(p.rsplit("/", 1)[0] for p in paths):
        infos.update((i.path, i) for i in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)))
    missing = [p for p in paths if p not in infos]
    infos.update((i.path, i) for i in (fs.get_file_info(missing) if missing else []))
    h = hashlib.sha256()
    for f, p in zip(files, paths):
        h.update(f"{f}\t{infos[p].size}\t{infos[p].mtime_ns}\n".encode())
    return {"source": source, "files": len(files), "bytes": sum(infos[p].size or 0 for p in paths),
            "sha256": h.hexdigest()}


def describe_difference(before: dict, now: dict) -> str:
    """What a run recorded in RUN_FILE differs in, e.g. 'a run with other settings (optim.lr: 5e-05 -> 3e-05)'."""
    if before.get("stage") != now["stage"]:
        return f"a {before.get('stage')} run, not a {now['stage']} one"
    old, new = _run_settings(before.get("config") or {}), _run_settings(now["config"])
    old_data, new_data = before.get("data") or {}, now["data"]
    old_content, new_content = _content(old_data), _content(new_data)
    what, details = [], []
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k, "unset") != new.get(k, "unset")]
    if changed:
        what.append("other settings")
        details += [f"{k}: {_short(old.get(k, 'unset'))} -> {_short(new.get(k, 'unset'))}" for k in changed]
    changed = [k for k in dict.fromkeys([*new_data, *old_data]) if old_content.get(k) != new_content.get(k)]
    if changed:
        what.append("other training data")
        details += [_data_change(k, old_data.get(k), new_data.get(k)) for k in changed]
    if not what:
        return "a run fingerprinted differently (by another bertray version)"
    if len(details) > 6:
        details = details[:5] + [f"{len(details) - 5} more"]
    return f"a run with {' and '.join(what)} ({'; '.join(details)})"


def _data_change(key: str, a, b) -> str:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return f"{key}: {_short(a)} then, {_short(b)} now"
    if a.get("source") != b.get("source"):
        return f"{key}: {a.get('source')} with {_size(a)} then, {b.get('source')} with {_size(b)} now"
    if _size(a) != _size(b):
        return f"{key}: {b['source']}, {_size(a)} then, {_size(b)} now"
    return f"{key}: {b['source']}, other content in the same {_size(b)}"


def _size(part: dict) -> str:
    return f"{part['rows']:,} rows" if "rows" in part else f"{part.get('files', 0):,} files of {part.get('bytes', 0):,} bytes"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _run_settings(config: dict) -> dict:
    """The flattened config a run is identified by: all of it but RESUMABLE_KEYS, as JSON would store it."""
    flat = _flatten(json.loads(json.dumps(config, default=str)))
    return {k: v for k, v in flat.items() if k not in RESUMABLE_KEYS}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        # search.space values are themselves dicts of distributions: compare them whole.
        if isinstance(v, dict) and v and prefix + k != "search.space":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _content(data: dict) -> dict:
    """`data` without where it was read from: moved data is the same data."""
    return {k: {f: x for f, x in v.items() if f != "source"} if isinstance(v, dict) else v for k, v in data.items()}


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _rows_part(part) -> dict:
    h = hashlib.sha256()
    for t in [*part.texts, *(part.pairs or [])]:
        # Length-prefixed, so no two lists of texts hash alike; surrogatepass, so a lone surrogate still hashes.
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little") + b)
    labels = np.asarray(part.labels, dtype=np.int64)
    h.update(labels.tobytes() + (str(labels.shape).encode() if labels.ndim > 1 else b""))
    return {"source": part.report["source"], "rows": len(part.texts), "sha256": h.hexdigest()}


def _holds_files(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri)
    return bool(fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


def torch_trainer_cls(dashboard: bool | None = None):
    """Ray Train's TorchTrainer; on a cluster without a dashboard, one that leaves out the placement-group cleaner.

    Ray Train 2.60 starts a detached cleaner per run that polls the State API for the controller's liveness, and
    the State API lives in the dashboard. A local `ray.init` here runs without one (it costs ~2 s and ~900 MB on a
    small machine), so the cleaner could never work and would print "Failed to query Ray Train Controller actor
    state" every second of the run (190 lines in `make demo`). What it would do, removing the workers' placement
    group if the controller dies, cannot be done without the State API in any case; Ray still removes a dead
    job's placement groups. `_create_default_callbacks` is private Ray API: without it (another Ray), this is
    plain TorchTrainer."""
    from ray.train.torch import TorchTrainer

    if dashboard is None:
        from ray._private.worker import get_dashboard_url

        dashboard = bool(get_dashboard_url())
    if dashboard or not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return without_pg_cleaner(super()._create_default_callbacks())

    return LocalTorchTrainer


def without_pg_cleaner(callbacks: list) -> list:
    return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]


def build_trainer(cfg, objective: Objective, callbacks: tuple = (), name: str | None = None,
                  storage_uri: str | None = None, datasets: dict | None = None):
    """A TorchTrainer running the shared loop; re-running with the same name and storage resumes."""
    import ray.train

    TorchTrainer = torch_trainer_cls()
    uri = storage_uri or cfg.run.storage
    if storage.is_remote(uri):
        # Hand Ray the same filesystem bertray uses, so AWS_ENDPOINT_URL and region settings agree.
        fs, path = storage.filesystem(uri)
        storage_kwargs = {"storage_path": path, "storage_filesystem": fs}
    else:
        storage_kwargs = {"storage_path": os.path.abspath(uri)}
    # Rank 0 logs the run's metrics to MLflow as it trains. A sweep's data-parallel trials (named by their trial)
    # report to Tune instead, whose callback logs each trial as a child run.
    tracker = tracked_run(cfg) if name is None else None
    # Ray Train's controller unpickles train_loop_config, and unpickling the objective would import torch's and
    # transformers' model code there too; behind an object reference only the workers load it (BENCHMARKS.md,
    # "Ray Train start-up").
    quiet = not runtime.verbose()
    payload = ray.put({"cfg": cfg, "objective": objective, "session": "train", "tracker": tracker, "quiet": quiet})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"sealed": payload},
        datasets=datasets,  # Ray Data streams (pretraining); each worker reads its shard
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=name or cfg.run.name,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute=objective.metric,
                checkpoint_score_order=objective.mode),
            callbacks=list(callbacks),
            # Ray Train's own INFO lines (worker-group start, every checkpoint's path) stay in its log files
            # unless -v: the console shows bertray's progress lines.
            logging_config=ray.train.LoggingConfig(log_level="WARNING" if quiet else "INFO"),
            **storage_kwargs,
        ),
    )


def best_checkpoint(result, metric: str, mode: str):
    """(checkpoint, metrics) with the best `metric` among those Ray kept."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    if not candidates:
        if result.checkpoint is None:
            raise RuntimeError("training reported no checkpoint")
        return result.checkpoint, result.metrics or {}
    pick = max if mode == "max" else min
    return pick(candidates, key=lambda cm: cm[1][metric])


def export_run(cfg, result, objective: Objective, out_uri: str | None = None) -> dict:
    """Export the best checkpoint as `<run dir>/model` and write metrics.json, curves.png and (for
    classifiers) confusion_matrix.png beside it. Returns the run summary."""
    rdir = run_dir(cfg)
    tracker = tracked_run(cfg)
    if diverged := getattr(result, "return_value", None):  # the loop's message (train_loop.Loop.run)
        if tracker is not None:
            tracker.fail(diverged)
        raise TrainingDiverged(f"{rdir}: {diverged}")
    out_uri = out_uri or storage.join(rdir, "model")
    best, best_metrics = best_checkpoint(result, objective.metric, objective.mode)
    with tempfile.TemporaryDirectory(prefix="bertray-export-") as tmp:
        best_dir = best.to_directory(os.path.join(tmp, "best"))
        meta = json.loads((Path(best_dir) / ckpt_io.META_FILE).read_text())
        last_meta = meta
        if result.checkpoint is not None and result.checkpoint.path != best.path:
            last_dir = result.checkpoint.to_directory(os.path.join(tmp, "last"))
            last_meta = json.loads((Path(last_dir) / ckpt_io.META_FILE).read_text())
        history = last_meta.get("history", [])
        # An adapter run exports its model merged (model/) and its adapter alone (adapter/).
        adapter_uri = storage.join(rdir, "adapter") if meta.get("adapter") else None
        ckpt_io.export(best_dir, out_uri, extra_meta={"history": history, "best_step": meta.get("step"),
                                                      "final_step": last_meta.get("step")}, adapter_uri=adapter_uri)
        summary = {
            "model": out_uri,
            **({"adapter": adapter_uri} if adapter_uri else {}),
            "run_dir": rdir,
            "metric": objective.metric,
            "best_step": meta.get("step"),
            "final_step": last_meta.get("step"),
            "total_steps": last_meta.get("total_steps"),
            "stopped_early": bool((result.metrics or {}).get("stopped_early")),
            "metrics": meta.get("metrics", {}),
            "final_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
            "worker_nodes": last_meta.get("worker_nodes", []),
            "resumed_at": last_meta.get("resumed_at", []),
            "data_report": meta.get("data_report"),
            # The held-out metrics before training, where the objective measures them (masked-LM).
            **({"initial_metrics": meta["initial_metrics"]} if "initial_metrics" in meta else {}),
            **({"mlflow": tracker.describe()} if tracker is not None else {}),
        }
        _write_artifacts(rdir, summary, history, meta, objective, tmp)
    if tracker is not None:
        if "initial_metrics" in summary:  # measured before the first step
            tracker.log_metrics(summary["initial_metrics"], step=0)
        files = [storage.join(rdir, f) for f in ("metrics.json", "curves.png", "confusion_matrix.png", "per_label.png",
                                                 RUN_FILE)]
        summary["mlflow"] = tracker.finish(files, summary["model"], _best(summary), register_as=cfg.run.register_as,
                                           report=summary.get("data_report"))
    return summary


def _best(summary: dict) -> dict:
    """The best checkpoint's metrics as the run's headline numbers (MLflow's run table, a model version's tags)."""
    best = {f"best_{k}": v for k, v in summary["metrics"].items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {**best, "best_step": summary["best_step"]}


def _write_artifacts(rdir: str, summary: dict, history: list, meta: dict, objective: Objective, tmp: str) -> None:
    storage.write_text(storage.join(rdir, "metrics.json"), json.dumps(summary, indent=2, default=str))
    plot_metric = "perplexity" if objective.kind == "mlm" else objective.metric
    curves = M.plot_curves(history, os.path.join(tmp, "curves.png"), plot_metric)
    storage.write_bytes(storage.join(rdir, "curves.png"), curves.read_bytes())
    m = meta.get("metrics", {})
    if "confusion_matrix" in m:
        cm = M.plot_confusion(m["confusion_matrix"], m["labels"], os.path.join(tmp, "cm.png"),
                              title=f"validation, step {meta.get('step')}")
        storage.write_bytes(storage.join(rdir, "confusion_matrix.png"), cm.read_bytes())
    elif "per_class" in m:  # multi-label: no confusion matrix; a bar per label instead
        bars = M.plot_per_label(m["per_class"], os.path.join(tmp, "per_label.png"),
                                title=f"validation, step {meta.get('step')} (tuned thresholds)")
        storage.write_bytes(storage.join(rdir, "per_label.png"), bars.read_bytes())

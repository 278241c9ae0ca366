"""Driver side of training, shared by pretraining, fine-tuning and sweeps: build the Ray `TorchTrainer`,
then export the best checkpoint and write the run's artifacts."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from bertray import checkpoint as ckpt_io
from bertray import metrics as M
from bertray import storage
from bertray.train_loop import Objective, train_loop_per_worker

log = logging.getLogger(__name__)


def run_dir(cfg) -> str:
    return storage.join(cfg.run.storage if storage.is_remote(cfg.run.storage) else os.path.abspath(cfg.run.storage),
                        cfg.run.name)


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
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "objective": objective, "session": "train"},
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
        ckpt_io.export(best_dir, out_uri, extra_meta={"history": history, "best_step": meta.get("step"),
                                                      "final_step": last_meta.get("step")})
        summary = {
            "model": out_uri,
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
        }
        _write_artifacts(rdir, summary, history, meta, objective, tmp)
    return summary


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

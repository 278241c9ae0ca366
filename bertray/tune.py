"""Hyperparameter sweeps with Ray Tune: `run(cfg)`.

A trial is the ordinary fine-tuning loop (`train_loop`, session 'tune') on a copy of the config with the trial's
sampled values in place; a sweep adds only a search space (YAML), a search algorithm and a scheduler. Data is
read and checked once on the driver and reaches every trial through the object store.

Everything lands in <run.storage>/<run.name>/: Tune's experiment state (re-running the same command resumes
without re-running finished trials), trials.md and trials.csv (every trial), <metric>_vs_<key>.png for each
swept number, learning_curves.png, summary.json, and best-model/ (the best trial's best checkpoint, a normal
bertray checkpoint for `bertray label` and `bertray serve`). Once a sweep has finished, the trials' checkpoints
lose their optimizer state (search.keep_train_state) and keep their weights.

A sweep file is a fine-tuning config plus a `search` section (defaults and rules: config.SearchConfig):

    # bertray tune --config sweep.yaml [--gpus-per-trial 0.25] [--cpus-per-trial 2]
    data: {train: s3://bucket/sst2/train.parquet, validation: s3://bucket/sst2/validation.parquet}
    train: {epochs: 3}
    run: {name: sst2-sweep, storage: s3://bucket/sweeps}
    search:
      algorithm: grid                 # grid | random | optuna
      scheduler: asha                 # none | asha | pbt
      space:
        optim.lr: {grid: [1.0e-2, 5.0e-3, 2.0e-3, 1.0e-3, 5.0e-4]}
        train.batch_size: {grid: [16, 24, 32, 48, 64]}
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bertray import checkpoint as ckpt_io
from bertray import finetune, modeling, runtime, storage, trainer
from bertray.config import ConfigError, FinetuneConfig, TuneConfig, parse_space, planned_trials
from bertray.data import DataError
from bertray.metrics import mode_of
from bertray.train_loop import TrainingDiverged

log = logging.getLogger(__name__)

# A trial that ends below its planned steps without early stopping was stopped by ASHA (or PBT's cut-off).
FINISHED, STOPPED, PATIENCE, FAILED, INTERRUPTED = ("finished", "stopped early (scheduler)",
                                                    "stopped early (patience)", "failed", "interrupted")
# Failures that running the trial again would repeat: bad input or settings, a model that cannot load, a loss that
# is no longer finite. Tune retries a failed trial run.max_failures times, which is meant for lost processes and
# nodes; a trial that failed this way leaves its reason in its folder, and a retry ends on it at once.
_FINAL = (ConfigError, DataError, modeling.ModelError, TrainingDiverged)
FINAL_ERROR = "final_error.txt"


@dataclass
class SweepData:
    """What every trial shares: object-store references to the data read once on the driver."""
    train_ref: object
    val_ref: object
    label_names: list[str]
    report: dict


def run(cfg: TuneConfig) -> dict:
    """Run (or resume) the sweep, write the trial table and plots, export the best model; return the summary."""
    import ray

    runtime.check_shared_storage(cfg.run.storage, "run.storage")
    concurrency = _concurrency(cfg)
    finetune.check_model(cfg.model)  # a base or adapter that cannot be used fails here, not in every trial
    train, val = finetune.load_splits(cfg.trial_base())
    cfg = trainer.start_run(cfg, "sweep", trainer.labeled_data(train, val))
    base = _absolute(cfg.trial_base())  # with the run's name, under which the trials' Ray Train runs are stored
    # Tokenized once for every trial, unless trials change how texts are tokenized: then each trial does its own.
    retokenize = any(k in ("model.base", "model.max_length", "model.truncation", "model.long_text", "model.chunk_overlap",
                           "model.train_windows") for k in parse_space(cfg.search.space)[0])
    train_ref, val_ref = (ray.put(finetune.ingest(part, base.model, training, keep_texts=retokenize))
                          for part, training in ((train, True), (val, False)))
    data = SweepData(train_ref, val_ref, train.label_names, {"train": train.report, "validation": val.report})
    # Built on the driver only for its metric and mode; each trial builds its own from the trial's config.
    objective = finetune.ClassificationObjective(base, data.train_ref, data.val_ref, data.label_names, data.report)
    log.info("sweep %s: %s search, scheduler %s, up to %d trial(s) at once; %d train / %d validation rows",
             cfg.run.name, cfg.search.algorithm, cfg.search.scheduler, concurrency, len(train.texts), len(val.texts))
    tuner = _setup_tuner(cfg, base, data, objective.metric, objective.mode, concurrency)
    grid = tuner.fit()
    summary = summarize(cfg, grid, objective.metric, objective.mode)
    if summary["interrupted"]:
        raise KeyboardInterrupt  # the CLI says how to resume
    if (parent := trainer.tracked_run(cfg)) is not None:
        _finish_tracking(cfg, parent, summary)
    return summary


def _absolute(base: FinetuneConfig) -> FinetuneConfig:
    """`base` with its local paths made absolute: Tune runs each trial in a working folder of its own, where a
    relative run.storage or model.base would name another place."""
    if not storage.is_remote(base.run.storage):
        base.run.storage = os.path.abspath(base.run.storage)
    base.model.base = _absolute_if_local(base.model.base)
    return base


def _absolute_if_local(model: str) -> str:
    """A local model folder's absolute path; a hub id or remote folder as it is."""
    return os.path.abspath(model) if os.path.exists(model) else model


def _finish_tracking(cfg: TuneConfig, parent, summary: dict) -> None:
    """End the sweep's MLflow run: the best trial tagged (here and on its own run), the table, plots and best
    model attached (registered with run.register_as)."""
    best = summary["best"]
    rdir = summary["run_dir"]
    if best is not None:
        parent.tag_trial(best["trial"], {"bertray.best": "true"})
    files = [storage.join(rdir, f) for f in ("trials.csv", "trials.md", "summary.json")] + summary["plots"]
    metrics = {} if best is None else {f"best_{summary['metric']}": best["value"], "best_step": best["step"]}
    summary["mlflow"] = parent.finish(files, summary["model"], metrics, register_as=cfg.run.register_as,
                                      tags={} if best is None else {"bertray.best_trial": best["trial"]})


def prune_train_state(rdir: str, failed_trials: list[str]) -> dict:
    """Delete `train_state.pt` (optimizer moments, scheduler, RNG) from the trial checkpoints of a finished sweep.

    It is there only to resume a trial, and after the sweep nothing resumes one except a retry of a failed trial
    (search.resume_failed), so failed trials keep theirs. Weights, tokenizer and metadata stay: any trial can still
    be evaluated, used for labeling or exported. AdamW keeps two moments per weight, so the state is about twice the
    weights' size: two thirds of a sweep's checkpoint bytes."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(rdir)
    # A trial's files sit under trial-<id>/ (one process per trial) or train-runs/<id>/ (data-parallel trials).
    keep = {_trial_folder(t) for t in failed_trials} | set(failed_trials)
    files = nbytes = 0
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        if info.type != pafs.FileType.File or info.base_name != ckpt_io.TRAIN_STATE:
            continue
        if keep & set(info.path[len(root):].split("/")):
            continue
        fs.delete_file(info.path)
        files, nbytes = files + 1, nbytes + (info.size or 0)
    return {"files": files, "bytes": nbytes}


# --------------------------------------------------------------------------------------------------- trials


def _trial(params: dict, *, base: FinetuneConfig, data: SweepData) -> None:
    """One trial: the shared loop on `base` with this trial's values. The objective is built here, from the
    trial's own config, because it reads batch size, max length and the like from its config."""
    from bertray.train_loop import _apply_overrides, train_loop_per_worker

    import ray.tune

    mark = storage.join(trainer.run_dir(base), _trial_folder(ray.tune.get_context().get_trial_id()), FINAL_ERROR)
    if storage.exists(mark):
        raise RuntimeError(storage.read_text(mark))
    try:
        cfg = _apply_overrides(base, params)
        objective = finetune.ClassificationObjective(cfg, data.train_ref, data.val_ref, data.label_names, data.report)
        if cfg.run.num_workers == 1:
            train_loop_per_worker({"cfg": cfg, "objective": objective, "session": "tune"})
        else:
            _distributed_trial(cfg, objective)
    except _FINAL as exc:
        # Raised over an I/O error (a model that could not be fetched, storage that did not answer): may pass.
        if not isinstance(exc.__context__, OSError):
            try:
                storage.write_text(mark, str(exc))
            except OSError as write_error:  # the trial's own reason matters more than the note of it
                log.warning("could not record why trial %s failed (%s); a retry will run it again", mark, write_error)
        raise


def _distributed_trial(cfg: FinetuneConfig, objective) -> None:
    """A data-parallel trial: a Ray Train run whose reports TuneReportCallback forwards to Tune. Its checkpoints
    stay in Ray Train's storage (Tune sees their paths), and re-running the trial resumes the Train run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    finetune.check_model(cfg.model)  # here, once, rather than in each worker and each of Ray Train's restarts
    trial_id = ray.tune.get_context().get_trial_id()
    result = trainer.build_trainer(cfg, objective, callbacks=(TuneReportCallback(),), name=trial_id,
                                   storage_uri=storage.join(trainer.run_dir(cfg), "train-runs")).fit()
    if diverged := getattr(result, "return_value", None):  # the loop's message: the trial fails, the sweep goes on
        raise TrainingDiverged(diverged)


def _trial_end(trial_id: str, result: dict) -> bool:
    """A Tune stop condition: a trial ends at its last planned step (the loop reports its own plan) or once it
    stopped early (patience).

    Needed with PBT: PBT pauses trials at each perturbation and resumes them from a checkpoint, and a trial resumed
    at its end reports its state once more (the loop's 'report the restored state' path), which PBT would pause
    again, for ever."""
    return bool(result.get("stopped_early")) or result.get("step", 0) >= result.get("planned_steps", math.inf)


def _forget_final_errors(rdir: str) -> None:
    """Remove the failure notes of the sweep's trials (one listing of the sweep folder, one request per trial)."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(rdir)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith(_trial_folder("")):
            storage.delete(storage.join(rdir, info.base_name, FINAL_ERROR))  # a no-op where there is none


def _trial_dirname(trial) -> str:
    # Tune's default names a trial folder after its config, which with dotted keys gets long and unreadable.
    return _trial_folder(trial.trial_id)


def _trial_folder(trial_id: str) -> str:
    return f"trial-{trial_id}"


# --------------------------------------------------------------------------------------------------- tuner


def _setup_tuner(cfg: TuneConfig, base: FinetuneConfig, data: SweepData, metric: str, mode: str, concurrency: int):
    from ray import tune

    s = cfg.search
    # CheckpointConfig(num_to_keep) makes Tune snapshot the experiment state every few trial checkpoints, by design,
    # and warn each time it does: 67 identical three-line warnings in a 12-trial sweep. Read when the tuner starts;
    # Tune's warning about a slow snapshot stays.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    trainable = tune.with_parameters(_trial, base=base, data=data)
    # A data-parallel trial only coordinates; its Ray Train workers hold the CPUs and GPUs. Tune refuses an empty
    # resource request, and even a sliver of a CPU would keep a worker group that needs every CPU from starting.
    trainable = tune.with_resources(trainable, {"memory": 1} if s.workers_per_trial > 1 else
                                    {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    rdir = trainer.run_dir(cfg)
    fs, exp_path = storage.filesystem(rdir)
    fs_arg = fs if storage.is_remote(rdir) else None
    # trainer.start_run has checked that the sweep in this folder, if any, is this sweep.
    if tune.Tuner.can_restore(exp_path, storage_filesystem=fs_arg):
        log.info("resuming the sweep at %s (finished trials are kept, unfinished ones continue from their last "
                 "checkpoint%s)", rdir, ", failed ones are retried" if s.resume_failed else "")
        if s.resume_failed:  # asked for: every failed trial gets its retry
            _forget_final_errors(rdir)
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                  resume_errored=s.resume_failed, restart_errored=False, storage_filesystem=fs_arg)
    space, _ = parse_space(s.space)  # already checked when the config was loaded
    keep = cfg.run.keep_checkpoints
    # The scheduler may compare trials on another metric than the one that ranks them. Tune then takes each metric
    # from its own user: the scheduler's from the scheduler, the ranking one from the search algorithm, and none
    # from TuneConfig (Tune refuses a metric set in both places).
    sched_metric = s.scheduler_metric or metric
    split = s.scheduler != "none" and sched_metric != metric
    sched = (sched_metric, mode_of(sched_metric)) if split else (None, None)
    if s.scheduler == "pbt":
        # A weak trial restores a strong one's latest checkpoint a little later; keep enough that it still exists.
        keep = max(keep, 4)
    return tune.Tuner(
        trainable,
        param_space=_param_space(space, s.algorithm),
        tune_config=tune.TuneConfig(
            metric=None if split else metric, mode=None if split else mode,
            num_samples=1 if s.algorithm == "grid" else s.num_samples,
            search_alg=_search_alg(cfg, concurrency, (metric, mode) if split else (None, None)),
            scheduler=_scheduler(cfg, space, *sched),
            # Reusing a trial's process skips re-importing torch and transformers for every trial.
            reuse_actors=s.workers_per_trial == 1, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=cfg.run.name, storage_path=exp_path.rsplit("/", 1)[0], storage_filesystem=fs_arg,
            # A failed trial is recorded in the table; the sweep goes on.
            failure_config=tune.FailureConfig(max_failures=cfg.run.max_failures, fail_fast=False),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=keep, checkpoint_score_attribute=metric,
                                                    checkpoint_score_order=mode),
            stop=_trial_end if s.scheduler == "pbt" else None,
            callbacks=_callbacks(cfg),
            verbose=1),
    )


def _callbacks(cfg: TuneConfig) -> list:
    """With run.tracking: mlflow, one child run of the sweep's MLflow run per trial (bertray.tracking.TrialRuns:
    Ray's MLflowLoggerCallback logs at Tune's iteration, not the optimizer step, and a server gone away would fail
    the sweep)."""
    parent = trainer.tracked_run(cfg)
    if parent is None:
        return []
    from bertray.tracking import TrialRuns

    return [TrialRuns(parent)]


def _param_space(space: dict, algorithm: str) -> dict:
    from ray import tune

    out = {}
    for key, (kind, values) in space.items():
        if key == "model.base":  # as _absolute: trials open their base from a working folder of their own
            values = [_absolute_if_local(v) for v in values]
        if kind == "grid" or (kind == "choice" and algorithm == "grid"):
            out[key] = tune.grid_search(values)
        elif kind == "choice":
            out[key] = tune.choice(values)
        elif kind == "loguniform":
            out[key] = tune.loguniform(*values)
        elif kind == "uniform":
            out[key] = tune.uniform(*values)
        else:  # randint: ours includes hi, Tune's excludes it
            out[key] = tune.randint(values[0], values[1] + 1)
    return out


def _search_alg(cfg: TuneConfig, concurrency: int, metric_mode: tuple = (None, None)):
    """The search algorithm, which also caps concurrency: Optuna should not propose more trials than can run,
    since each later proposal learns from the earlier trials' results. `metric_mode`: set only when TuneConfig
    does not carry the ranking metric (the scheduler uses another one)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    seed = cfg.train.seed
    if cfg.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        metric, mode = metric_mode
        return ConcurrencyLimiter(OptunaSearch(metric=metric, mode=mode, seed=seed), max_concurrent=concurrency)
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=seed)


def _scheduler(cfg: TuneConfig, space: dict, metric: str | None = None, mode: str | None = None):
    """ASHA counts time in epochs trained (the loop reports a fractional `epochs` at each evaluation); PBT in
    evaluations (one Tune iteration = one evaluation of the loop). `metric`/`mode`: given only when the scheduler
    compares another metric than TuneConfig's (search.scheduler_metric)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = cfg.search
    if s.scheduler == "asha":
        # Epochs, not Tune iterations: a batch-32 trial evaluating every N steps has seen twice the data of a
        # batch-16 one at the same report count, and a rung comparing them would favour the larger batch.
        # max_t only places the top rung; trials end on their own schedule first, so an upper bound is enough.
        # Tune places rungs at grace x factor^k and reaches one when the reported epochs are >= it; in floats
        # 0.1 x 3 is 0.30000000000000004, above the 0.3 a trial reports at step 3 of 10, which would judge it an
        # evaluation late. Rungs a billionth lower are reached where they should be.
        return ASHAScheduler(time_attr="epochs", metric=metric, mode=mode, grace_period=s.grace_period * (1 - 1e-9),
                             reduction_factor=s.reduction_factor, max_t=10_000)
    if s.scheduler == "pbt":
        mutations = {}
        for key in s.pbt_keys:
            kind, values = space[key]
            mutations[key] = (values if kind in ("choice", "grid") else
                              tune.loguniform(*values) if kind == "loguniform" else tune.uniform(*values))
        return PopulationBasedTraining(time_attr="training_iteration", metric=metric, mode=mode,
                                       perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=mutations, synch=s.pbt_synch, log_config=True)
    return FIFOScheduler()


def _concurrency(cfg: TuneConfig) -> int:
    """Trials that fit on the cluster at once (or search.max_concurrent_trials)."""
    import ray

    s = cfg.search
    res = ray.cluster_resources()
    per = s.workers_per_trial
    fits = int(res.get("CPU", 0) // (s.cpus_per_trial * per)) if s.cpus_per_trial else 10**6
    if s.gpus_per_trial:
        fits = min(fits, int(res.get("GPU", 0) // (s.gpus_per_trial * per)))
    if fits < 1:
        raise ConfigError([f"search: one trial needs {per} x ({s.cpus_per_trial} CPU, {s.gpus_per_trial} GPU) but the "
                           f"cluster has {res.get('CPU', 0)} CPU and {res.get('GPU', 0)} GPU"], "resources")
    return min(fits, s.max_concurrent_trials) if s.max_concurrent_trials else fits


# --------------------------------------------------------------------------------------------------- results


def summarize(cfg: TuneConfig, grid, metric: str, mode: str) -> dict:
    """The trial table (Markdown + CSV), plots, summary.json and the best model, all under the sweep folder."""
    rdir = trainer.run_dir(cfg)
    space, _ = parse_space(cfg.search.space)
    keys = list(space)
    # Interrupted: trials left unfinished, or (searchers create trials lazily) not all of them created yet.
    interrupted = grid.num_terminated + grid.num_errors < max(len(grid), planned_trials(cfg.search, space))
    rows, curves = [], {}
    for result in grid:
        row, curve = _trial_row(result, keys, metric, mode, interrupted)
        rows.append(row)
        curves[row["trial"]] = curve
    # Best first; trials that never reported the metric (failed at start) last.
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: (r["best"] is None, sign * (r["best"] or 0.0)))
    best_row = rows[0] if rows and rows[0]["best"] is not None else None
    with tempfile.TemporaryDirectory(prefix="bertray-sweep-") as tmp:
        _write_table(rdir, rows, keys, metric)
        plots = _write_plots(rdir, rows, curves, space, metric, Path(tmp))
        model_uri = None
        if best_row is not None and not interrupted:
            model_uri = _export_best(cfg, grid, best_row, metric, mode, rdir, Path(tmp))
    pruned = None
    if not interrupted and not cfg.search.keep_train_state:
        pruned = prune_train_state(rdir, [r["trial"] for r in rows if r["status"] == FAILED])
        log.info("removed the optimizer state of %d trial checkpoint(s), %.1f MB; their weights stay "
                 "(search.keep_train_state: true keeps it)", pruned["files"], pruned["bytes"] / 1e6)
    counts = {s: sum(r["status"] == s for r in rows) for s in (FINISHED, STOPPED, PATIENCE, FAILED, INTERRUPTED)}
    summary = {
        "run_dir": rdir,
        "metric": metric,
        "mode": mode,
        "trials": len(rows),
        "status_counts": {k: v for k, v in counts.items() if v},
        "trial_steps": sum(r["steps"] or 0 for r in rows),
        "best": None if best_row is None else {
            "trial": best_row["trial"], "value": best_row["best"], "step": best_row["best_step"],
            "config": {k: best_row[k] for k in keys}},
        "model": model_uri,
        "table": storage.join(rdir, "trials.md"),
        "plots": plots,
        "interrupted": interrupted,
        **({"pruned": pruned} if pruned is not None else {}),
    }
    storage.write_text(storage.join(rdir, "summary.json"), json.dumps(summary, indent=2, default=str))
    if best_row is not None:
        log.info("best %s %.4f (trial %s, step %s) with %s; %d trial(s), %d trial-steps; table %s%s", metric,
                 best_row["best"], best_row["trial"], best_row["best_step"],
                 ", ".join(f"{k}={best_row[k]}" for k in keys), len(rows), summary["trial_steps"], summary["table"],
                 f"; model exported to {model_uri}" if model_uri else "")
    else:
        log.warning("no trial reported %s; see %s", metric, summary["table"])
    return summary


def _trial_row(result, keys: list[str], metric: str, mode: str, interrupted: bool) -> tuple[dict, list]:
    df = result.metrics_dataframe
    curve = []
    best = best_step = None
    if df is not None and metric in df and "step" in df:
        curve = [(int(s), float(v)) for s, v in zip(df["step"], df[metric]) if v == v]
        if curve:
            pick = max if mode == "max" else min
            best_step, best = pick(curve, key=lambda sv: sv[1])
    m = result.metrics or {}
    steps = int(m["step"]) if "step" in m else None
    total = _planned_steps(result)
    if result.error is not None:
        status = FAILED
    elif m.get("stopped_early"):
        status = PATIENCE
    elif steps is not None and total is not None and steps >= total:
        status = FINISHED
    else:
        status = INTERRUPTED if interrupted else STOPPED
    config = result.config or _read_json(result, "params.json") or {}  # a trial that never reported: from its start
    row = {"trial": _trial_id(result), **{k: config.get(k) for k in keys}, "best": best,
           "best_step": best_step, "steps": steps, "planned_steps": total, "status": status,
           "error": _first_line(result.error)}
    return row, curve


def _trial_id(result) -> str:
    return Path(result.path).name.removeprefix("trial-")


def _planned_steps(result) -> int | None:
    """The trial's planned optimizer steps, from its latest checkpoint (the loop records them there)."""
    meta = _checkpoint_meta(result.checkpoint) if result.checkpoint is not None else None
    if meta is None and result.metrics and result.metrics.get("checkpoint_path"):
        from ray.tune import Checkpoint

        meta = _checkpoint_meta(Checkpoint(result.metrics["checkpoint_path"], result.filesystem))
    return None if meta is None else meta.get("total_steps")


def _checkpoint_meta(checkpoint) -> dict | None:
    return _read_json(checkpoint, ckpt_io.META_FILE)


def _read_json(where, name: str) -> dict | None:
    """A JSON file inside a trial folder or checkpoint (anything with .path and .filesystem), or None."""
    try:
        with where.filesystem.open_input_stream(f"{where.path.rstrip('/')}/{name}") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _first_line(error) -> str:
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    # Ray wraps the trial's exception; its last line names the original error.
    return (lines[-1] if lines else type(error).__name__)[:200]


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}"
    return str(v)


def _write_table(rdir: str, rows: list[dict], keys: list[str], metric: str) -> None:
    cols = ["trial", *keys, "best", "best_step", "steps", "planned_steps", "status", "error"]
    heads = ["trial", *keys, f"best {metric}", "best step", "steps run", "planned steps", "status", "error"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(heads)
    for r in rows:
        w.writerow(["" if r[c] is None else r[c] for c in cols])
    storage.write_text(storage.join(rdir, "trials.csv"), buf.getvalue())
    md = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    md += ["| " + " | ".join(_fmt(r[c]).replace("|", "/") for c in cols) + " |" for r in rows]
    storage.write_text(storage.join(rdir, "trials.md"), "\n".join(md) + "\n")


def _write_plots(rdir: str, rows: list[dict], curves: dict, space: dict, metric: str, tmp: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    out = []
    colors = {FINISHED: "tab:green", STOPPED: "tab:orange", PATIENCE: "tab:blue", FAILED: "tab:red",
              INTERRUPTED: "tab:gray"}
    for key, (kind, values) in space.items():
        pts = [(r[key], r["best"], r["status"]) for r in rows
               if r["best"] is not None and isinstance(r[key], (int, float)) and not isinstance(r[key], bool)]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for status in colors:
            sel = [(x, y) for x, y, s in pts if s == status]
            if sel:
                ax.scatter([x for x, _ in sel], [y for _, y in sel], label=status, color=colors[status])
        if kind == "loguniform" or (key == "optim.lr" and min(x for x, _, _ in pts) > 0):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best validation {metric}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{metric}_vs_{key}.png"
        fig.savefig(tmp / name, dpi=100)
        plt.close(fig)
        storage.write_bytes(storage.join(rdir, name), (tmp / name).read_bytes())
        out.append(storage.join(rdir, name))
    fig, ax = plt.subplots(figsize=(7, 4))
    status = {r["trial"]: r["status"] for r in rows}
    for trial, curve in curves.items():
        if curve:
            ax.plot([s for s, _ in curve], [v for _, v in curve], "o-", ms=3, lw=1, color=colors[status[trial]],
                    alpha=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"learning curves of {len(curves)} trials", fontsize=9)
    ax.legend(handles=[Line2D([], [], color=c, marker="o", label=s) for s, c in colors.items() if s in status.values()],
              fontsize=8)
    fig.tight_layout()
    fig.savefig(tmp / "learning_curves.png", dpi=100)
    plt.close(fig)
    storage.write_bytes(storage.join(rdir, "learning_curves.png"), (tmp / "learning_curves.png").read_bytes())
    return out + [storage.join(rdir, "learning_curves.png")]


def _export_best(cfg: TuneConfig, grid, best_row: dict, metric: str, mode: str, rdir: str, tmp: Path) -> str:
    """Export the best trial's best checkpoint as `<sweep>/best-model`, a normal self-describing checkpoint."""
    result = next(r for r in grid if _trial_id(r) == best_row["trial"])
    if result.best_checkpoints:
        ckpt, _ = trainer.best_checkpoint(result, metric, mode)
    else:  # a data-parallel trial: its checkpoints live in Ray Train's storage, Tune saw their paths
        from ray.tune import Checkpoint

        df = result.metrics_dataframe.dropna(subset=[metric, "checkpoint_path"])
        pick = df[metric].idxmax() if mode == "max" else df[metric].idxmin()
        ckpt = Checkpoint(df.loc[pick, "checkpoint_path"], result.filesystem)
    local = ckpt.to_directory(str(tmp / "best"))
    uri = storage.join(rdir, "best-model")
    ckpt_io.export(local, uri, extra_meta={"sweep": {"name": cfg.run.name, "trial": best_row["trial"],
                                                     "metric": metric, "value": best_row["best"],
                                                     "config": {k: v for k, v in best_row.items()
                                                                if k in cfg.search.space}}})
    return uri

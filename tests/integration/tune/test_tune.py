"""`bertray tune` end to end on the shared local Ray cluster with a tiny random BERT: grid tables, ASHA, PBT,
failed trials, resume after an interrupt, and config errors before any trial starts."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bertray import config as C
from bertray import storage
from bertray import tune as sweep

REPO = Path(__file__).resolve().parents[3]


def _table(run_dir: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_text(storage.join(run_dir, "trials.csv")))))


def _run(cfg: dict) -> dict:
    return sweep.run(C.load(C.TuneConfig, data=cfg))


@pytest.mark.s3
def test_grid_sweep_writes_complete_table_plots_and_best_model(ray_cluster, sweep_config, s3_bucket, tmp_path,
                                                              monkeypatch):
    from bertray.predictor import Predictor

    # storage.local_dir caches remote models by URI alone; an earlier session's model at the same URI would be reused.
    monkeypatch.setenv("BERTRAY_CACHE", str(tmp_path / "cache"))

    cfg = sweep_config({"algorithm": "grid", "space": {
        "optim.lr": {"grid": ["1e-4", 1.0e-3, 1.0e-2]},  # '1e-4' is how YAML reads 1e-4: a string, parsed here
        "train.batch_size": {"grid": [8, 16]}}}, run={"storage": f"{s3_bucket}/sweeps", "name": "grid"})
    summary = _run(cfg)

    run_dir = f"{s3_bucket}/sweeps/grid"
    rows = _table(run_dir)
    assert len(rows) == 6
    assert {(float(r["optim.lr"]), int(r["train.batch_size"])) for r in rows} == {
        (lr, bs) for lr in (1e-4, 1e-3, 1e-2) for bs in (8, 16)}
    assert {r["status"] for r in rows} == {"finished"}
    assert all(r["steps run"] == "4" == r["planned steps"] for r in rows)
    md = storage.read_text(storage.join(run_dir, "trials.md")).splitlines()
    assert len(md) == 2 + 6 and "best accuracy" in md[0]
    for name in ("accuracy_vs_optim.lr.png", "accuracy_vs_train.batch_size.png", "learning_curves.png"):
        assert storage.read_bytes(storage.join(run_dir, name))[:8] == b"\x89PNG\r\n\x1a\n"

    best = max(float(r["best accuracy"]) for r in rows)
    assert summary["best"]["value"] == pytest.approx(best)
    assert summary["status_counts"] == {"finished": 6} and summary["trial_steps"] == 24
    assert summary["model"] == f"{run_dir}/best-model"
    # The exported winner is an ordinary checkpoint: labeling and serving load it as they load any other.
    pred = Predictor(summary["model"])
    assert pred.label_names == ["negative", "positive"]
    assert pred.predict(["a moving, funny film", "dull"]).probs.shape == (2, 2)
    assert pred.meta["sweep"]["trial"] == summary["best"]["trial"]
    assert pred.meta["config"]["optim"]["lr"] == pytest.approx(summary["best"]["config"]["optim.lr"])
    assert pred.meta["config"]["train"]["batch_size"] == summary["best"]["config"]["train.batch_size"]
    assert "search" not in pred.meta["config"]  # a FinetuneConfig: `bertray finetune` can reproduce the winner
    assert not storage.exists(storage.join(summary["model"], "train_state.pt"))
    # The finished sweep dropped every trial checkpoint's optimizer state and kept their weights.
    files = storage.list_files(run_dir)
    weights = [f for f in files if "/checkpoint_" in f and f.endswith("/model.safetensors")]
    assert len({f.split("/trial-")[1].split("/")[0] for f in weights}) == 6, weights
    assert not [f for f in files if f.endswith("/train_state.pt")]
    assert summary["pruned"]["files"] >= 6 and summary["pruned"]["bytes"] > 0
    saved = json.loads(storage.read_text(storage.join(run_dir, "summary.json")))
    assert saved["pruned"] == summary["pruned"]


def test_asha_stops_a_diverging_trial_early(ray_cluster, sweep_config):
    # ASHA's rungs compare validation loss while trials are ranked by accuracy (search.scheduler_metric), so Tune
    # gets the two metrics from two places. lr=5.0 blows the loss up at the first evaluation. Listed last and run
    # two at a time, it reaches ASHA's first rung after the sane trials, so the comparison there is deterministic.
    # Rungs are in epochs: 160 rows at batch 16 are 10 steps an epoch, so evaluations (every 2 steps) come at 0.2,
    # 0.4, 0.6 epochs and the rungs at 0.2, 0.4, 0.8.
    cfg = sweep_config({"algorithm": "grid", "scheduler": "asha", "grace_period": 0.2, "reduction_factor": 2,
                        "scheduler_metric": "loss", "space": {"optim.lr": {"grid": [1.0e-3, 2.0e-3, 5.0e-4, 5.0]}}},
                       train={"metric": "accuracy", "max_steps": 6})
    summary = _run(cfg)

    rows = {float(r["optim.lr"]): r for r in _table(summary["run_dir"])}
    bad = rows[5.0]
    assert bad["status"] == "stopped early (scheduler)", bad
    assert int(bad["steps run"]) < int(bad["planned steps"]) == 6
    assert summary["metric"] == "accuracy" and all(r["best accuracy"] != "" for r in rows.values())
    assert any(r["status"] == "finished" for r in rows.values())
    assert summary["trial_steps"] < 4 * 6


@pytest.fixture(scope="module")
def pbt_sweep(ray_cluster, tiny_bert, sst2_small, tmp_path_factory):
    """Two trials under PBT, perturbing every evaluation; constant lr (no warmup) so logged lrs equal the config's."""
    storage_dir = tmp_path_factory.mktemp("pbt")
    cfg = {
        "model": {"base": tiny_bert, "max_length": 48},
        "data": {"train": str(sst2_small / "train.parquet"), "validation": str(sst2_small / "validation.parquet"),
                 "max_train_rows": 160, "max_validation_rows": 64},
        "optim": {"schedule": "constant", "warmup_steps": 0},
        "train": {"max_steps": 8, "eval_every": 2, "log_every": 1, "batch_size": 16, "metric": "loss"},
        "run": {"name": "pbt", "storage": str(storage_dir), "max_failures": 0},
        "search": {"algorithm": "random", "num_samples": 2, "scheduler": "pbt", "perturbation_interval": 1,
                   "max_concurrent_trials": 2,
                   "space": {"optim.lr": {"loguniform": [1.0e-4, 1.0]}, "optim.weight_decay": {"uniform": [0.0, 0.1]}}},
    }
    return _run(cfg)


@pytest.mark.slow
def test_pbt_exploits_a_better_trial(pbt_sweep):
    run_dir = Path(pbt_sweep["run_dir"])
    # PBT's own log: one line per exploit (weak trial <- strong trial's checkpoint and perturbed config).
    exploits = (run_dir / "pbt_global.txt").read_text().splitlines()
    assert len(exploits) >= 1
    target, source, _, _, old_config, new_config = json.loads(exploits[0])
    assert target != source and old_config != new_config  # a trial took another's weights and a perturbed config
    assert pbt_sweep["trials"] == 2 and pbt_sweep["status_counts"] == {"finished": 2}


@pytest.mark.slow
def test_pbt_perturbed_lr_takes_effect_after_exploit(pbt_sweep):
    run_dir = Path(pbt_sweep["run_dir"])
    trials = sorted(run_dir.glob("trial-*"))
    assert len(trials) == 2
    for trial in trials:
        final_config = json.loads((trial / "result.json").read_text().splitlines()[-1])["config"]
        history = json.loads((sorted(trial.glob("checkpoint_*"))[-1] / "bertray.json").read_text())["history"]
        logged = [h["lr"] for h in history if "lr" in h]
        # The lr a trial trained with at the end must be its final config's, i.e. after PBT's explore step.
        assert logged[-1] == pytest.approx(final_config["optim.lr"], rel=1e-6), (trial.name, logged)


def test_failed_trial_is_recorded_and_the_sweep_goes_on(ray_cluster, sweep_config, tmp_path):
    missing = str(tmp_path / "no-such-model")
    cfg = sweep_config({"algorithm": "grid"})
    cfg["search"]["space"] = {"model.base": {"grid": [cfg["model"]["base"], missing]}}
    summary = _run(cfg)

    rows = {r["model.base"]: r for r in _table(summary["run_dir"])}
    assert rows[missing]["status"] == "failed"
    assert "no-such-model" in rows[missing]["error"]
    assert rows[cfg["model"]["base"]]["status"] == "finished"
    assert summary["status_counts"] == {"finished": 1, "failed": 1}
    assert summary["best"]["config"]["model.base"] == cfg["model"]["base"]


def _tries(trial: str) -> tuple[int, int]:
    """(failures, failures that trained) of a trial, from Tune's error.txt (each failure's traceback)."""
    failures = storage.read_text(storage.join(trial, "error.txt")).split("Failure # ")[1:]
    return len(failures), sum("in _diverged" in f or "in _distributed_trial" in f for f in failures)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_diverged_trial_fails_once_and_the_sweep_goes_on(ray_cluster, sweep_config, workers, tmp_path, monkeypatch):
    """A learning rate no model survives: that trial ends as failed with the loop's one-line reason, in a trial of
    its own process and in a data-parallel one (a Ray Train run inside the trial); the other trial finishes (shown
    once, with single-process trials). Tune's retry (run.max_failures) does not train it again: the loss would
    diverge again. With a relative run.storage (trials run in working folders of their own), and resumed with
    search.resume_failed, which does retry it."""
    monkeypatch.chdir(tmp_path)
    lrs = [1.0e-3, 1.0e30] if workers == 1 else [1.0e30]
    cfg = sweep_config({"algorithm": "grid", "workers_per_trial": workers, "space": {"optim.lr": {"grid": lrs}}},
                       optim={"max_grad_norm": 0}, train={"max_steps": 4, "eval_every": 4, "log_every": 2},
                       run={"name": f"diverged-{workers}", "max_failures": 1, "storage": "runs"})
    summary = _run(cfg)
    assert summary["run_dir"] == str(tmp_path / "runs" / f"diverged-{workers}")
    rows = {float(r["optim.lr"]): r for r in _table(summary["run_dir"])}
    assert rows[1.0e30]["status"] == "failed" and "training diverged" in rows[1.0e30]["error"], rows[1.0e30]
    assert workers > 1 or rows[1.0e-3]["status"] == "finished"
    trial = storage.join(summary["run_dir"], f"trial-{rows[1.0e30]['trial']}")
    assert "training diverged" in storage.read_text(storage.join(trial, sweep.FINAL_ERROR))
    assert _tries(trial) == (2, 1)  # two tries (max_failures 1), only the first trained
    if workers == 1:
        cfg["search"]["resume_failed"] = True
        summary = _run(cfg)
        rows = {float(r["optim.lr"]): r for r in _table(summary["run_dir"])}
        assert rows[1.0e30]["status"] == "failed" and rows[1.0e-3]["status"] == "finished"
        assert _tries(trial) == (3, 2)  # trained once more (Tune keeps counting its failures: no retry after)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "bertray.cli", "tune", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, sweep_config, tmp_path):
    cfg = sweep_config({"algorithm": "grid", "max_concurrent_trials": 1,
                        "space": {"optim.lr": {"grid": [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3]}}},
                       train={"max_steps": 6})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    address = ["--address", ray_cluster.get_runtime_context().gcs_address]
    run_dir = Path(cfg["run"]["storage"]) / "sweep"

    # First attempt: Ctrl-C as soon as Tune reports a finished trial.
    proc = _cli(["--config", str(path), *address])
    first_out, done = [], []
    deadline = time.time() + 240
    for line in proc.stdout:
        first_out.append(line)
        if " completed after " in line and line.strip().startswith("Trial _trial_"):
            done.append(line.split()[1].removeprefix("_trial_"))
            proc.send_signal(signal.SIGINT)
            break
        assert time.time() < deadline, "no trial finished in time:\n" + "".join(first_out[-30:])
    rest, _ = proc.communicate(timeout=120)
    first_out.append(rest)
    assert done, "".join(first_out[-30:])
    assert proc.returncode == 130, "".join(first_out[-30:])
    finished = {t: (run_dir / f"trial-{t}" / "result.json").read_bytes() for t in done}
    interrupted_rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    assert len([r for r in interrupted_rows if r["status"] == "finished"]) < 4

    # Second attempt, same command: resumes, and finished trials are neither started nor re-reported.
    proc = _cli(["--config", str(path), *address])
    second_out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, second_out[-3000:]
    assert "resuming the sweep" in second_out
    for t in done:
        assert f"Trial _trial_{t} started" not in second_out
        assert (run_dir / f"trial-{t}" / "result.json").read_bytes() == finished[t]
    rows = list(csv.DictReader((run_dir / "trials.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}
    # Every trial evaluated each of its steps exactly once across both attempts.
    for r in rows:
        steps = [json.loads(x)["step"] for x in (run_dir / f"trial-{r['trial']}" / "result.json").read_text().splitlines()]
        assert steps == [2, 4, 6], (r["trial"], steps)
    assert (run_dir / "best-model" / "bertray.json").exists()

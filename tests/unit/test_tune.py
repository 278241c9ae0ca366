"""Sweep config validation and the pieces of bertray.tune that need no cluster: search space -> Tune domains,
search algorithms, schedulers, trial rows and the trial table."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from bertray import config as C
from bertray import tune as sweep

BASE = {"data": {"train": "train.parquet"}}


def _load(search: dict, **sections):
    return C.load(C.TuneConfig, data={**BASE, **sections, "search": search})


def _errors(search: dict, **sections) -> list[str]:
    with pytest.raises(C.ConfigError) as exc:
        _load(search, **sections)
    return exc.value.errors


def test_defaults_and_yaml_number_strings():
    cfg = _load({"space": {"optim.lr": {"loguniform": ["1e-5", "1e-3"]}, "train.batch_size": {"choice": [16, 32]},
                           "optim.weight_decay": {"grid": ["1e-2", 0]}}})
    assert cfg.run.name is None and cfg.search.algorithm == "random" and cfg.search.scheduler == "none"
    space, errors = C.parse_space(cfg.search.space)
    assert errors == []
    assert space == {"optim.lr": ("loguniform", [1e-5, 1e-3]), "train.batch_size": ("choice", [16, 32]),
                     "optim.weight_decay": ("grid", [0.01, 0.0])}


def test_trial_base_is_a_finetune_config_sized_by_search():
    cfg = _load({"space": {"optim.lr": {"choice": [1.0e-3]}}, "workers_per_trial": 2, "gpus_per_trial": 1,
                 "cpus_per_trial": 3})
    base = cfg.trial_base()
    assert isinstance(base, C.FinetuneConfig)
    assert (base.run.num_workers, base.run.use_gpu, base.run.cpus_per_worker) == (2, True, 3.0)
    assert base.run.name is None  # named by trainer.start_run


def test_scheduler_metric_needs_a_scheduler():
    errors = _errors({"space": {"optim.lr": {"choice": [1.0e-3]}}, "scheduler_metric": "loss"})
    assert any(e.startswith("search.scheduler_metric: only a scheduler uses it") for e in errors), errors
    errors = _errors({"space": {"optim.lr": {"choice": [1.0e-3]}}, "scheduler": "asha", "scheduler_metric": "ppl"})
    assert any(e.startswith("search.scheduler_metric: expected one of") for e in errors), errors


def test_every_space_problem_is_reported_at_once():
    errors = _errors({"algorithm": "optuna", "space": {
        "optim.lrr": {"loguniform": [1.0e-5, 1.0e-3]},           # typo
        "optim.weight_decay": {"loguniform": [0.0, 0.1]},        # lo must be > 0
        "train.epochs": {"uniform": [3.0, 1.0]},                 # lo >= hi
        "train.batch_size": {"grid": [16, "big"]},               # wrong type, and grid under optuna
        "train.max_steps": {"randint": [1.5, 10]},               # randint of a float
        "model.dropout": {"choice": []},                         # empty
        "optim.adam_eps": {"normal": [0, 1]},                    # unknown kind
        "data.max_train_rows": {"choice": [100, 200]},           # data is read once
        "train.metric": {"choice": ["accuracy", "loss"]},        # ranks the trials
        "model": {"choice": [1]},                                # a section, not a field
        "train.log_every": {"choice": [5, 0]},                   # 0 fails the fine-tuning checks
        "optim.schedule": {"uniform": [0.0, 1.0]},               # a range over a non-float
    }})
    text = "\n".join(errors)
    for expected in [
        "search.space.optim.lrr: unknown config field; did you mean optim.lr",
        "search.space.optim.weight_decay: loguniform needs lo > 0, got 0.0",
        "search.space.train.epochs: uniform needs lo < hi, got [3.0, 1.0]",
        "search.space.train.batch_size: train.batch_size is int, but grid lists 'big'",
        "search.space.train.max_steps: randint needs [lo, hi] as two ints",
        "search.space.model.dropout: choice needs a non-empty list",
        "search.space.optim.adam_eps: expected one of {loguniform: [...]}",
        "search.space.data.max_train_rows: cannot vary per trial: data.* settings hold for the whole sweep",
        "search.space.train.metric: cannot vary per trial: it ranks the trials",
        "search.space.model: unknown config field",
        "search.space.train.log_every: value 0 is not allowed: train.log_every: must be > 0, got 0",
        "search.space.optim.schedule: uniform draws floats but optim.schedule is one of",
    ]:
        assert expected in text, f"missing {expected!r} in:\n{text}"
    assert len(errors) == 12  # the grid-under-optuna rule is not reached: batch_size's grid is itself invalid


def test_two_swept_values_no_trial_could_use_together_stop_the_sweep():
    """Each value is fine against the base; together they are not (all windows need chunked scoring)."""
    space = {"model.train_windows": {"grid": ["one", "all"]}, "model.long_text": {"grid": ["chunk", "truncate"]},
             "optim.lr": {"grid": [1.0e-4, 1.0e-3]}}
    errors = _errors({"algorithm": "grid", "space": space}, model={"long_text": "chunk"})
    assert errors == ["search.space: model.train_windows 'all' with model.long_text 'truncate' is not allowed: "
                      "model.train_windows: 'all' needs model.long_text: chunk (the windows it trains on are the "
                      "ones the checkpoint pools when scoring)"], errors
    _load({"algorithm": "grid", "space": {**space, "model.long_text": {"grid": ["chunk"]}}}, model={"long_text": "chunk"})
    # A value at odds with the base only: fine while the key it clashes with is swept to values it goes with.
    _load({"algorithm": "grid", "space": {"model.train_windows": {"grid": ["all"]},
                                          "model.long_text": {"grid": ["chunk"]}}})
    # A value wrong whatever it is paired with is that value's own problem, said once.
    errors = _errors({"algorithm": "grid", "space": {**space, "train.log_every": {"grid": [5, 0]}}},
                     model={"long_text": "chunk"})
    assert "search.space.train.log_every: value 0 is not allowed: train.log_every: must be > 0, got 0" in errors
    assert len(errors) == 2 and sum("train.log_every" in e for e in errors) == 1, errors


def test_algorithm_and_scheduler_rules():
    text = "\n".join(_errors({"algorithm": "optuna", "scheduler": "pbt", "pbt_keys": ["optim.lr", "train.batch_size"],
                              "space": {"optim.lr": {"loguniform": [1.0e-5, 1.0e-3]},
                                        "train.batch_size": {"grid": [16, 32]}}}))
    assert "search.algorithm: optuna samples, it cannot run the grid of train.batch_size" in text
    assert "search.scheduler: pbt chooses its own configurations and cannot follow optuna" in text
    assert "search.pbt_keys: train.batch_size is not a float setting" in text
    text = "\n".join(_errors({"algorithm": "grid", "space": {"optim.lr": {"loguniform": [1.0e-5, 1.0e-3]}}}))
    assert "search.algorithm: 'grid' cannot enumerate the ranges of optim.lr" in text
    text = "\n".join(_errors({"space": {"optim.lr": {"grid": [1.0e-5, 1.0e-3]}}}))
    assert "search.algorithm: 'random' with only grid keys would run every combination num_samples times" in text
    text = "\n".join(_errors({"scheduler": "pbt", "space": {"optim.lr": {"loguniform": [1.0e-5, 1.0e-3]}}}))
    assert "search.pbt_keys: optim.weight_decay has no distribution in search.space" in text
    text = "\n".join(_errors({"algorithm": "grid", "scheduler": "pbt", "pbt_keys": ["optim.lr"],
                              "space": {"optim.lr": {"grid": [1.0e-3]}}}))
    assert "pbt needs a population of at least 2 trials, this space gives 1" in text
    text = "\n".join(_errors({"space": {}, "reduction_factor": 1, "workers_per_trial": 2, "gpus_per_trial": 0.5,
                              "num_samples": 0}, run={"num_workers": 2}))
    for expected in ["search.space: needs at least one key", "search.reduction_factor: must be > 1",
                     "search.gpus_per_trial: data-parallel trials (workers_per_trial > 1) take whole GPUs",
                     "search.num_samples: must be > 0", "run.num_workers: a sweep sizes its trials with"]:
        assert expected in text
    space = {"optim.lr": {"loguniform": [1.0e-5, 1.0e-3]}}
    text = "\n".join(_errors({"scheduler": "asha", "grace_period": 2, "space": space}, train={"epochs": 2}))
    assert "search.grace_period: ASHA's first rung (2 epochs) is at or past the end of training (train.epochs 2)" in text
    assert _load({"scheduler": "asha", "grace_period": 0.5, "space": space}, train={"epochs": 2}).search.grace_period == 0.5
    # Trained by steps, the epochs are known only once the data is read: no check before.
    assert _load({"scheduler": "asha", "grace_period": 2, "space": space}, train={"max_steps": 100}).search.grace_period == 2


def test_mixed_precision_follows_gpus_per_trial():
    assert "train.mixed_precision" in "\n".join(_errors({"space": {"optim.lr": {"choice": [1.0e-3]}}},
                                                         train={"mixed_precision": "bf16"}))
    _load({"space": {"optim.lr": {"choice": [1.0e-3]}}, "gpus_per_trial": 0.5}, train={"mixed_precision": "bf16"})


def test_param_space_maps_kinds_to_tune_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    space = {"optim.lr": ("loguniform", [1e-5, 1e-3]), "optim.weight_decay": ("uniform", [0.0, 0.1]),
             "train.max_steps": ("randint", [10, 12]), "train.batch_size": ("choice", [16, 32]),
             "model.max_length": ("grid", [64, 128])}
    ps = sweep._param_space(space, "random")
    assert isinstance(ps["optim.lr"], Float) and isinstance(ps["optim.weight_decay"], Float)
    assert isinstance(ps["train.batch_size"], Categorical)
    assert ps["model.max_length"] == {"grid_search": [64, 128]}
    assert isinstance(ps["train.max_steps"], Integer)
    assert {ps["train.max_steps"].sample() for _ in range(200)} == {10, 11, 12}  # our randint includes hi
    # Under algorithm: grid, choice lists are enumerated too.
    assert sweep._param_space({"train.batch_size": ("choice", [16, 32])}, "grid") == {
        "train.batch_size": {"grid_search": [16, 32]}}


def test_search_algorithms_and_schedulers():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    space = {"optim.lr": {"loguniform": [1.0e-5, 1.0e-3]}, "optim.weight_decay": {"choice": [0.0, 0.01]}}
    cfg = _load({"algorithm": "optuna", "space": space})
    alg = sweep._search_alg(cfg, 3)
    assert isinstance(alg, ConcurrencyLimiter) and alg.max_concurrent == 3
    assert type(alg.searcher).__name__ == "OptunaSearch"
    assert isinstance(sweep._search_alg(_load({"space": space}), 2), BasicVariantGenerator)
    parsed, _ = C.parse_space(space)
    assert isinstance(sweep._scheduler(_load({"space": space}), parsed), FIFOScheduler)
    asha = sweep._scheduler(_load({"space": space, "scheduler": "asha", "grace_period": 2, "reduction_factor": 2}), parsed)
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "epochs"
    rungs = [t for t, _ in asha._brackets[0]._rungs][-3:]  # grace x factor^k epochs, top first
    assert rungs == pytest.approx([8, 4, 2], rel=1e-8) and all(r <= x for r, x in zip(rungs, [8, 4, 2]))
    # A rung is reached by the report at exactly its epoch, even where float products overshoot (0.1 x 3 x 3).
    fine = sweep._scheduler(_load({"space": space, "scheduler": "asha", "grace_period": 0.1, "reduction_factor": 3}),
                            parsed)
    assert all(r <= step / 10 for r, step in zip([t for t, _ in fine._brackets[0]._rungs][-3:], [9, 3, 1]))
    asha_on_loss = sweep._scheduler(_load({"space": space, "scheduler": "asha", "scheduler_metric": "loss"}), parsed,
                                    "loss", "min")
    assert (asha_on_loss._metric, asha_on_loss._mode) == ("loss", "min")
    pbt = sweep._scheduler(_load({"space": space, "scheduler": "pbt", "perturbation_interval": 3}), parsed)
    assert isinstance(pbt, PopulationBasedTraining)
    assert pbt._perturbation_interval == 3 and pbt._hyperparam_mutations["optim.weight_decay"] == [0.0, 0.01]


def test_prune_train_state_keeps_weights_and_failed_trials_state(tmp_path):
    files = {
        "trial-a_00000/checkpoint_000000/train_state.pt": 300,
        "trial-a_00000/checkpoint_000000/model.safetensors": 100,
        "trial-a_00000/checkpoint_000001/train_state.pt": 300,
        "trial-b_00001/checkpoint_000000/train_state.pt": 300,  # failed: resume_failed may need it
        "train-runs/c_00002/checkpoint_2026-11-23/train_state.pt": 300,  # a data-parallel trial's Ray Train run
        "train-runs/b_00001/checkpoint_2026-11-23/train_state.pt": 300,
        "best-model/model.safetensors": 100,
        "notes/train_state.pt.bak": 5,  # not a checkpoint's state file
    }
    for rel, size in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * size)
    assert sweep.prune_train_state(str(tmp_path), ["b_00001"]) == {"files": 3, "bytes": 900}
    left = sorted(str(f.relative_to(tmp_path)) for f in tmp_path.rglob("*") if f.is_file())
    assert left == ["best-model/model.safetensors", "notes/train_state.pt.bak",
                    "train-runs/b_00001/checkpoint_2026-11-23/train_state.pt",
                    "trial-a_00000/checkpoint_000000/model.safetensors",
                    "trial-b_00001/checkpoint_000000/train_state.pt"]


def _result(tmp_path, name: str, steps: list[int], values: list[float], total: int | None, lr: float, **metrics):
    from ray.tune import Checkpoint, Result

    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / "params.json").write_text(json.dumps({"optim.lr": lr}))  # Tune writes it as a trial starts
    ckpt = None
    if total is not None:
        d = tmp_path / name / "checkpoint_000000"
        d.mkdir(parents=True)
        (d / "bertray.json").write_text(json.dumps({"total_steps": total}))
        ckpt = Checkpoint.from_directory(str(d))
    df = pd.DataFrame({"step": steps, "accuracy": values}) if steps else None
    # What Tune keeps as a trial's last result: the last report plus the trial's config.
    last = {"step": steps[-1], "accuracy": values[-1], "config": {"optim.lr": lr}} if steps else {}
    error = metrics.pop("error", None)
    return Result(metrics={**last, **metrics}, checkpoint=ckpt, error=error,
                  path=str(tmp_path / name), metrics_dataframe=df)


def test_trial_rows_classify_status(tmp_path):
    keys = ["optim.lr"]
    done = _result(tmp_path, "trial-a_1", [2, 4], [0.6, 0.7], 4, 1e-3)
    cut = _result(tmp_path, "trial-a_2", [2], [0.5], 4, 5.0)
    patience = _result(tmp_path, "trial-a_3", [2, 4], [0.6, 0.55], 8, 1e-4, stopped_early=True)
    failed = _result(tmp_path, "trial-a_4", [], [], None, 1e-2, error=RuntimeError("boom\nValueError: bad base model"))
    rows = {}
    for r in (done, cut, patience, failed):
        row, curve = sweep._trial_row(r, keys, "accuracy", "max", interrupted=False)
        rows[row["trial"]] = (row, curve)
    assert rows["a_1"][0]["status"] == sweep.FINISHED and rows["a_1"][0]["best"] == 0.7
    assert rows["a_1"][0]["best_step"] == 4 and rows["a_1"][1] == [(2, 0.6), (4, 0.7)]
    assert rows["a_2"][0]["status"] == sweep.STOPPED and rows["a_2"][0]["planned_steps"] == 4
    assert rows["a_3"][0]["status"] == sweep.PATIENCE and rows["a_3"][0]["best"] == 0.6
    assert rows["a_4"][0]["status"] == sweep.FAILED and rows["a_4"][0]["error"] == "ValueError: bad base model"
    assert rows["a_4"][0]["optim.lr"] == 1e-2 and rows["a_1"][0]["optim.lr"] == 1e-3
    row, _ = sweep._trial_row(cut, keys, "accuracy", "max", interrupted=True)
    assert row["status"] == sweep.INTERRUPTED


def test_table_markdown_and_csv(tmp_path):
    rows = [{"trial": "a_1", "optim.lr": 1e-3, "best": 0.71234, "best_step": 4, "steps": 4, "planned_steps": 4,
             "status": "finished", "error": ""},
            {"trial": "a_2", "optim.lr": 5.0, "best": None, "best_step": None, "steps": None, "planned_steps": None,
             "status": "failed", "error": "ValueError: a|b"}]
    sweep._write_table(str(tmp_path), rows, ["optim.lr"], "accuracy")
    md = (tmp_path / "trials.md").read_text().splitlines()
    assert md[0] == ("| trial | optim.lr | best accuracy | best step | steps run | planned steps | status | error |")
    assert md[2] == "| a_1 | 0.001 | 0.7123 | 4 | 4 | 4 | finished |  |"
    assert md[3].endswith("| failed | ValueError: a/b |")
    csv_lines = (tmp_path / "trials.csv").read_text().splitlines()
    assert csv_lines[1] == "a_1,0.001,0.71234,4,4,4,finished,"
    assert csv_lines[2] == "a_2,5.0,,,,,failed,ValueError: a|b"


def test_planned_trials():
    space = {"optim.lr": ("grid", [1e-3, 1e-4, 1e-5]), "train.batch_size": ("choice", [16, 32])}
    assert C.planned_trials(C.SearchConfig(algorithm="grid"), space) == 6
    assert C.planned_trials(C.SearchConfig(algorithm="random", num_samples=4), space) == 12
    assert C.planned_trials(C.SearchConfig(algorithm="optuna", num_samples=5), {}) == 5


def test_unknown_field_and_bad_distribution_exit_2_before_any_trial(tmp_path, capsys, monkeypatch):
    import ray
    import yaml

    from bertray import cli

    def no_ray(*a, **k):
        raise AssertionError("ray.init was called for an invalid sweep")

    monkeypatch.setattr(ray, "init", no_ray)
    cfg = {"model": {"base": "embedded"}, "data": {"train": "train.parquet"},
           "run": {"name": "sweep", "storage": str(tmp_path / "runs")},
           "search": {"algorithm": "optuna", "space": {
               "optim.learning_rate": {"loguniform": [1.0e-5, 1.0e-3]},
               "train.batch_size": {"grid": [16, 32]},
               "optim.weight_decay": {"loguniform": [0.0, 0.1]},
               "train.epochs": {"normal": [1, 2]}}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["tune", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "search.space.optim.learning_rate: unknown config field; did you mean optim.lr" in err
    assert "search.space.optim.weight_decay: loguniform needs lo > 0" in err
    assert "search.space.train.epochs: expected one of" in err
    assert "search.algorithm: optuna samples, it cannot run the grid of train.batch_size" in err
    assert not (tmp_path / "runs").exists()

"""Run identity (bertray.trainer.start_run): which re-runs resume, which are refused, and the default run name;
and the TorchTrainer a cluster without a dashboard gets."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray import cli
from bertray import config as C
from bertray import runtime, trainer
from bertray.data import Labeled

TEXTS = ["a fine film", "dull", "witty and warm", "overlong", "moving", "flat"]
LABELS = [1, 0, 1, 0, 1, 0]


def _cfg(tmp_path, name: str | None = "same", **overrides):
    data = {"data": {"train": "train.parquet"}, "run": {"storage": str(tmp_path / "runs")}}
    if name is not None:
        data["run"]["name"] = name
    return C.load(C.FinetuneConfig, data=data, overrides=[f"{k}={v}" for k, v in overrides.items()])


def _data(texts=TEXTS, labels=LABELS, names=("negative", "positive"), source="train.parquet") -> dict:
    train = Labeled(list(texts), np.array(labels), list(names), {"source": source})
    val = Labeled(list(texts[:2]), np.array(labels[:2]), list(names), {"source": source})
    return trainer.labeled_data(train, val)


def _refusal(cfg, data, stage="finetune") -> str:
    with pytest.raises(trainer.RunConflict) as exc:
        trainer.start_run(cfg, stage, data)
    message = str(exc.value)
    assert "\n" not in message
    assert message.endswith("start a new one with --set run.name=NAME, or pass --overwrite to replace it")
    return message


def test_same_config_and_data_resume_and_only_the_first_start_writes_the_run_file(tmp_path):
    cfg = trainer.start_run(_cfg(tmp_path), "finetune", _data())
    path = tmp_path / "runs" / "same" / trainer.RUN_FILE
    saved = json.loads(path.read_text())
    assert saved["config"]["optim"]["lr"] == 5e-05 and saved["data"]["train"]["rows"] == 6  # readable
    mtime = path.stat().st_mtime_ns
    again = trainer.start_run(_cfg(tmp_path), "finetune", _data())
    assert again.run.name == cfg.run.name == "same" and path.stat().st_mtime_ns == mtime


def test_other_training_data_is_refused_naming_the_data(tmp_path):
    trainer.start_run(_cfg(tmp_path), "finetune", _data())
    message = _refusal(_cfg(tmp_path), _data(TEXTS[:4], LABELS[:4]))
    assert message.startswith(f"{tmp_path / 'runs' / 'same'} already holds a run with other training data "
                              "(train: train.parquet, 6 rows then, 4 rows now);")
    assert "other settings" not in message
    # Same row count, one label flipped; then other class names.
    assert "train: train.parquet, other content in the same 6 rows" in _refusal(_cfg(tmp_path), _data(labels=[0] * 6))
    names = _refusal(_cfg(tmp_path), _data(names=("bad", "good")))
    assert "classes: ['negative', 'positive'] then, ['bad', 'good'] now" in names


def test_a_changed_setting_is_refused_naming_the_key(tmp_path):
    trainer.start_run(_cfg(tmp_path), "finetune", _data())
    message = _refusal(_cfg(tmp_path, **{"optim.lr": "3e-5", "model.max_length": 64}), _data())
    assert "already holds a run with other settings (model.max_length: 128 -> 64; optim.lr: 5e-05 -> 3e-05)" in message
    assert "training data" not in message
    assert "a finetune run, not a pretrain one" in _refusal(_cfg(tmp_path), _data(), stage="pretrain")


def test_where_and_how_a_run_executes_may_change_on_resume(tmp_path):
    trainer.start_run(_cfg(tmp_path), "finetune", _data())
    runtime_only = {"run.ray_address": "auto", "run.max_failures": 0, "run.cpus_per_worker": 2, "train.log_every": 1,
                    "data.train": "moved/train.parquet"}  # the data is compared by content, not by path
    cfg = trainer.start_run(_cfg(tmp_path, **runtime_only), "finetune", _data(source="moved/train.parquet"))
    assert cfg.run.max_failures == 0
    a = trainer.fingerprint(_cfg(tmp_path), "finetune", _data())
    b = trainer.fingerprint(_cfg(tmp_path, name="other", **{"run.storage": "s3://b/runs"}), "finetune", _data())
    assert a["fingerprint"] == b["fingerprint"]
    # What shapes training does count: workers (the global batch), seed, evaluation schedule.
    for key, value in {"run.num_workers": 2, "train.seed": 1, "train.eval_every": 5, "data.max_train_rows": 3}.items():
        assert trainer.fingerprint(_cfg(tmp_path, **{key: value}), "finetune", _data())["fingerprint"] != a["fingerprint"], key


def test_default_name_is_the_stage_and_fingerprint_so_unrelated_runs_do_not_collide(tmp_path):
    assert C.FinetuneConfig().run.name is None and C.PretrainConfig().run.name is None
    first = trainer.start_run(_cfg(tmp_path, name=None), "finetune", _data())
    fp = trainer.fingerprint(_cfg(tmp_path, name=None), "finetune", _data())["fingerprint"]
    assert first.run.name == f"finetune-{fp[:8]}"
    assert trainer.start_run(_cfg(tmp_path, name=None), "finetune", _data()).run.name == first.run.name  # resumes
    other_data = trainer.start_run(_cfg(tmp_path, name=None), "finetune", _data(TEXTS[:4], LABELS[:4]))
    other_lr = trainer.start_run(_cfg(tmp_path, name=None, **{"optim.lr": "1e-4"}), "finetune", _data())
    assert len({first.run.name, other_data.run.name, other_lr.run.name}) == 3
    saved = json.loads((tmp_path / "runs" / first.run.name / trainer.RUN_FILE).read_text())
    assert saved["config"]["run"]["name"] == first.run.name
    assert _cfg(tmp_path, name="mine").run.name == "mine"


def test_a_folder_without_a_run_file_is_refused_and_overwrite_empties_it(tmp_path):
    old = tmp_path / "runs" / "same"
    old.mkdir(parents=True)
    (old / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train state of an older bertray's run
    assert f"{old} holds files but no {trainer.RUN_FILE}" in _refusal(_cfg(tmp_path), _data())
    trainer.start_run(_cfg(tmp_path, **{"run.overwrite": "true"}), "finetune", _data())
    assert sorted(os.listdir(old)) == [trainer.RUN_FILE]
    # Overwrite also replaces another run, and an empty folder is a new run.
    trainer.start_run(_cfg(tmp_path, **{"run.overwrite": "true"}), "finetune", _data(TEXTS[:4], LABELS[:4]))
    assert json.loads((old / trainer.RUN_FILE).read_text())["data"]["train"]["rows"] == 4
    (tmp_path / "runs" / "empty").mkdir()
    trainer.start_run(_cfg(tmp_path, name="empty"), "finetune", _data())


def test_run_names_outside_storage_are_refused():
    for name in (".", "..", "", "a/b"):
        with pytest.raises(C.ConfigError, match="run.name: must be a folder name"):
            C.load(C.FinetuneConfig, data={"data": {"train": "t.parquet"}, "run": {"name": name}})


def test_a_sweep_may_change_whether_failed_trials_are_retried_but_not_its_search(tmp_path):
    def sweep(name=None, **search):
        return C.load(C.TuneConfig, data={"data": {"train": "t.parquet"}, "run": {"storage": str(tmp_path), "name": name},
                                          "search": {"space": {"optim.lr": {"loguniform": [1.0e-5, 1.0e-3]}}, **search}})

    first = trainer.start_run(sweep(), "sweep", _data())
    assert first.run.name.startswith("sweep-") and first.trial_base().run.name == first.run.name
    trainer.start_run(sweep(resume_failed=True, keep_train_state=True), "sweep", _data())
    # Tune would restore the sweep's own concurrency limit: say so rather than ignore the new one.
    message = _refusal(sweep(first.run.name, max_concurrent_trials=1), _data(), stage="sweep")
    assert "other settings (search.max_concurrent_trials: None -> 1)" in message


def test_pretraining_data_is_its_file_listing(tmp_path):
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(pa.table({"text": ["x"] * 10}), tmp_path / name)
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    part = trainer.files_part(str(tmp_path), files)
    assert (part["files"], part["bytes"]) == (2, sum(os.path.getsize(f) for f in files))
    assert trainer.files_part(str(tmp_path), files) == part
    pq.write_table(pa.table({"text": ["a longer text"] * 20}), tmp_path / "b.parquet")
    changed = trainer.files_part(str(tmp_path), files)
    assert changed["sha256"] != part["sha256"]
    cfg = C.load(C.PretrainConfig, data={"data": {"train": str(tmp_path)}, "run": {"name": "mlm", "storage": str(tmp_path / "runs")}})
    trainer.start_run(cfg, "pretrain", {"train": part})
    assert (f"(train: {tmp_path}, 2 files of {part['bytes']:,} bytes then, 2 files of {changed['bytes']:,} bytes now)"
            in _refusal(cfg, {"train": changed}, stage="pretrain"))


def test_cli_refuses_a_rerun_with_other_data_in_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BERTRAY_ALLOW_LOCAL_STORAGE", "1")
    monkeypatch.setattr(runtime, "init_ray", lambda address=None: None)
    for n, folder in ((40, "first"), (20, "second")):
        (tmp_path / folder).mkdir()
        pq.write_table(pa.table({"text": [f"text {i}" for i in range(n)], "label": [i % 2 for i in range(n)]}),
                       tmp_path / folder / "train.parquet")
    from bertray import finetune

    first = C.load(C.FinetuneConfig, data={"data": {"train": str(tmp_path / "first" / "train.parquet")},
                                           "run": {"name": "rerun", "storage": str(tmp_path / "runs")}})
    train, val = finetune.load_splits(first)
    trainer.start_run(first, "finetune", trainer.labeled_data(train, val))
    code = cli.main(["finetune", "--set", f"data.train={tmp_path / 'second' / 'train.parquet'}", "--name", "rerun",
                     "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert err.startswith(f"error: {tmp_path / 'runs' / 'rerun'} already holds a run with other training data (train: ")
    assert "36 rows then" in err and "18 rows" in err  # 10% of each train file went to validation
    assert sorted(os.listdir(tmp_path / "runs" / "rerun")) == [trainer.RUN_FILE]


def test_use_gpu_on_a_cluster_without_gpus_is_refused_before_the_folder_is_claimed(tmp_path, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    with pytest.raises(C.ConfigError, match=r"run.use_gpu: 2 worker\(s\) need a GPU each, and the Ray cluster has 0"):
        trainer.start_run(_cfg(tmp_path, **{"run.use_gpu": "true", "run.num_workers": 2}), "finetune", _data())
    assert not (tmp_path / "runs").exists()  # nothing claimed: the same command without --use-gpu starts cleanly
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 2.0})
    trainer.start_run(_cfg(tmp_path, **{"run.use_gpu": "true", "run.num_workers": 2}), "finetune", _data())


def test_trainer_without_a_dashboard_leaves_out_the_placement_group_cleaner():
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from bertray import trainer

    assert trainer.torch_trainer_cls(dashboard=True) is TorchTrainer
    local = trainer.torch_trainer_cls(dashboard=False)
    # If Ray renames the private hook, this fails, instead of the cleaner's warnings silently coming back.
    assert issubclass(local, TorchTrainer) and "_create_default_callbacks" in vars(local)
    kept = object()
    assert trainer.without_pg_cleaner([PlacementGroupCleanerCallback(), kept]) == [kept]


def test_ray_trains_controller_is_handed_a_reference_and_the_workers_what_it_refers_to(tmp_path, monkeypatch):
    """Ray Train's controller unpickles train_loop_config: it gets an object reference, so the stage's config and
    objective (whose classes import the model code) are unpickled only where the loop runs."""
    import ray

    from bertray import train_loop
    from bertray.train_loop import Objective

    from ray.train.torch import TorchTrainer

    cfg, objective, put = _cfg(tmp_path), Objective(), {}
    monkeypatch.setattr(trainer, "torch_trainer_cls", lambda: TorchTrainer)  # asks a running Ray for its dashboard
    monkeypatch.setattr(ray, "put", lambda value: put.setdefault("ref", ("ref", value))[0])
    built = trainer.build_trainer(cfg, objective)
    assert built.train_loop_config == {"sealed": "ref"}
    sealed = put["ref"][1]
    assert sealed["cfg"] is cfg and sealed["objective"] is objective and sealed["session"] == "train"
    # Not verbose (pytest's root logger is at WARNING): Ray Train's own INFO lines stay in its log files.
    assert sealed["quiet"] is True and built.run_config.logging_config.log_level == "WARNING"

    seen = {}
    monkeypatch.setattr(ray, "get", lambda ref: put["ref"][1] if ref == "ref" else None)
    monkeypatch.setattr(train_loop, "Loop", lambda cfg, objective, session, tracker: seen.update(
        cfg=cfg, objective=objective) or type("L", (), {"run": lambda self: "done"})())
    monkeypatch.setattr(train_loop, "_Session", lambda: type("S", (), {"rank": 0, "world": 1, "device": "cpu"})())
    from ray.train.v2._internal.execution import context

    reports = logging.getLogger(context.__file__)  # where Ray Train logs each report's repr
    monkeypatch.setattr(reports, "level", logging.NOTSET)
    assert train_loop.train_loop_per_worker(built.train_loop_config) == "done"
    assert seen == {"cfg": cfg, "objective": objective}
    assert not reports.isEnabledFor(logging.INFO)


def test_verbose_runs_keep_ray_trains_own_lines(tmp_path, monkeypatch, root_log_level):
    import ray
    from ray.train.torch import TorchTrainer

    from bertray.train_loop import Objective

    monkeypatch.setattr(trainer, "torch_trainer_cls", lambda: TorchTrainer)
    put = {}
    monkeypatch.setattr(ray, "put", lambda value: put.setdefault("value", value) and "ref")
    root_log_level(logging.DEBUG)
    built = trainer.build_trainer(_cfg(tmp_path), Objective())
    assert put["value"]["quiet"] is False and built.run_config.logging_config.log_level == "INFO"

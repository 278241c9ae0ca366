"""Typed config: defaults, YAML + --set overrides, and every problem reported at once (exit 2 before Ray)."""
import subprocess
import sys
from pathlib import Path

import pytest

from bertray import cli
from bertray import config as C

REPO = Path(__file__).resolve().parents[2]


def test_yaml_holds_only_differences_and_overrides_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: {train: x.parquet}\noptim: {lr: 1.0e-4}\n")
    cfg = C.load(C.FinetuneConfig, f, ["optim.lr=3e-5", "data.text_columns=[title, body]", "run.use_gpu=false",
                                       "train.max_steps=7", "model.dropout=null"])
    assert cfg.optim.lr == pytest.approx(3e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.data.text_columns == ["title", "body"]
    assert cfg.train.max_steps == 7 and cfg.train.batch_size == 32  # untouched default
    assert cfg.model.dropout is None


def test_every_problem_is_reported_in_one_error(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: {max_lenght: 3, freeze_encoder: true, freeze_layers: 2}\n"
                 "optim: {lr: fast, schedule: exponential}\ntrain: {batch_size: 0, mixed_precision: bf16}\nbogus: 1\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(C.FinetuneConfig, f, ["run.use_gpu=maybe"])
    msg = str(e.value)
    for needle in ["model.max_lenght: unknown key (did you mean 'max_length'?)", "optim.lr: expected float, got 'fast'",
                   "optim.schedule: expected one of", "train.batch_size: must be > 0",
                   "model.freeze_layers: contradicts model.freeze_encoder", "bogus: unknown key",
                   "run.use_gpu: expected bool", "train.mixed_precision: 'bf16' needs run.use_gpu=true",
                   "data.train: required"]:
        assert needle in msg, f"missing {needle!r} in:\n{msg}"
    assert len(e.value.errors) == 9


def test_pretrain_defaults_differ_from_finetune_and_are_checked():
    p = C.load(C.PretrainConfig, data={"data": {"train": "x"}, "train": {"batch_size": 8}})
    assert p.train.max_steps == 1000 and p.train.metric == "loss" and p.train.batch_size == 8
    with pytest.raises(C.ConfigError, match="masked-LM reports only 'loss'"):
        C.load(C.PretrainConfig, data={"data": {"train": "x"}}, overrides=["train.metric=accuracy"])


def test_bad_override_syntax_and_unknown_key():
    with pytest.raises(C.ConfigError) as e:
        C.load(C.FinetuneConfig, data={"data": {"train": "x"}}, overrides=["optim.lr", "optim.nope=1"])
    assert "expected key=value" in str(e.value) and "--set optim.nope: unknown key" in str(e.value)


def test_saved_config_round_trips():
    cfg = C.load(C.FinetuneConfig, data={"data": {"train": "x"}}, overrides=["optim.lr=2e-5"])
    assert C.from_dict(C.FinetuneConfig, C.to_dict(cfg)) == cfg


def test_int8_and_bf16_are_cpu_options_for_labeling_and_serving():
    with pytest.raises(C.ConfigError) as e:
        C.load(C.ServeConfig, data={"model": "m", "quantize": "int8", "gpus_per_replica": 1})
    assert str(e.value).count("quantize: int8 is a CPU option; drop it or set gpus_per_replica=0") == 1
    with pytest.raises(C.ConfigError, match="set gpus_per_actor=0"):
        C.load(C.LabelConfig, data={"model": "m", "input": "i", "output": "o", "quantize": "int8",
                                    "gpus_per_actor": 0.5})
    with pytest.raises(C.ConfigError, match="quantize: expected one of"):
        C.load(C.ServeConfig, data={"model": "m"}, overrides=["quantize=int4"])
    assert C.load(C.ServeConfig, data={"model": "m", "quantize": "int8"}).quantize == "int8"
    with pytest.raises(C.ConfigError, match="quantize: bf16 is a CPU option; drop it or set gpus_per_actor=0"):
        C.load(C.LabelConfig, data={"model": "m", "input": "i", "output": "o", "quantize": "bf16",
                                    "gpus_per_actor": 1})
    assert C.load(C.LabelConfig, data={"model": "m", "input": "i", "output": "o"},
                  overrides=["quantize=bf16"]).quantize == "bf16"


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("demo-*.yaml")), ids=lambda p: p.name)
def test_demo_configs_validate(path):
    assert cli.main(["validate", str(path)]) == 0


def test_cli_exits_2_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    # Other tests in the session may already hold a Ray connection, so "Ray is not
    # initialised" proves nothing here; instead any attempt to start Ray fails the test.
    def no_ray(*a, **k):
        raise AssertionError("ray.init was called for an invalid config")

    monkeypatch.setattr(ray, "init", no_ray)
    f = tmp_path / "bad.yaml"
    f.write_text("data: {train: x.parquet}\ntrain: {epochs: -1}\n")
    assert cli.main(["finetune", "--config", str(f), "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: must be > 0" in err and "run.num_workers: must be > 0" in err
    assert cli.main(["validate", str(f)]) == 2


def test_validate_subprocess_no_traceback(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: [not, a, mapping]\n")
    r = subprocess.run([sys.executable, "-m", "bertray.cli", "validate", str(f)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "model: expected a mapping" in r.stderr


def test_the_regroup_wait_can_be_turned_off_but_not_negative():
    assert C.load(C.ServeConfig, data={"model": "m"}, overrides=["regroup_s_per_caller=0"]).regroup_s_per_caller == 0
    with pytest.raises(C.ConfigError, match="regroup_s_per_caller"):
        C.load(C.ServeConfig, data={"model": "m", "regroup_s_per_caller": -0.001})
    with pytest.raises(C.ConfigError, match="regroup_s_per_caller: must be a number, got nan"):
        C.load(C.ServeConfig, data={"model": "m"}, overrides=["regroup_s_per_caller=nan"])

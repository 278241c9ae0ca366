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


def test_serve_batches_have_a_size_and_no_timers():
    """Batching waits on no timer any more (bertray.batching), so the old timer keys are unknown, not ignored."""
    with pytest.raises(C.ConfigError, match="max_batch_size: must be > 0, got 0"):
        C.load(C.ServeConfig, data={"model": "m", "max_batch_size": 0})
    for key in ("batch_wait_timeout_s", "regroup_s_per_caller"):
        with pytest.raises(C.ConfigError, match=f"{key}: unknown key"):
            C.load(C.ServeConfig, data={"model": "m", key: 0.002})


def test_every_float_setting_must_be_finite_and_all_are_reported_at_once(tmp_path):
    f = tmp_path / "inf.yaml"
    f.write_text("optim:\n  lr: .inf\ntrain:\n  epochs: .inf\nmodel:\n  dropout: .nan\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(C.FinetuneConfig, f, overrides=["optim.warmup_ratio=-inf"])
    msg = str(e.value)
    for key, value in (("optim.lr", "inf"), ("train.epochs", "inf"), ("model.dropout", "nan"),
                       ("optim.warmup_ratio", "-inf")):
        assert f"{key}: must be a finite number, got {value}" in msg, msg


@pytest.mark.parametrize("content,words", [
    (bytes(range(128, 256)), "not a text file (byte 0 is not UTF-8)"),
    (b"optim: [1, 2\n", "not valid YAML at line 2 column 1"),
    (b"optim:\n  lr: 1.0e-5\noptim:\n  lr: 2.0e-5\n", "key 'optim' given twice (first at line 1)"),
    (b"optim:\n  lr: 1.0e-5\n  lr: 2.0e-5\n", "key 'lr' given twice (first at line 2)"),
    (None, "is a folder; give the path of a YAML config file"),
])
def test_unreadable_configs_get_one_line_from_validate_and_every_stage(tmp_path, capsys, content, words):
    from bertray import cli

    path = tmp_path / "c.yaml"
    path.mkdir() if content is None else path.write_bytes(content)
    for argv in (["validate", str(path)], ["validate", "--stage", "label", str(path)],
                 ["finetune", "--config", str(path)], ["label", "--config", str(path)]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 2, (argv, err)


def test_a_shorthand_flag_that_contradicts_a_set_is_refused(capsys):
    from bertray import cli

    assert cli.main(["finetune", "--num-workers", "2", "--set", "run.num_workers=4", "--set", "data.train=x"]) == 2
    assert "--num-workers 2 contradicts --set run.num_workers=4; give one of them" in capsys.readouterr().err
    cfg = cli.build_config("finetune", None, ["run.num_workers=2", "data.train=x"], {"num_workers": "2"})
    assert cfg.run.num_workers == 2  # saying the same thing twice is fine


def test_passthrough_takes_comma_separated_columns():
    from bertray import cli

    cfg = cli.build_config("label", None, [], {"model": "m", "input": "i", "output": "o", "passthrough": "a, b,c"})
    assert cfg.passthrough == ["a", "b", "c"]


def test_predict_refuses_an_empty_text_as_serve_does(capsys):
    from bertray import cli

    assert cli.main(["predict", "unused-model", "fine", "  "]) == 1
    assert capsys.readouterr().err == "error: text 2: empty text\n"


def test_training_on_every_window_needs_chunked_long_texts_and_single_texts():
    data = {"data": {"train": "x"}, "model": {"train_windows": "all"}}
    with pytest.raises(C.ConfigError, match="model.train_windows: 'all' needs model.long_text: chunk"):
        C.load(C.FinetuneConfig, data=data)
    with pytest.raises(C.ConfigError, match="model.train_windows: 'all' does not apply to sentence pairs"):
        C.load(C.FinetuneConfig, data=data, overrides=["model.long_text=chunk", "data.text_pair_column=b"])
    cfg = C.load(C.FinetuneConfig, data=data, overrides=["model.long_text=chunk"])
    assert cfg.model.train_windows == "all" and C.ModelConfig().train_windows == "one"


def test_loading_leaves_the_callers_dict_as_it_was():
    data = {"data": {"train": "x"}, "model": {"max_length": 64}}
    C.load(C.FinetuneConfig, data=data, overrides=["model.max_length=32", "data.text_pair_column=b"])
    assert data == {"data": {"train": "x"}, "model": {"max_length": 64}}

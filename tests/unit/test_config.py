"""Typed config: defaults, YAML + --set overrides, and every problem reported at once; the checks of the LoRA
adapter and of MLflow tracking settings."""
import pytest

from bertray import config as C


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


def test_adapter_settings_are_checked_all_at_once():
    with pytest.raises(C.ConfigError) as e:
        C.load(C.FinetuneConfig, data={"data": {"train": "x"}, "model": {
            "freeze_encoder": True, "adapter": {"kind": "lora", "r": 0, "alpha": -2, "dropout": 1.0, "target": []}}})
    assert e.value.errors == [
        "model.adapter.r: must be > 0, got 0",
        "model.adapter.alpha: must be > 0, got -2",
        "model.adapter.dropout: must be in [0, 1), got 1.0",
        "model.adapter.target: needs module names such as [query, value], got []",
        "model.freeze_encoder: contradicts model.adapter.kind=lora (the base is frozen and the adapter trains); drop one",
    ]
    with pytest.raises(C.ConfigError, match="model.freeze_layers: contradicts model.adapter.kind=lora"):
        C.load(C.FinetuneConfig, data={"data": {"train": "x"}}, overrides=["model.adapter.kind=lora",
                                                                          "model.freeze_layers=2"])
    with pytest.raises(C.ConfigError, match="model.adapter: adapters are for fine-tuning"):
        C.load(C.PretrainConfig, data={"data": {"train": "x"}}, overrides=["model.adapter.kind=lora"])
    cfg = C.load(C.FinetuneConfig, data={"data": {"train": "x"}},
                 overrides=["model.adapter.kind=lora", "model.adapter.r=4", "model.adapter.target=key"])
    assert (cfg.model.adapter.r, cfg.model.adapter.alpha, cfg.model.adapter.target) == (4, 16, ["key"])
    assert C.FinetuneConfig().model.adapter.kind == "none"


def test_rank_and_alpha_are_sweepable_and_each_value_is_checked():
    def sweep(space: dict, kind: str = "lora") -> C.TuneConfig:
        return C.load(C.TuneConfig, data={"data": {"train": "x"}, "model": {"adapter": {"kind": kind}},
                                          "search": {"space": space}})

    cfg = sweep({"model.adapter.r": {"choice": [4, 8, 16]}, "model.adapter.alpha": {"randint": [8, 32]}})
    assert C.parse_space(cfg.search.space) == ({"model.adapter.r": ("choice", [4, 8, 16]),
                                                "model.adapter.alpha": ("randint", [8, 32])}, [])
    with pytest.raises(C.ConfigError) as e:
        sweep({"model.adapter.r": {"choice": [4, 0]}, "model.adapter.alpha": {"uniform": [1, 2]}})
    assert e.value.errors == [
        "search.space.model.adapter.alpha: uniform draws floats but model.adapter.alpha is int; use randint or choice",
        "search.space.model.adapter.r: value 0 is not allowed: model.adapter.r: must be > 0, got 0",
    ]
    with pytest.raises(C.ConfigError, match="model.adapter.r: has no effect without an adapter"):
        sweep({"model.adapter.r": {"choice": [4, 8]}}, kind="none")


def test_tracking_config_is_checked_up_front():
    with pytest.raises(C.ConfigError) as exc:
        C.load(C.FinetuneConfig, data={"data": {"train": "x"}, "run": {"register_as": "a/b"}})
    assert exc.value.errors == ["run.register_as: registering needs run.tracking=mlflow",
                                "run.register_as: must be a model name without '/', '@' or quotes, got 'a/b'"]
    with pytest.raises(C.ConfigError, match="run.experiment: needs a name"):
        C.load(C.FinetuneConfig, data={"data": {"train": "x"}, "run": {"tracking": "mlflow", "experiment": " "}})

"""bertray.cli: the parser, how shorthand flags and --set become a config, which stage a YAML file configures,
and how each kind of failure ends (exit 2 for a config before Ray starts, 1 with one line for a known error,
130 on Ctrl-C)."""
import argparse
import subprocess
import sys

import pytest

from bertray import cli
from bertray import config as C
from bertray import runtime


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


def test_cli_maps_per_trial_flags(tmp_path):
    from bertray import cli

    path = tmp_path / "s.yaml"
    path.write_text("data: {train: t.parquet}\nsearch:\n  space:\n    optim.lr: {loguniform: [1.0e-5, 1.0e-3]}\n")
    cfg = cli.build_config("tune", str(path), ["search.num_samples=3"], {"gpus_per_trial": "0.25", "cpus_per_trial": "2"})
    assert (cfg.search.gpus_per_trial, cfg.search.cpus_per_trial, cfg.search.num_samples) == (0.25, 2.0, 3)
    assert cli.detect_stage(str(path)) == "tune"


def test_predict_refuses_a_text_that_is_not_unicode_in_one_line(tiny_classifier_dir, capsys):
    """Bytes on a command line that are not UTF-8 reach Python as lone surrogates, which the tokenizer raises on."""
    from bertray import cli

    assert cli.main(["predict", tiny_classifier_dir, "fine", "bad \udcff byte"]) == 1
    err = capsys.readouterr().err
    assert err == "error: text 2: not valid Unicode: lone surrogate '\\udcff' at character 4 (its bytes are not UTF-8)\n"


def test_predict_refuses_single_texts_for_a_pair_model_in_one_line(tiny_classifier_dir, tmp_path, capsys):
    import json
    import shutil

    from bertray import cli

    folder = tmp_path / "pairs"
    shutil.copytree(tiny_classifier_dir, folder)
    (folder / "bertray.json").write_text(json.dumps({"kind": "classifier", "text_pair": True}))
    assert cli.main(["predict", str(folder), "only one text"]) == 1
    err = capsys.readouterr().err
    assert "classifies sentence pairs" in err and len(err.strip().splitlines()) == 1


def _positionals() -> list[tuple[str, argparse.Action]]:
    """(subcommand, action) for every positional argument of every subcommand, read from the parser itself."""
    (sub,) = [a for a in cli._parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return [(name, a) for name, p in sub.choices.items() for a in p._actions if not a.option_strings]


# bertray/cli.py gives `validate FILE` no help text (reported, not fixed here); strict, so this fails once it has one.
@pytest.mark.parametrize("command,action", [
    pytest.param(name, a, id=f"{name}-{a.dest}")
    for name, a in _positionals()])
def test_every_positional_argument_has_help_text(command, action):
    assert action.help and action.help.strip(), f"bertray {command} {action.dest.upper()}: no help text"


def test_the_positionals_are_found():
    # The test above is parametrized from the parser: if the walk found nothing, it would pass vacuously.
    assert {"model", "data", "texts", "file"} <= {a.dest for _, a in _positionals()}


# The smallest file of each stage: the section that tells it apart, and what that stage requires.
_STAGE_FILES = {
    "tune": "data: {train: t.parquet}\nsearch:\n  space:\n    optim.lr: {choice: [1.0e-5, 3.0e-5]}\n",
    "pretrain": "data: {train: corpus/}\nmlm: {probability: 0.2}\n",
    "label": "model: runs/demo/model\ninput: corpus/\noutput: labeled/\n",
    "serve": "model: runs/demo/model\nport: 8001\n",
    "finetune": "data: {train: t.parquet}\noptim: {lr: 3.0e-5}\n",
}


@pytest.mark.parametrize("stage", _STAGE_FILES)
def test_validate_detects_the_stage_a_file_configures_and_says_which(tmp_path, capsys, stage):
    path = tmp_path / "c.yaml"
    path.write_text(_STAGE_FILES[stage])
    assert cli.detect_stage(str(path)) == stage
    assert cli.main(["validate", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: valid {stage} config\n"


@pytest.mark.parametrize("text,stage", [
    ("model: m\nmax_batch_size: 16\n", "serve"),
    ("model: m\nreplicas: 2\n", "serve"),
    ("output: labeled/\n", "label"),
    ("", "finetune"),  # an empty file: all defaults
    ("- a\n- list\n", "finetune"),  # not a mapping: validating it as finetune says so
])
def test_detect_stage_on_other_shapes(tmp_path, text, stage):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert cli.detect_stage(str(path)) == stage


def test_list_and_skip_flags_reach_the_config_through_the_parser():
    """What `bertray label ...` turns into: a 'list' flag is split at commas, a 'skip' flag sets its key to skip,
    a store_true flag sets true; flags not given leave the defaults."""
    argv = ["label", "--model", "m", "--input", "i", "--output", "o", "--passthrough", "title, lang",
            "--skip-empty", "--probabilities"]
    cfg = cli.build_config("label", None, [], vars(cli._parser().parse_args(argv)))
    assert cfg.passthrough == ["title", "lang"]
    assert (cfg.on_empty, cfg.on_bad_file, cfg.probabilities, cfg.overwrite) == ("skip", "error", True, False)
    plain = cli.build_config("label", None, [], vars(cli._parser().parse_args(argv[:7])))
    assert (plain.passthrough, plain.on_empty, plain.probabilities) == ([], "null", False)


def test_a_skip_flag_and_a_set_saying_otherwise_are_refused(capsys):
    argv = ["label", "--model", "m", "--input", "i", "--output", "o", "--skip-bad-files", "--set", "on_bad_file=error"]
    assert cli.main(argv) == 2
    assert "--skip-bad-files skip contradicts --set on_bad_file=error; give one of them" in capsys.readouterr().err


@pytest.fixture()
def label_raising(monkeypatch):
    """`f(exc)`: `bertray label` with Ray's start skipped and a stage that raises `exc`; returns (exit code, the
    config the stage was given)."""
    from bertray import label

    monkeypatch.setattr(runtime, "init_ray", lambda address=None: None)

    def run_label(exc: BaseException):
        given = []

        def run(cfg):
            given.append(cfg)
            raise exc

        monkeypatch.setattr(label, "run", run)
        code = cli.main(["label", "--model", "m", "--input", "in/", "--output", "out/"])
        return code, given[0]

    return run_label


def _known_error(kind: str) -> Exception:
    from bertray.data import DataError
    from bertray.modeling import ModelError
    from bertray.storage import StorageError
    from bertray.train_loop import TrainingDiverged

    return {"data": DataError("in/a.parquet: missing column(s) 'text'; the file has: body"),
            "model": ModelError("m: no such model folder"), "storage": StorageError("out/: permission denied"),
            "diverged": TrainingDiverged("loss is nan at step 3"), "missing": FileNotFoundError("in/"),
            "permission": PermissionError("out/")}[kind]


@pytest.mark.parametrize("kind", ["data", "model", "storage", "diverged", "missing", "permission"])
def test_a_known_error_inside_a_stage_is_exit_1_and_one_line(label_raising, capsys, kind):
    exc = _known_error(kind)
    code, cfg = label_raising(exc)
    assert code == 1 and cfg.input == "in/"  # the stage ran, with the config the flags built
    assert capsys.readouterr().err == f"error: {exc}\n"


def test_a_config_error_raised_inside_a_stage_is_exit_2(label_raising, capsys):
    code, _ = label_raising(C.ConfigError(["run.name: taken"], "run"))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "run.name: taken" in err and "Traceback" not in err


def test_an_unexpected_error_is_not_swallowed(label_raising):
    # Only the known errors become one line: a bug keeps its traceback.
    with pytest.raises(ZeroDivisionError):
        label_raising(ZeroDivisionError("a bug"))


def test_ctrl_c_is_exit_130_and_says_how_to_resume(label_raising, capsys):
    code, _ = label_raising(KeyboardInterrupt())
    assert code == 130
    assert capsys.readouterr().err == "interrupted; re-run the same command to resume\n"


def test_predict_prints_a_label_its_probability_and_the_text_per_line(tiny_classifier_dir, capsys):
    from bertray.predictor import Predictor

    texts = ["a fine film", "dull and long"]
    assert cli.main(["predict", tiny_classifier_dir, *texts]) == 0
    pred = Predictor(tiny_classifier_dir)
    probs = pred.predict(texts).probs
    assert capsys.readouterr().out.splitlines() == [
        f"{pred.label_names[int(p.argmax())]}\t{p.max():.3f}\t{t}" for t, p in zip(texts, probs)]

"""The label stage's driver-side logic without Ray: unit splitting, input checks, output-folder rules, drift."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray import label
from bertray.config import ConfigError, LabelConfig
from bertray.data import DataError

LABELS = ["neg", "pos"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """Only config.json: planning reads the label names from it and never loads weights."""
    from transformers import BertConfig

    out = tmp_path_factory.mktemp("cfg-only")
    cfg = BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
                     id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                     architectures=["BertForSequenceClassification"])
    cfg.save_pretrained(out)
    return str(out)


def write(path: Path, row_group_size: int | None = None, **cols) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)
    return path


def cfg_for(model_dir: str, tmp_path: Path, **kw) -> LabelConfig:
    return LabelConfig(model=model_dir, input=str(tmp_path / "in"), output=str(tmp_path / "out"), **kw)


@pytest.mark.parametrize("groups, rows_per_file, want", [
    ([10, 10, 10], 20, [(0, 20), (20, 30)]),  # whole row groups while they fit
    ([10, 10, 10], 15, [(0, 10), (10, 20), (20, 30)]),  # never merge past the bound
    ([45], 20, [(0, 20), (20, 40), (40, 45)]),  # a row group bigger than a unit is cut inside
    ([5, 45, 5], 20, [(0, 5), (5, 25), (25, 45), (45, 55)]),
    ([], 20, []),
    ([0, 7], 20, [(0, 7)]),
])
def test_split_rows(groups, rows_per_file, want):
    got = label.split_rows(groups, rows_per_file)
    assert got == want
    assert all(b - a <= rows_per_file for a, b in got)
    assert [r for a, b in got for r in range(a, b)] == list(range(sum(groups)))  # every row exactly once


def test_row_groups_cover_a_range(tmp_path):
    md = pq.read_metadata(write(tmp_path / "f.parquet", row_group_size=10, x=list(range(35))))
    assert label._row_groups(md, 0, 10) == ([0], 0)
    assert label._row_groups(md, 15, 32) == ([1, 2, 3], 10)
    assert label._row_groups(md, 30, 35) == ([3], 30)


def test_drift_is_total_variation():
    assert label.drift({"a": 0.5, "b": 0.5}, Counter(a=5, b=5), 0.1)["tvd"] == 0
    d = label.drift({"a": 0.9, "b": 0.1}, Counter(a=1, b=3), 0.1)
    assert d["tvd"] == pytest.approx(0.65) and d["warning"] is True
    assert label.drift({"a": 90, "b": 10}, Counter(a=9, b=1), 0.1) == {  # counts work like fractions
        "tvd": 0.0, "threshold": 0.1, "warning": False, "train": {"a": 0.9, "b": 0.1}}
    assert label.drift(None, Counter(a=1), 0.1)["tvd"] is None
    assert label.drift({"a": 1.0}, Counter(), 0.1)["tvd"] is None


def test_pool_size_follows_the_cluster():
    cfg = LabelConfig(model="m", input="i", output="o")
    assert label._pool_size(cfg, 100, {"CPU": 8.0}) == 8
    assert label._pool_size(cfg, 3, {"CPU": 8.0}) == 3  # no more actors than units
    assert label._pool_size(LabelConfig(model="m", input="i", output="o", cpus_per_actor=3), 100, {"CPU": 8.0}) == 2
    assert label._pool_size(LabelConfig(model="m", input="i", output="o", actors=5), 100, {"CPU": 2.0}) == 5
    gpu = LabelConfig(model="m", input="i", output="o", gpus_per_actor=0.5)
    assert label._pool_size(gpu, 100, {"CPU": 8.0, "GPU": 2.0}) == 4
    with pytest.raises(ConfigError, match="no GPUs"):
        label._pool_size(gpu, 100, {"CPU": 8.0})


def test_plan_splits_files_into_deterministic_units(tmp_path, model_dir):
    write(tmp_path / "in" / "a.parquet", row_group_size=10, id=list(range(25)), text=["t"] * 25)
    write(tmp_path / "in" / "sub" / "b.parquet", id=[100, 101], text=["u", None])
    cfg = cfg_for(model_dir, tmp_path, rows_per_file=20)
    plan = label.make_plan(cfg)
    assert [(u.uid, u.start, u.stop) for u in plan.units] == [
        ("00000-000000000000", 0, 20), ("00000-000000000020", 20, 25), ("00001-000000000000", 0, 2)]
    assert plan.label_names == LABELS
    assert plan.schema.names == ["id", "label", "label_id", "score", "reason"]
    assert [f["rows"] for f in plan.files] == [25, 2]
    assert label.make_plan(cfg).to_json(cfg) == plan.to_json(cfg)


def test_plan_reports_every_bad_file_and_the_columns_they_have(tmp_path, model_dir):
    write(tmp_path / "in" / "a.parquet", id=[1], body=["x"])
    write(tmp_path / "in" / "b.parquet", id=[1], text=[b"bytes"])
    write(tmp_path / "in" / "c.parquet", text=["fine"])
    (tmp_path / "in" / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as err:
        label.make_plan(cfg_for(model_dir, tmp_path, passthrough=["extra"]))
    msg = str(err.value)
    assert "7 problem(s) before labeling started" in msg  # all of them at once, not the first only
    assert "a.parquet: no text column 'text'; the file has: id (int64), body (string)" in msg
    assert "a.parquet: no passthrough column(s) 'extra'" in msg
    assert "b.parquet: text column 'text' has type binary, expected strings" in msg
    assert "c.parquet: no id column 'id'; the file has: text (string). Set --id-column, or --id-column none" in msg
    assert "d.parquet: cannot read as Parquet" in msg and "--skip-bad-files" in msg


def test_plan_skips_unreadable_files_when_asked(tmp_path, model_dir):
    write(tmp_path / "in" / "a.parquet", id=[1, 2], text=["x", "y"])
    (tmp_path / "in" / "b.parquet").write_bytes(b"PAR1 truncated")
    plan = label.make_plan(cfg_for(model_dir, tmp_path, on_bad_file="skip"))
    assert [f["path"].rsplit("/", 1)[1] for f in plan.skipped_files] == ["b.parquet"]
    assert [u.path.rsplit("/", 1)[1] for u in plan.units] == ["a.parquet"]


def test_plan_checks_types_names_and_locations(tmp_path, model_dir):
    write(tmp_path / "in" / "a.parquet", id=[1], text=["x"], label=[0])
    write(tmp_path / "in" / "b.parquet", id=["s"], text=["y"], label=[1])
    with pytest.raises(DataError, match=r"column 'id' has type int64 in .*a.parquet but string in .*b.parquet"):
        label.make_plan(cfg_for(model_dir, tmp_path))
    (tmp_path / "in" / "b.parquet").unlink()
    with pytest.raises(ConfigError, match=r"\['label'\] would clash with the output column"):
        label.make_plan(cfg_for(model_dir, tmp_path, passthrough=["label"]))
    with pytest.raises(ConfigError, match="holds input files"):
        label.make_plan(LabelConfig(model=model_dir, input=str(tmp_path), output=str(tmp_path / "in")))
    (tmp_path / "in" / "notes.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"Parquet files only.*notes\.csv"):
        label.make_plan(cfg_for(model_dir, tmp_path))


def test_plan_without_id_keeps_source_position_and_promotes_all_null_columns(tmp_path, model_dir):
    write(tmp_path / "in" / "a.parquet", text=["x"], extra=pa.array([None], pa.null()))
    write(tmp_path / "in" / "b.parquet", text=["y"], extra=[1.5])
    plan = label.make_plan(cfg_for(model_dir, tmp_path, id_column=None, passthrough=["extra"], probabilities=True,
                                   on_empty="skip"))
    assert plan.schema.names == ["extra", "source_file", "source_row", "label", "label_id", "score", "prob_neg",
                                 "prob_pos"]
    assert plan.schema.field("extra").type == pa.float64()


def test_output_folder_rules(tmp_path, model_dir):
    write(tmp_path / "in" / "a.parquet", id=[1, 2], text=["x", "y"])
    cfg = cfg_for(model_dir, tmp_path)
    plan = label.make_plan(cfg)
    assert label._prepare_output(cfg, plan) == {"finished": False, "units": {}}
    assert json.loads((tmp_path / "out" / "_plan.json").read_text())["units"][0]["uid"] == "00000-000000000000"
    (tmp_path / "out" / ".tmp-abc").write_bytes(b"half a file")  # a writer killed mid-write
    label._prepare_output(cfg, plan)
    assert not (tmp_path / "out" / ".tmp-abc").exists()
    other = LabelConfig(**{**cfg.__dict__, "probabilities": True})
    with pytest.raises(ConfigError, match=r"different plan \(changed: config.probabilities\)"):
        label._prepare_output(other, label.make_plan(other))
    label._prepare_output(LabelConfig(**{**other.__dict__, "overwrite": True}), label.make_plan(other))
    assert json.loads((tmp_path / "out" / "_plan.json").read_text())["config"]["probabilities"] is True
    (tmp_path / "out" / "mine.txt").write_text("user file")
    with pytest.raises(ConfigError, match="did not write .*mine.txt"):
        label._prepare_output(cfg, plan)


def test_non_classifier_model_is_refused_before_work(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
               architectures=["BertModel"]).save_pretrained(tmp_path / "enc")
    write(tmp_path / "in" / "a.parquet", id=[1], text=["x"])
    from bertray.modeling import ModelError

    with pytest.raises(ModelError, match="not a sequence-classification model"):
        label.make_plan(cfg_for(str(tmp_path / "enc"), tmp_path))


def test_a_small_corpus_is_cut_so_every_actor_gets_work():
    from bertray.label import MIN_UNIT_ROWS, split_rows, unit_rows

    assert unit_rows(7_284, 100_000) == MIN_UNIT_ROWS  # one unit would have left all actors but one idle
    assert len(split_rows([7_284], unit_rows(7_284, 100_000))) == 29
    assert unit_rows(10_000_000, 100_000) == 100_000  # big corpora: rows_per_file still bounds the files
    assert unit_rows(500, 50) == 50  # an explicit small rows_per_file is kept


def test_cpu_stage_tasks_fill_what_the_actors_leave():
    cfg = LabelConfig(model="m", input="i", output="o")
    assert label._task_resources(cfg, 1, {"CPU": 16.0, "GPU": 1.0}) == (0.5, 30)  # one GPU actor: 15 CPUs free
    assert label._task_resources(cfg, 1, {"CPU": 2.0}) == (0.5, 2)
    # CPU actors on every CPU: a task that reserved one would never start, so the tasks run unreserved.
    assert label._task_resources(cfg, 2, {"CPU": 2.0}) == (0.0, 2)


# ------------------------------------------------------------------------------------------ the three stages


def run_stages(cfg: LabelConfig, plan: label.Plan, unit: label.Unit, infer: label.Infer) -> dict:
    """One unit through read+tokenize, inference and build+write in this process, as Ray Data runs them."""
    tokens = label.read_tokenize(pa.table({k: [v] for k, v in dataclasses.asdict(unit).items()}), cfg, plan.schema)
    probs = infer(tokens)
    out = label.build_write(probs, cfg, plan.schema, plan.label_names)
    return json.loads(out.column("summary")[0].as_py())


def test_the_inference_stage_receives_token_ids_not_text(tmp_path, tiny_classifier_dir):
    from bertray.predictor import Predictor

    texts = ["a fine film", None, "  ", "dull and far too long " * 30, "moving"]
    write(tmp_path / "in" / "a.parquet", id=list(range(5)), text=texts)
    cfg = cfg_for(tiny_classifier_dir, tmp_path, probabilities=True)
    plan = label.make_plan(cfg)
    label._prepare_output(cfg, plan)
    unit = plan.units[0]
    tokens = label.read_tokenize(pa.table({k: [v] for k, v in dataclasses.asdict(unit).items()}), cfg, plan.schema)
    assert "text" not in tokens.column_names and tokens.num_rows == 1  # one row per unit: Ray never splits it
    assert tokens.schema.field("ids").type == pa.large_list(pa.int32())
    assert not [t for t in texts if t and t.strip() and t.strip() in json.dumps(tokens.to_pylist(), default=str)]

    infer = label.Infer(cfg, plan.label_names)

    def no_tokenizing(*a, **k):
        raise AssertionError("the inference actor tokenized")

    infer.predictor.encode = no_tokenizing
    infer.predictor.tokenizer = no_tokenizing
    out = infer(tokens)
    assert "ids" not in out.column_names
    good = [t for t in texts if t and t.strip()]
    want = Predictor(tiny_classifier_dir).predict(good).probs
    np.testing.assert_allclose(out.column("probs")[0].values.to_numpy().reshape(-1, 2), want, atol=1e-5)

    summary = json.loads(label.build_write(out, cfg, plan.schema, plan.label_names).column("summary")[0].as_py())
    assert summary["rows_read"] == summary["rows_written"] == 5 and summary["truncated"] == 1
    part = pq.read_table(tmp_path / "out" / label.part_name(unit.uid))
    assert part.column("id").to_pylist() == list(range(5))
    assert part.column("reason").to_pylist() == [None, "null_text", "empty_text", None, None]
    np.testing.assert_allclose(np.array([[r["prob_negative"], r["prob_positive"]] for r in part.to_pylist() if not r["reason"]]),
                               want, atol=1e-5)


def test_the_read_tokenize_stage_loads_neither_torch_nor_the_model_classes(tmp_path, tiny_classifier_dir):
    """A read+tokenize task only needs the tokenizer and the checkpoint's settings: importing torch and the model
    classes would cost each of its worker processes seconds and hundreds of MB."""
    write(tmp_path / "in" / "a.parquet", id=[0, 1], text=["a fine film", "dull"])
    code = ("import dataclasses, sys, pyarrow as pa; from bertray import label; from bertray.config import LabelConfig; "
            f"cfg = LabelConfig(model={tiny_classifier_dir!r}, input={str(tmp_path / 'in')!r}, "
            f"output={str(tmp_path / 'out')!r}); plan = label.make_plan(cfg); unit = plan.units[0]; "
            "out = label.read_tokenize(pa.table({k: [v] for k, v in dataclasses.asdict(unit).items()}), cfg, "
            "plan.schema); assert out.column('tokens')[0].as_py() > 0; "
            "print(sorted(m for m in ('torch', 'transformers.modeling_utils', 'bertray.predictor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_invalid_text_is_a_reason_not_a_failure(tmp_path, tiny_classifier_dir):
    # Bytes that are not UTF-8 (a UTF-16 surrogate encoded as if it were a character), which Arrow reads unchecked.
    bad = pa.array([b"ok", b"\xed\xa0\xbd oops", None, b"fine too"], pa.binary()).view(pa.string())
    write(tmp_path / "in" / "a.parquet", id=[1, 2, 3, 4], text=bad)
    cfg = cfg_for(tiny_classifier_dir, tmp_path)
    plan = label.make_plan(cfg)
    label._prepare_output(cfg, plan)
    summary = run_stages(cfg, plan, plan.units[0], label.Infer(cfg, plan.label_names))
    assert summary["reasons"] == {"invalid_text": 1, "null_text": 1}
    assert summary["rows_read"] == summary["rows_written"] == 4 and sum(summary["label_counts"].values()) == 2
    part = pq.read_table(tmp_path / "out" / label.part_name(plan.units[0].uid))
    assert part.column("reason").to_pylist() == [None, "invalid_text", "null_text", None]
    assert part.column("label").null_count == 2

    # A lone surrogate in a Python string (what JSON's "\ud83d" decodes to) fails the tokenizer's whole batch.
    encoder = label._encoder(tiny_classifier_dir, None)
    reasons, flat, offsets, _, _ = label.encode_texts(["fine", "\ud83d oops", None, " ", "also fine"], encoder)
    assert reasons == [None, "invalid_text", "null_text", "empty_text", None]
    assert len(offsets) == 3 and offsets[-1] == len(flat) > 0


def test_a_unit_read_in_several_chunks_keeps_each_text_with_its_ids(tmp_path, tiny_classifier_dir, monkeypatch):
    monkeypatch.setattr(label, "CHUNK_ROWS", 2)  # chunks: [a, None], [None, " "], [b, c]: one without any text
    texts = ["a fine film", None, None, " ", "dull", "moving and long"]
    write(tmp_path / "in" / "a.parquet", id=list(range(6)), text=texts)
    cfg = cfg_for(tiny_classifier_dir, tmp_path)
    plan = label.make_plan(cfg)
    tokens = label.read_tokenize(pa.table({k: [v] for k, v in dataclasses.asdict(plan.units[0]).items()}), cfg,
                                 plan.schema)
    flat = tokens.column("ids")[0].values.to_numpy()
    offsets = tokens.column("offsets")[0].values.to_numpy()
    encoder = label._encoder(tiny_classifier_dir, None)
    want = [label.encode_texts([t], encoder)[1].tolist() for t in ["a fine film", "dull", "moving and long"]]
    assert [flat[a:b].tolist() for a, b in zip(offsets, offsets[1:])] == want


def test_an_output_that_is_a_file_or_inside_the_input_folder_is_refused(tmp_path):
    from bertray.config import ConfigError, LabelConfig

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.parquet").write_bytes(b"")
    (tmp_path / "taken.txt").write_text("x")
    files = [str(tmp_path / "corpus" / "a.parquet")]

    def check(output):
        label._check_output_location(LabelConfig(model="m", input=str(tmp_path / "corpus"), output=output), files)

    with pytest.raises(ConfigError, match="is a file; give a folder"):
        check(str(tmp_path / "taken.txt"))
    with pytest.raises(ConfigError, match="is inside the input folder"):
        check(str(tmp_path / "corpus" / "labeled"))
    with pytest.raises(ConfigError, match="holds input files"):
        check(str(tmp_path))
    check(str(tmp_path / "labeled"))  # beside the input: fine


def test_chunked_long_texts_pool_their_own_windows_back_to_their_rows(tmp_path, spread_classifier):
    # Scores that differ from text to text, so a row given another row's windows would score visibly otherwise.
    tiny_classifier_dir = spread_classifier
    from bertray import modeling
    from bertray.predictor import Predictor

    # Lengths that give 1, 2 and many windows at max_length 32, between nulls and empties; ids must stay with rows.
    words = "the plot moves slowly but the actors carry every scene with care".split()
    texts = [" ".join(words[: n % len(words)] + words * (n // len(words))) for n in (5, 40, 300, 12, 90)]
    texts = texts[:2] + [None, ""] + texts[2:]
    write(tmp_path / "in" / "a.parquet", id=[10, 11, 12, 13, 14, 15, 16], text=texts)
    cfg = cfg_for(tiny_classifier_dir, tmp_path, probabilities=True, max_length=32, long_text="chunk")
    plan = label.make_plan(cfg)
    label._prepare_output(cfg, plan)
    summary = run_stages(cfg, plan, plan.units[0], label.Infer(cfg, plan.label_names))
    part = pq.read_table(tmp_path / "out" / label.part_name(plan.units[0].uid))
    assert part.column("id").to_pylist() == [10, 11, 12, 13, 14, 15, 16]
    assert part.column("reason").to_pylist() == [None, None, "null_text", "empty_text", None, None, None]
    assert summary["rows_read"] == summary["rows_written"] == 7 and summary["truncated"] == 0

    pred = Predictor(tiny_classifier_dir, max_length=32, long_text="chunk")
    good = [t for t in texts if t]
    ids, counts = modeling.windows(pred.tokenizer, good, 32, pred.chunking[0])
    assert counts.tolist()[:2] == [1, 2] and counts.max() > 5 and summary["rows_chunked"] == int((counts > 1).sum())
    # Each row's probabilities are the softmax of the mean of its own windows' logits, each window scored alone.
    logits = np.concatenate([pred.logits_ids([w]) for w in ids])
    bounds = np.cumsum(counts)[:-1]
    want = np.stack([pred.activate(chunk.mean(0, keepdims=True))[0] for chunk in np.split(logits, bounds)])
    got = np.array([[r["prob_negative"], r["prob_positive"]] for r in part.to_pylist() if not r["reason"]])
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(pred.predict(good).probs, want, atol=1e-5)  # serve and evaluate score alike
    assert np.ptp(want[:, 0]) > 0.05  # the rows' scores differ: a row scored with another's windows would show

"""bertray.evaluate in-process on a tiny random classifier: what it writes, that its counts are the rows it was
given, and the one-line errors for data it cannot score (no Ray: evaluation runs through the shared Predictor)."""
from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray import cli
from bertray import evaluate as evaluate_module
from bertray.data import DataError
from bertray.evaluate import evaluate

TEXTS = ["a fine film", "dull", "witty and warm", "overlong and flat", "moving", "a mess", "lovely", "tedious"]
LABELS = ["positive", "negative", "positive", "negative", "positive", "negative", "positive", "positive"]


@pytest.fixture()
def labeled(tmp_path):
    """A labeled Parquet file: 8 rows, 5 positive and 3 negative, labels by name."""
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.table({"text": TEXTS, "label": LABELS}), path)
    return str(path)


def test_metrics_json_and_confusion_matrix_png_count_every_row_given(tiny_classifier_dir, labeled, tmp_path):
    out = tmp_path / "out"
    result = evaluate(tiny_classifier_dir, labeled, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["confusion_matrix.png", "metrics.json"]
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["n"] == result["n"] == len(TEXTS) and saved["data_report"]["rows_read"] == len(TEXTS)
    cm = saved["confusion_matrix"]  # rows: the true labels, in the checkpoint's order (negative, positive)
    assert [sum(row) for row in cm] == [LABELS.count("negative"), LABELS.count("positive")]
    assert saved["per_class"]["positive"]["support"] == 5 and saved["accuracy"] == pytest.approx(
        (cm[0][0] + cm[1][1]) / len(TEXTS))
    assert (saved["model"], saved["data"], saved["backend"], saved["quantize"]) == (
        tiny_classifier_dir, labeled, "torch", "none")
    assert result["summary"]["n"] == len(TEXTS) and result["summary"]["out"] == str(out)


def test_max_rows_scores_a_sample_of_that_size(tiny_classifier_dir, labeled, tmp_path):
    result = evaluate(tiny_classifier_dir, labeled, str(tmp_path / "out"), max_rows=5)
    assert result["n"] == 5 and sum(map(sum, result["confusion_matrix"])) == 5


def test_a_missing_label_column_is_one_line_naming_the_columns_and_writes_nothing(tiny_classifier_dir, tmp_path):
    pq.write_table(pa.table({"text": TEXTS, "sentiment": LABELS}), tmp_path / "eval.parquet")
    with pytest.raises(DataError) as exc:
        evaluate(tiny_classifier_dir, str(tmp_path / "eval.parquet"), str(tmp_path / "out"))
    assert str(exc.value) == f"{tmp_path / 'eval.parquet'}: missing column(s) 'label'; the file has: text, sentiment"
    assert not (tmp_path / "out").exists()
    result = evaluate(tiny_classifier_dir, str(tmp_path / "eval.parquet"), str(tmp_path / "out"),
                      label_column="sentiment")  # named: scored
    assert result["n"] == len(TEXTS)


def test_a_missing_file_is_one_line_from_the_cli_before_the_model_loads(tiny_classifier_dir, tmp_path, capsys,
                                                                        monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded for data that is not there")

    monkeypatch.setattr(evaluate_module, "Predictor", no_model)
    missing = str(tmp_path / "no-such.parquet")
    with pytest.raises(DataError, match="no-such.parquet: no data files found"):
        evaluate(tiny_classifier_dir, missing, str(tmp_path / "out"))
    assert cli.main(["evaluate", tiny_classifier_dir, missing, "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"error: {missing}: no data files found (looked for .csv, .json, .jsonl, .ndjson, .parquet, .pq)\n"
    assert not (tmp_path / "out").exists()


def test_a_pair_model_needs_the_second_texts_column(tiny_classifier_dir, labeled, tmp_path):
    pairs = tmp_path / "pairs"
    shutil.copytree(tiny_classifier_dir, pairs)
    meta = json.loads((pairs / "bertray.json").read_text())
    (pairs / "bertray.json").write_text(json.dumps({**meta, "text_pair": True}))
    with pytest.raises(DataError, match="trained on sentence pairs; name the second text's column with "
                                        "--text-pair-column"):
        evaluate(str(pairs), labeled, str(tmp_path / "out"))


def test_evaluate_counts_texts_that_are_not_utf8_and_scores_the_rest(tiny_classifier_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bertray.evaluate import evaluate

    texts = pa.array([b"a good film", b"\xed\xa0\xbd oops", b"an awful film"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": texts, "label": [1, 0, 0]}), tmp_path / "eval.parquet")
    result = evaluate(tiny_classifier_dir, str(tmp_path / "eval.parquet"), str(tmp_path / "out"))
    assert result["n"] == 2 and result["data_report"]["dropped"] == {"invalid_text": 1}

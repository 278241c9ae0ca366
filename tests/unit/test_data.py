"""Reading labeled data: formats, cleaning, and every dropped row counted by reason."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray import data as D
from bertray.config import DataConfig


def cfg(**kw):
    return DataConfig(train="x", **kw)


def test_drops_are_counted_by_reason(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["good", None, "  ", "bad", "fine", "meh"],
                             "label": ["pos", "neg", "neg", "neg", None, "what"]}), p)
    out = D.load_labeled(str(p), cfg(), label_names=["neg", "pos"])
    assert out.texts == ["good", "bad"] and out.labels.tolist() == [1, 0]
    assert out.report["dropped"] == {"null_text": 1, "empty_text": 1, "null_label": 1, "unknown_label": 1}
    assert out.report["rows_read"] == 6 and out.report["rows_used"] + sum(out.report["dropped"].values()) == 6
    assert out.report["first_dropped_row"]["unknown_label"] == 5


def test_missing_column_names_the_columns_that_exist(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"sentence": ["a"], "label": [0]}), p)
    with pytest.raises(D.DataError, match=r"d.parquet: missing column\(s\) 'text'; the file has: sentence, label"):
        D.load_labeled(str(p), cfg())


def test_empty_and_corrupt_files(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), empty)
    with pytest.raises(D.DataError, match="no usable rows"):
        D.load_labeled(str(empty), cfg())
    bad = tmp_path / "junk.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(D.DataError, match="junk.parquet: cannot read as parquet"):
        D.load_labeled(str(bad), cfg())
    with pytest.raises(D.DataError, match="no data files found"):
        D.load_labeled(str(tmp_path / "nothing-here"), cfg())


def test_unknown_integer_label_and_non_string_text(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [0, 1, 7]}), p)
    out = D.load_labeled(str(p), cfg(labels=["neg", "pos"]))
    assert out.report["dropped"] == {"unknown_label": 1}
    q = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2], "label": [0, 1]}), q)
    with pytest.raises(D.DataError, match="text column 'text' has type int64, expected strings"):
        D.load_labeled(str(q), cfg())


def test_csv_jsonl_multiple_text_columns_and_cleaning(tmp_path):
    (tmp_path / "a.csv").write_text('title,body,label\nGreat,"loved <br />it",pos\nAwful,"hated   it",neg\n')
    (tmp_path / "b.jsonl").write_text(json.dumps({"title": "Meh", "body": "ok &amp; fine", "label": "pos"}) + "\n")
    out = D.load_labeled(str(tmp_path), cfg(text_columns=["title", "body"], clean_html=True))
    assert out.label_names == ["neg", "pos"]
    assert out.texts == ["Great loved it", "Awful hated it", "Meh ok & fine"]


def test_labels_json_beside_the_data_names_classes(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "train.parquet")
    (tmp_path / "labels.json").write_text('["negative", "positive"]')
    assert D.load_labeled(str(tmp_path / "train.parquet"), cfg()).label_names == ["negative", "positive"]


def test_stratified_split_is_seeded_and_keeps_class_shares():
    y = np.array([0] * 80 + [1] * 20)
    tr, va = D.stratified_split(y, 0.1, seed=3)
    assert len(va) == 10 and (y[va] == 1).sum() == 2
    assert set(tr) | set(va) == set(range(100)) and not set(tr) & set(va)
    assert D.stratified_split(y, 0.1, seed=3)[1].tolist() == va.tolist()


def _not_utf8(*values: bytes) -> pa.Array:
    """A string column holding bytes that are not UTF-8, as a Parquet writer that does not check can leave it."""
    return pa.array(values, pa.binary()).view(pa.string())


def test_text_that_is_not_utf8_is_dropped_and_counted_not_fatal(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": _not_utf8(b"good", b"\xed\xa0\xbd oops", b"bad", b"\xff\xfe", None),
                             "label": ["pos", "neg", "neg", "pos", "neg"]}), p)
    out = D.load_labeled(str(p), cfg(), label_names=["neg", "pos"])
    assert out.texts == ["good", "bad"] and out.labels.tolist() == [1, 0]
    assert out.report["dropped"] == {"invalid_text": 2, "null_text": 1}
    assert out.report["first_dropped_row"]["invalid_text"] == 1
    texts, report = D.load_texts(str(p), cfg())
    assert texts == ["good", "bad"] and report["dropped"] == {"invalid_text": 2, "null_text": 1}


def test_strings_keeps_the_good_values_of_a_column_with_bad_bytes():
    col = pa.chunked_array([_not_utf8(b"ok", b"caf\xc3\xa9"), _not_utf8(None, b"\xed\xa0\xbd")])
    assert D.strings(col) == ["ok", "caf\u00e9", None, D.INVALID_TEXT]


def test_invalid_text_names_a_lone_surrogate():
    assert D.invalid_text("caf\u00e9 \U0001f600") is None
    assert D.invalid_text("ok \ud83d oops") == "not valid Unicode: lone surrogate '\\ud83d' at character 3"


@pytest.mark.parametrize("ids,absent", [([0, 5000], "1-4999"), ([1, 2, 3], "0"), ([0, 2, 2, 5], "1, 3-4")])
def test_integer_ids_that_imply_classes_with_no_rows_are_refused(tmp_path, ids, absent):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["t"] * len(ids), "label": ids}), p)
    with pytest.raises(D.DataError, match=rf"have no rows \({absent}\); declare the classes with data.labels"):
        D.load_labeled(str(p), cfg())
    # declared, they are what the user meant
    names = [f"c{i}" for i in range(max(ids) + 1)]
    assert D.load_labeled(str(p), cfg(labels=names)).label_names == names


def test_a_training_set_of_one_class_is_refused_and_empty_declared_classes_are_named(tmp_path):
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": ["pos", "pos"]}), p)
    one = D.load_labeled(str(p), cfg(), label_names=["neg", "pos"])
    with pytest.raises(D.DataError, match="every usable training row has the label 'pos'"):
        D.check_classes(one)
    pq.write_table(pa.table({"text": ["a", "b"], "label": ["pos", "neg"]}), p)
    assert D.check_classes(D.load_labeled(str(p), cfg(), label_names=["neg", "pos", "meh"])) == ["meh"]


def _ml_table(path, labels, texts=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = texts or [f"text {i}" for i in range(len(labels))]
    pq.write_table(pa.table({"text": texts, "labels": labels}), path)
    return str(path)


def test_multi_label_from_a_list_column_is_a_0_1_matrix_and_keeps_rows_with_no_label(tmp_path):
    from bertray import data as D
    from bertray.config import DataConfig

    uri = _ml_table(tmp_path / "t.parquet", [[0, 2], [1], [], None, [2, 7]])
    d = D.load_labeled(uri, DataConfig(label_column="labels", labels=["a", "b", "c"]))
    assert d.multi_label and d.labels.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    assert d.report["dropped"] == {"null_label": 1, "unknown_label": 1}
    assert D.label_counts(d).tolist() == [1, 1, 1]


def test_multi_label_from_a_delimited_string_column_infers_names(tmp_path):
    from bertray import data as D
    from bertray.config import DataConfig

    uri = _ml_table(tmp_path / "t.parquet", ["joy, anger", "anger", "fear"])
    d = D.load_labeled(uri, DataConfig(label_column="labels", label_delimiter=","))
    assert d.label_names == ["anger", "fear", "joy"] and d.labels.tolist() == [[1, 0, 1], [1, 0, 0], [0, 1, 0]]


def test_multi_label_split_is_seeded_and_keeps_each_labels_share(tmp_path):
    import numpy as np

    from bertray import data as D

    rng = np.random.default_rng(0)
    labels = (rng.random((2000, 6)) < np.array([0.5, 0.2, 0.1, 0.05, 0.02, 0.3])).astype(np.int8)
    tr, va = D.stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 2000 and 180 <= len(va) <= 220
    assert np.allclose(labels[va].mean(0), labels.mean(0), atol=0.02)
    assert (D.stratified_split(labels, 0.1, seed=3)[1] == va).all()


def test_pairs_are_read_with_their_rows_and_a_missing_second_text_drops_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bertray import data as D
    from bertray.config import DataConfig

    pq.write_table(pa.table({"s1": ["a b", "c d", "e f"], "s2": ["x", None, "z"], "label": [0, 1, 1]}),
                   tmp_path / "p.parquet")
    d = D.load_labeled(str(tmp_path / "p.parquet"), DataConfig(text_columns=["s1"], text_pair_column="s2"))
    assert d.texts == ["a b", "e f"] and d.pairs == ["x", "z"] and d.labels.tolist() == [0, 1]
    assert d.report["dropped"] == {"null_text": 1}
    sub = D.subset(d, np.array([1]))
    assert sub.texts == ["e f"] and sub.pairs == ["z"]

"""Hugging Face datasets as data (bertray.hf_data): real `datasets` objects written with save_to_disk, read through
the same checks, drop counts, seeded split and fingerprint as Parquet."""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from bertray import cli, finetune, hf_data, storage, trainer
from bertray import config as C
from bertray import data as D

TEXTS = ["a gorgeous film", None, "  ", "dull", "witty and warm", "overlong", "no label here", "tender", "flat",
         "bright", "tedious", "moving"]
LABELS = [1, 0, 0, 0, 1, 0, -1, 1, 0, 1, 0, 1]  # -1: Hugging Face's "no label"
FEATURES = Features({"sentence": Value("string"), "label": ClassLabel(names=["neg", "pos"]), "idx": Value("int32")})


def dataset(texts=TEXTS, labels=LABELS) -> Dataset:
    return Dataset.from_dict({"sentence": texts, "label": labels, "idx": list(range(len(texts)))}, features=FEATURES)


def dcfg(**kw) -> C.DataConfig:
    return C.DataConfig(train="x", text_columns=["sentence"], **kw)


@pytest.fixture()
def dict_folder(tmp_path) -> str:
    out = tmp_path / "sst"
    DatasetDict({"train": dataset(), "test": dataset(TEXTS[:4], LABELS[:4])}).save_to_disk(str(out))
    return str(out)


def test_dataset_folder_reads_like_parquet_with_classlabel_names_and_drop_counts(tmp_path):
    dataset().save_to_disk(str(tmp_path / "ds"))
    out = D.load_labeled(str(tmp_path / "ds"), dcfg())
    assert out.label_names == ["neg", "pos"]  # from the ClassLabel, not inferred ids '0', '1'
    assert out.texts[:3] == ["a gorgeous film", "dull", "witty and warm"] and out.labels[:3].tolist() == [1, 0, 1]
    assert out.report["rows_read"] == 12
    assert out.report["dropped"] == {"null_text": 1, "empty_text": 1, "null_label": 1}
    # The same rows as Parquet (label names declared beside it) read the same.
    rows = {"sentence": TEXTS, "label": [None if y < 0 else y for y in LABELS]}
    pq.write_table(pa.table(rows), tmp_path / "d.parquet")
    (tmp_path / "labels.json").write_text(json.dumps(["neg", "pos"]))
    same = D.load_labeled(str(tmp_path / "d.parquet"), dcfg())
    assert (same.texts, same.labels.tolist(), same.label_names) == (out.texts, out.labels.tolist(), out.label_names)
    assert same.report["dropped"] == out.report["dropped"]


def test_datasetdict_split_by_option_or_by_its_folder(dict_folder):
    by_option = D.load_labeled(f"{dict_folder}?split=test", dcfg())
    by_folder = D.load_labeled(f"{dict_folder}/test", dcfg())
    assert by_option.texts == by_folder.texts == ["a gorgeous film", "dull"]
    assert by_option.report["source"] == f"{dict_folder}?split=test"
    assert D.data_files(f"{dict_folder}?split=train") == [f"{dict_folder}/train/data-00000-of-00001.arrow"]


def test_a_missing_or_unknown_split_names_the_splits(dict_folder, tmp_path):
    with pytest.raises(D.DataError) as exc:
        D.load_labeled(dict_folder, dcfg())
    assert str(exc.value) == (f"{dict_folder}: a DatasetDict with splits train, test; choose one with ?split=NAME, "
                              f"e.g. {dict_folder}?split=train")
    with pytest.raises(D.DataError, match=r"\?split=dev: no split 'dev'; the DatasetDict has: train, test$"):
        D.load_labeled(f"{dict_folder}?split=dev", dcfg())
    dataset().save_to_disk(str(tmp_path / "one"))
    with pytest.raises(D.DataError, match="holds one Dataset, not a DatasetDict with a split 'train'; drop"):
        D.load_labeled(f"{tmp_path / 'one'}?split=train", dcfg())


def test_bad_options_columns_and_non_datasets_say_what_is_wrong(dict_folder, tmp_path):
    with pytest.raises(D.DataError, match=r"unknown option\(s\) splt; a Hugging Face dataset takes \?split=, "):
        D.load_labeled(f"{dict_folder}?splt=train", dcfg())
    with pytest.raises(D.DataError, match=r"missing column\(s\) 'text'; the dataset has: sentence, label, idx"):
        D.load_labeled(f"{dict_folder}?split=train", C.DataConfig(train="x"))
    pq.write_table(pa.table({"text": ["a"], "label": [0]}), tmp_path / "d.parquet")
    with pytest.raises(D.DataError, match="not a Hugging Face dataset folder .*; \\?split= applies only to those"):
        D.load_labeled(f"{tmp_path / 'd.parquet'}?split=train", C.DataConfig(train="x"))
    # A '?' with no key=value is a glob wildcard, as before.
    pq.write_table(pa.table({"text": ["b"], "label": [1]}), tmp_path / "part-1.parquet")
    assert not hf_data.is_named(str(tmp_path / "part-?.parquet"))
    assert D.load_labeled(str(tmp_path / "part-?.parquet"), C.DataConfig(train="x", labels=["n", "p"])).texts == ["b"]


def test_seeded_split_and_fingerprint_match_the_same_rows_as_parquet(tmp_path):
    rng = np.random.default_rng(0)
    texts = [f"text number {i}" for i in range(60)]
    labels = rng.integers(0, 2, 60).tolist()
    dataset(texts, labels).save_to_disk(str(tmp_path / "ds"))
    pq.write_table(pa.table({"sentence": texts, "label": labels}), tmp_path / "d.parquet")
    (tmp_path / "labels.json").write_text(json.dumps(["neg", "pos"]))
    parts = {}
    for source in (str(tmp_path / "ds"), str(tmp_path / "d.parquet")):
        cfg = C.load(C.FinetuneConfig, data={"data": {"train": source, "text_columns": ["sentence"]},
                                             "run": {"name": "r", "storage": str(tmp_path / "runs")}})
        train, val = finetune.load_splits(cfg)
        parts[source] = (train.texts, val.texts, trainer.fingerprint(cfg, "finetune", trainer.labeled_data(train, val)))
    (hf_train, hf_val, hf_fp), (pq_train, pq_val, pq_fp) = parts.values()
    assert (hf_train, hf_val) == (pq_train, pq_val) and len(hf_val) == 6
    assert hf_fp["fingerprint"] == pq_fp["fingerprint"]  # the same data read from elsewhere is the same run


def test_list_of_classlabel_names_its_labels(tmp_path):
    features = Features({"sentence": Value("string"), "tags": List(ClassLabel(names=["plot", "acting", "music"]))})
    ds = Dataset.from_dict({"sentence": ["a", "b"], "tags": [[0, 2], []]}, features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    table = D.read_table(str(tmp_path / "ds"), ["sentence", "tags"])
    assert hf_data.class_names(table, "tags") == ["plot", "acting", "music"]
    assert table.column("tags").to_pylist() == [[0, 2], []]
    assert hf_data.class_names(table, "sentence") is None


def test_classlabel_names_in_parquet_written_by_datasets(tmp_path):
    dataset(["a", "b", "c"], [1, 0, 1]).to_parquet(str(tmp_path / "d.parquet"))
    assert D.load_labeled(str(tmp_path / "d.parquet"), dcfg()).label_names == ["neg", "pos"]


@pytest.mark.s3
def test_save_to_disk_folder_on_s3(s3_bucket, dict_folder):
    storage.upload_dir(dict_folder, f"{s3_bucket}/sst")
    out = D.load_labeled(f"{s3_bucket}/sst?split=train", dcfg())
    assert out.label_names == ["neg", "pos"] and len(out.texts) == 9


def test_file_builders_read_as_load_dataset_does_local_and_on_s3(s3_bucket, tmp_path):
    """hf://BUILDER?data_files=...: the library's own parsing (a quoted comma in CSV, one row per line of text,
    blank lines kept as empty texts, which the checks then count), files listed for the fingerprint."""
    (tmp_path / "csv").mkdir()
    rows = [("a gorgeous, witty film", "pos"), ("dull", "neg"), ("tender", "pos"), ("flat", "neg")]
    (tmp_path / "csv" / "train.csv").write_text("sentence,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
    out = D.load_labeled(f"hf://csv?data_files={tmp_path}/csv/*.csv", dcfg())
    assert out.texts == [t for t, _ in rows] and out.label_names == ["neg", "pos"]
    assert [out.label_names[i] for i in out.labels] == [lab for _, lab in rows]

    lines = ["the cat sat on the mat", "", "a dog ran under a log", "red and blue"]
    storage.write_text(f"{s3_bucket}/corpus/part-0.txt", "\n".join(lines[:2]) + "\n")
    storage.write_text(f"{s3_bucket}/corpus/part-1.txt", "\n".join(lines[2:]) + "\n")
    uri = f"hf://text?data_files={s3_bucket}/corpus/part-?.txt"
    assert D.read_table(uri).column("text").to_pylist() == lines
    assert D.data_files(uri) == [f"{s3_bucket}/corpus/part-0.txt", f"{s3_bucket}/corpus/part-1.txt"]


def test_file_builder_options_and_unreadable_files_are_one_line(tmp_path):
    (tmp_path / "a.txt").write_text("not json\n")
    for uri, says in (("hf://text", r"the text builder reads files: hf://text\?data_files=PATH"),
                      (f"hf://text?&&data_files={tmp_path}/none.txt", "no files at "),
                      (f"hf://text?data_files={tmp_path}/none/*.txt", "no files at "),
                      (f"hf://text?data_files={tmp_path}/a.txt&split=test", "makes one split, train"),
                      (f"{tmp_path}/ds?data_files=x", r"\?data_files= goes with a file builder"),
                      (f"hf://stanfordnlp/imdb?data_files={tmp_path}/a.txt", r"\?data_files= goes with a file builder"),
                      (f"hf://json?data_files={tmp_path}/a.txt", r"the json builder could not read .*a\.txt: JSON parse")):
        with pytest.raises(D.DataError, match=says) as e:
            D.read_table(uri)
        assert "\n" not in str(e.value)
    # In a process of its own (the library's log handler writes to the stderr it found at import): the one line
    # is all the console gets, not also the library's own log of it or its progress bars.
    code = ("from bertray import data, hf_data\ntry:\n    hf_data.read_table(__import__('sys').argv[1])\n"
            "except data.DataError as e:\n    print(e)")
    r = subprocess.run([sys.executable, "-c", code, f"hf://json?data_files={tmp_path}/a.txt"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "JSON parse error" in r.stdout, r.stderr
    assert "JSON parse error" not in r.stderr and "Generating train split" not in r.stderr, r.stderr


def test_hub_id_offline_is_one_line_saying_how_to_pass_a_local_copy(tiny_classifier_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rc = cli.main(["evaluate", tiny_classifier_dir, "hf://stanfordnlp/imdb?split=test"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]  # beside transformers' loading bar
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: hf://stanfordnlp/imdb?split=test: could not reach the Hugging Face Hub")
    assert "save_to_disk('imdb')" in lines[0] and "pass imdb?split=test" in lines[0]


def test_hub_ids_are_checked_before_any_download():
    with pytest.raises(D.DataError, match=r"expected hf://OWNER/NAME\[/CONFIG\]\?split=SPLIT"):
        D.read_table("hf://a/b/c/d?split=train")

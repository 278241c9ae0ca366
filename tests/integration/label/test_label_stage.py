"""`bertray label` end to end on the shared local Ray cluster: local and S3, bad input, resume, int8, the CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray import label, storage
from bertray.config import ConfigError, LabelConfig
from bertray.data import DataError

LABELS = ["negative", "neutral", "positive"]
REPO = Path(__file__).resolve().parents[3]


def read_parts(output: str) -> pa.Table:
    """Every part file of an output folder, in part-name (= input) order."""
    parts = [f for f in storage.list_files(output) if os.path.basename(f).startswith("part-")]
    tables = []
    for f in parts:
        fs, p = storage.filesystem(f)
        with fs.open_input_file(p) as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)


def reason_of(text: str | None) -> str | None:
    if text is None:
        return "null_text"
    return "empty_text" if not text.strip() else None


def check_labels(out: pa.Table, corpus: pa.Table, skipped_empty: bool = False) -> None:
    """Every input row once (or, with skipped_empty, every non-empty one), carrying its own id and passthrough
    values, a label consistent with its score, and a null label plus reason exactly where the text is missing."""
    ids = out.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate ids in the output"
    by_id = {r["id"]: r for r in corpus.to_pylist()}
    expected = [i for i, r in by_id.items() if not (skipped_empty and reason_of(r["text"]))]
    assert sorted(ids) == sorted(expected)
    assert ids == [i for i in corpus.column("id").to_pylist() if i in set(expected)], "input order not kept"
    assert "text" not in out.column_names and "unused" not in out.column_names
    for row in out.to_pylist():
        src = by_id[row["id"]]
        assert (row["group"], row["weight"]) == (src["group"], src["weight"])
        why = reason_of(src["text"])
        if why:
            assert row["label"] is None and row["label_id"] is None and row["score"] is None
            assert row.get("reason") == why
        else:
            assert row["label"] == LABELS[row["label_id"]] and row.get("reason") is None
            assert 1 / len(LABELS) <= row["score"] <= 1


@pytest.fixture(scope="module")
def labeled(ray_cluster, tiny_classifier, tmp_path_factory, corpus_maker):
    """One labeling run of the 3-file corpus, shared by the tests that only read its output."""
    root = tmp_path_factory.mktemp("labeled")
    corpus = corpus_maker(root / "corpus")
    cfg = LabelConfig(model=tiny_classifier, input=str(root / "corpus"), output=str(root / "out"), rows_per_file=50,
                      actors=2, probabilities=True, passthrough=["group", "weight"])
    return cfg, corpus, label.run(cfg)


def test_labels_every_row_with_its_own_id_and_values(labeled, tiny_classifier):
    from bertray.predictor import Predictor

    cfg, corpus, summary = labeled
    out = read_parts(cfg.output)
    check_labels(out, corpus)
    # Each row's probabilities are those of its own text (not a neighbour's): compare with a plain Predictor.
    pred = Predictor(tiny_classifier)
    texts = {r["id"]: r["text"] for r in corpus.to_pylist() if not reason_of(r["text"])}
    want = dict(zip(texts, pred.predict(list(texts.values())).probs))
    got = {r["id"]: [r[f"prob_{n}"] for n in LABELS] for r in out.to_pylist() if r["label"] is not None}
    assert set(got) == set(want)
    np.testing.assert_allclose(np.array([got[i] for i in want]), np.array(list(want.values())), atol=1e-4)
    assert len(set(out.column("label").drop_null().to_pylist())) > 1, "the test model should not be constant"
    # Counts in = counts out, and the reasons add up.
    n_null = sum(t is None for t in corpus.column("text").to_pylist())
    n_empty = sum(t is not None and not t.strip() for t in corpus.column("text").to_pylist())
    assert summary["rows_read"] == summary["rows_written"] == corpus.num_rows == 360
    assert summary["rows_without_label"] == {"null_text": n_null, "empty_text": n_empty}
    assert summary["rows_labeled"] == 360 - n_null - n_empty == sum(summary["label_counts"].values())
    long_texts = sum(len(ids) == 64 for ids in pred.encode(list(texts.values()))[0])
    assert summary["truncated"] == long_texts > 0
    assert summary["drift"]["warning"] is True and summary["drift"]["tvd"] > 0.1
    assert 0 < summary["low_confidence"] < summary["rows_labeled"]


def test_output_files_are_bounded_and_the_manifest_lists_them(labeled):
    cfg, _, summary = labeled
    names = sorted(os.listdir(cfg.output))
    parts = [n for n in names if n.startswith("part-")]
    manifest = json.loads(Path(cfg.output, "_SUCCESS").read_text())
    assert manifest["output_files"] == parts and len(parts) == summary["units"] == 9  # 3 files x (37, 37, 46 rows)
    assert all(pq.read_metadata(Path(cfg.output, p)).num_rows <= cfg.rows_per_file for p in parts)
    assert {"_plan.json", "_summary.json", "_SUCCESS"} <= set(names) and not [n for n in names if n.startswith(".")]
    assert json.loads(Path(cfg.output, "_summary.json").read_text()) == summary


def test_rerun_of_a_finished_job_does_nothing_and_a_changed_plan_is_refused(labeled):
    cfg, _, summary = labeled
    before = {n: os.stat(Path(cfg.output, n)).st_mtime_ns for n in os.listdir(cfg.output)}
    assert label.run(cfg) == summary
    assert {n: os.stat(Path(cfg.output, n)).st_mtime_ns for n in os.listdir(cfg.output)} == before
    with pytest.raises(ConfigError, match=r"config.rows_per_file.*--overwrite"):
        label.run(LabelConfig(**{**cfg.__dict__, "rows_per_file": 10}))


def test_quantize_int8_runs_and_overwrite_starts_over(labeled, tmp_path):
    cfg, corpus, _ = labeled
    out = tmp_path / "out"
    shutil.copytree(cfg.output, out)
    int8 = LabelConfig(**{**cfg.__dict__, "output": str(out), "quantize": "int8", "overwrite": True, "actors": 1})
    summary = label.run(int8)
    assert summary["quantize"] == "int8" and summary["units_done_earlier"] == 0
    check_labels(read_parts(str(out)), corpus)
    assert json.loads((out / "_plan.json").read_text())["config"]["quantize"] == "int8"


@pytest.mark.s3
def test_s3_input_model_and_output_with_empty_rows_skipped(ray_cluster, tiny_classifier, corpus, s3_bucket):
    folder, table = corpus
    for f in sorted(folder.iterdir()):
        storage.write_bytes(f"{s3_bucket}/in/{f.name}", f.read_bytes())
    storage.upload_dir(tiny_classifier, f"{s3_bucket}/model")
    cfg = LabelConfig(model=f"{s3_bucket}/model", input=f"{s3_bucket}/in/*.parquet", output=f"{s3_bucket}/out",
                      rows_per_file=100, actors=1, passthrough=["group", "weight"], on_empty="skip")
    summary = label.run(cfg)
    out = read_parts(cfg.output)
    check_labels(out, table, skipped_empty=True)
    assert "reason" not in out.column_names
    skipped = sum(reason_of(t) is not None for t in table.column("text").to_pylist())
    assert summary["rows_read"] == 360 and summary["rows_skipped"] == skipped
    assert summary["rows_written"] == 360 - skipped == out.num_rows
    assert storage.exists(f"{s3_bucket}/out/_SUCCESS")


def test_missing_or_non_string_text_column_fails_before_any_work(ray_cluster, tmp_path, tiny_classifier,
                                                                write_parquet_here):
    write_parquet_here(tmp_path / "in" / "a.parquet", {"id": [1, 2], "body": ["x", "y"]})
    write_parquet_here(tmp_path / "in" / "b.parquet", {"id": [3, 4], "text": [5, 6]})
    write_parquet_here(tmp_path / "in" / "c.parquet", {"id": [5, 6], "text": ["ok", "fine"]})
    cfg = LabelConfig(model=tiny_classifier, input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    with pytest.raises(DataError) as err:
        label.run(cfg)
    msg = str(err.value)
    assert "a.parquet: no text column 'text'; the file has: id (int64), body (string)" in msg
    assert "b.parquet: text column 'text' has type int64, expected strings" in msg
    assert "c.parquet" not in msg
    assert not (tmp_path / "out").exists(), "nothing may be written before the input is checked"


def _with_corrupt_pages(folder, model: str, tmp_path) -> LabelConfig:
    """Adds zz-pages.parquet to the corpus (footer fine, first pages garbage); the label config for the folder."""
    pages = bytearray((folder / "part0.parquet").read_bytes())
    pages[4:200] = bytes((x * 37 + 11) % 256 for x in range(196))
    (folder / "zz-pages.parquet").write_bytes(bytes(pages))
    return LabelConfig(model=model, input=str(folder), output=str(tmp_path / "out"), rows_per_file=200,
                       actors=1, passthrough=["group", "weight"])


def test_corrupt_files_error_by_name_or_are_skipped_and_reported(ray_cluster, tiny_classifier, corpus, tmp_path):
    folder, table = corpus
    good = (folder / "part0.parquet").read_bytes()
    (folder / "zz-truncated.parquet").write_bytes(good[: len(good) // 2])  # footer gone
    cfg = _with_corrupt_pages(folder, tiny_classifier, tmp_path)
    with pytest.raises(DataError, match=r"zz-truncated\.parquet: cannot read as Parquet .*--skip-bad-files"):
        label.run(cfg)
    assert not (tmp_path / "out").exists()

    summary = label.run(LabelConfig(**{**cfg.__dict__, "on_bad_file": "skip"}))
    assert [f["path"] for f in summary["files_skipped"]] == [str(folder / "zz-truncated.parquet")]
    assert [u["path"] for u in summary["units_unreadable"]] == [str(folder / "zz-pages.parquet")]
    assert summary["rows_unreadable"] == 120 and summary["rows_read"] == summary["rows_written"] == 360
    check_labels(read_parts(cfg.output), table)


def test_invalid_utf8_text_is_counted_and_every_other_row_labeled(ray_cluster, tiny_classifier, tmp_path):
    """A text whose bytes are not UTF-8 gets reason invalid_text; it must not fail its unit, nor the job."""
    texts = [t.encode() for t in ["a fine film", "dull", "moving", "flat"]] * 10
    texts[7] = b"\xed\xa0\xbd oops"  # a UTF-16 surrogate encoded as if it were a character: not UTF-8
    texts[8] = None
    pq.write_table(pa.table({"id": pa.array(range(40), pa.int64()),
                             "text": pa.array(texts, pa.binary()).view(pa.string())}),
                   tmp_path / "bad.parquet", row_group_size=10)
    cfg = LabelConfig(model=tiny_classifier, input=str(tmp_path / "bad.parquet"), output=str(tmp_path / "out"),
                      rows_per_file=20, actors=1)
    summary = label.run(cfg)
    assert summary["rows_read"] == summary["rows_written"] == 40 and summary["rows_unreadable"] == 0
    assert summary["rows_without_label"] == {"invalid_text": 1, "null_text": 1}
    assert summary["rows_labeled"] == 38
    out = read_parts(cfg.output)
    assert out.column("id").to_pylist() == list(range(40))
    assert [r["reason"] for r in out.to_pylist() if r["label"] is None] == ["invalid_text", "null_text"]
    assert out.to_pylist()[7]["reason"] == "invalid_text" and out.to_pylist()[8]["reason"] == "null_text"


# ------------------------------------------------------------------------------------------ through the CLI


def count_parts(folder: Path) -> int:
    return len([n for n in os.listdir(folder) if n.startswith("part-")]) if folder.exists() else 0


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bertray.cli", "label", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_cli_exit_codes(ray_cluster, tmp_path, tiny_classifier, write_parquet_here):
    p = cli("--model", tiny_classifier, "--input", str(tmp_path))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "output: required" in err
    write_parquet_here(tmp_path / "in" / "a.parquet", {"id": [1], "body": ["x"]})
    address = ray_cluster.get_runtime_context().gcs_address
    p = cli("--model", tiny_classifier, "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--address", address)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "a.parquet: no text column 'text'; the file has: id (int64), body (string)" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(ray_cluster, tiny_classifier, tmp_path, corpus_maker):
    """SIGKILL the CLI driver once some part files exist; the same command then finishes the job, and the output
    holds every input row exactly once."""
    table = corpus_maker(tmp_path / "in", files=4, rows=200, row_group_size=20)
    out = tmp_path / "out"
    args = ["--model", tiny_classifier, "--input", str(tmp_path / "in"), "--output", str(out), "--rows-per-file", "20",
            "--actors", "1", "--passthrough", "group,weight",
            "--address", ray_cluster.get_runtime_context().gcs_address]
    first = cli(*args, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None and count_parts(out) < 3:
        time.sleep(0.05)
    assert first.poll() is None, f"first run ended before it could be killed: {first.communicate()[1][-2000:]}"
    os.kill(first.pid, signal.SIGKILL)
    first.communicate(timeout=30)
    done_before = count_parts(out)
    assert not (out / "_SUCCESS").exists() and 3 <= done_before < 40

    second = cli(*args)
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr[-3000:]
    assert f"labeled 800 of 800 rows into {out}" in stdout  # a line for people; the summary is in its file
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["units"] == 40 and summary["units_done_earlier"] >= done_before
    assert summary["rows_read"] == summary["rows_written"] == 800
    check_labels(read_parts(str(out)), table)
    assert (out / "_SUCCESS").exists()
    assert "label: 40/40 units" in stderr


def test_a_run_stopped_by_a_corrupt_page_resumes_with_skip_bad_files(ray_cluster, tiny_classifier, corpus, tmp_path):
    """The error says to pass --skip-bad-files; doing so on the same output resumes it (units done are kept)."""
    folder, table = corpus
    cfg = _with_corrupt_pages(folder, tiny_classifier, tmp_path)
    with pytest.raises(DataError, match=r"zz-pages\.parquet: cannot read rows .*--skip-bad-files"):
        label.run(cfg)
    summary = label.run(LabelConfig(**{**cfg.__dict__, "on_bad_file": "skip"}))
    assert [u["path"] for u in summary["units_unreadable"]] == [str(folder / "zz-pages.parquet")]
    assert summary["rows_read"] == summary["rows_written"] == table.num_rows
    check_labels(read_parts(cfg.output), table)

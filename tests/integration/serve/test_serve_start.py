"""Starting and stopping `bertray serve`: a held port and replicas that cannot load the model each end in one
clear error, not a traceback from inside Serve; SIGTERM stops the server and its local Ray.

A module of its own: Serve must not be running yet, or serve.start would reuse the running proxy and its port."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import requests


@pytest.mark.parametrize("ingress", ["haproxy", "proxy"])
def test_a_taken_port_gets_one_clear_error(ray_cluster, ingress):
    from ray import serve

    from bertray.serve import ServeStartError, start_http

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        try:
            with pytest.raises(ServeStartError) as e:
                start_http("127.0.0.1", port, ingress)
        finally:
            serve.shutdown()
    assert str(e.value) == (f"Ray Serve's HTTP proxy could not listen on 127.0.0.1:{port}: the port is in use by "
                            "another process. Choose another --port, or stop that process.")


def test_a_taken_haproxy_stats_port_is_named(ray_cluster, unused_port, monkeypatch):
    """HAProxy binds a stats page on a port of its own; when another process holds it (as an outgoing connection
    once did in CI), the error names that port and its variable, not the app's --port."""
    from ray import serve

    from bertray.serve import ServeStartError, start_http

    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        stats = holder.getsockname()[1]
        monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", str(stats))
        try:
            with pytest.raises(ServeStartError) as e:
                start_http("127.0.0.1", unused_port, "haproxy")
        finally:
            serve.shutdown()
    assert str(e.value) == (f"Ray Serve's HAProxy could not listen on port {stats}, its stats page "
                            "(RAY_SERVE_HAPROXY_STATS_PORT): the port is in use by another process. "
                            "Set RAY_SERVE_HAPROXY_STATS_PORT to a free port.")


def test_replicas_that_cannot_load_the_model_end_in_one_clear_error(ray_cluster, tiny_classifier_dir, tmp_path,
                                                                    unused_port):
    """Replicas that fail to load their model: after Serve's retries the caller of deploy gets one line, not Serve's
    traceback. (`bertray serve` refuses these damaged weights before Serve starts: the pre-flight check below.)"""
    from ray import serve

    from bertray.config import ServeConfig
    from bertray.modeling import ModelError
    from bertray.serve import ServeStartError, _check_model, deploy

    model = shutil.copytree(tiny_classifier_dir, tmp_path / "damaged")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="model.safetensors: the weights file is damaged or incomplete"):
        _check_model(str(model))
    try:
        with pytest.raises(ServeStartError) as e:
            deploy(ServeConfig(model=str(model), port=unused_port, cpus_per_replica=0.5), name="damaged")
    finally:
        serve.shutdown()
    assert "Deploying application damaged failed" in str(e.value)
    # The replica's own exception, from Serve's status, ends the line: here the weights check naming the file.
    assert "The replicas could not start: " in str(e.value) and "damaged or incomplete" in str(e.value), str(e.value)


def test_rays_python_proxy_still_serves_when_chosen(ray_cluster, tiny_classifier_dir, unused_port, port_owners):
    """ingress='proxy' (Serve's own Python proxy actor, for clusters without HAProxy): the same app answers on the
    port, and the port is the proxy actor's, not HAProxy's. The HAProxy default is checked in test_serve.py."""
    from ray import serve

    from bertray.config import ServeConfig
    from bertray.serve import deploy

    try:
        deploy(ServeConfig(model=str(tiny_classifier_dir), port=unused_port, cpus_per_replica=0.5, ingress="proxy"),
               name="proxied")
        r = requests.post(f"http://127.0.0.1:{unused_port}/v1/classify", json={"texts": ["fine", "dull"]}, timeout=60)
        owners = port_owners(unused_port)
    finally:
        serve.shutdown()
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2, r.text
    assert owners == {"ray::ProxyActor"}, owners


def test_sigterm_stops_the_server_and_its_local_ray_like_ctrl_c(tiny_classifier_dir, unused_port):
    """`docker stop`, systemd and Kubernetes send SIGTERM: `bertray serve` must shut Serve down, exit 0 and take
    the local Ray it started with it (Ray's own handler left its agent processes running)."""
    model, port = tiny_classifier_dir, unused_port
    # RAY_ADDRESS=local: a Ray of its own, never the test session's or another test's `ray start` cluster.
    env = {**os.environ, "RAY_ADDRESS": "local"}
    proc = subprocess.Popen([sys.executable, "-m", "bertray.cli", "serve", "--model", str(model), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the proxy up before the app
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.5)
        started = psutil.Process(proc.pid).children(recursive=True)  # raylet, GCS, agents, workers
        assert any("raylet" in " ".join(p.cmdline()) for p in started), [p.cmdline()[:1] for p in started]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopping" in out and "SIGTERM received" not in out, out[-3000:]
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, [" ".join(p.cmdline())[:80] for p in alive]

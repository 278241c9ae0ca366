"""Who takes HTTP requests (ServeConfig.ingress), and what bertray hands Serve's controller for it.

Serve reads its ingress settings from the environment of its processes, so `start_http` passes them in the
controller's runtime env; these tests read what it passes (serve.start recorded, no Ray cluster). That the
settings take effect in a running Serve is checked in tests/integration/serve."""
from __future__ import annotations

import logging
import os
import stat

import pytest

from bertray import cli
from bertray import config as C
from bertray import serve as S

_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")


@pytest.fixture()
def started(monkeypatch):
    """serve.start recorded instead of run; a clean slate of the variables bertray sets."""
    for name in (*_PORTS, "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
                 "RAY_SERVE_HAPROXY_SOCKET_PATH"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(S.serve, "start", lambda **kw: calls.append(kw))
    monkeypatch.setattr("bertray.runtime.alive_nodes", lambda: 1)
    return lambda: calls[-1]["controller_options"]["runtime_env"]["env_vars"]


def test_ingress_is_a_checked_config_key_and_a_flag():
    assert C.load(C.ServeConfig, data={"model": "m"}).ingress == "haproxy"
    assert cli.build_config("serve", None, [], {"model": "m", "ingress": "proxy"}).ingress == "proxy"
    with pytest.raises(C.ConfigError, match="ingress: expected one of"):
        C.load(C.ServeConfig, data={"model": "m"}, overrides=["ingress=nginx"])


def test_haproxy_gets_free_ports_a_private_folder_and_a_short_drain(started, monkeypatch):
    """HAProxy's fixed stats/metrics ports and Serve's fallback proxy port (8404, 9101, 8500) would collide with a
    second Serve on the machine; its admin socket (mode 666) must not sit in a folder every user can enter; Ray's
    30 s drain is for external balancers. A variable the user set is kept, except the ingress itself."""
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")  # e.g. left in the shell: the config decides
    S.start_http("127.0.0.1", 8000, "haproxy")
    env = started()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert 0 < float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30
    ports = {int(env[k]) for k in _PORTS}
    assert len(ports) == 3 and not ports & {8404, 9101, 8500}, ports
    folder = os.path.dirname(env["RAY_SERVE_HAPROXY_SOCKET_PATH"])
    st = os.stat(folder)
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    S.start_http("127.0.0.1", 8000, "haproxy")
    assert started()["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_proxy_turns_haproxy_off_even_where_the_cluster_turns_it_on(started, monkeypatch):
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")  # as cluster/rayservice.yaml sets it on every pod
    S.start_http("127.0.0.1", 8000, "proxy")
    env = started()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and not set(_PORTS) & set(env)


def test_without_an_haproxy_binary_it_says_so_and_serves_through_rays_proxy(started, monkeypatch, caplog):
    monkeypatch.setattr(S, "_haproxy_binary", lambda: None)
    with caplog.at_level(logging.WARNING, logger="bertray.serve"):
        S.start_http("127.0.0.1", 8000, "haproxy")
    assert started()["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert "HAProxy not found" in caplog.text and "--ingress proxy" in caplog.text


def test_a_loopback_host_on_a_multinode_cluster_is_refused_before_serve_starts(started, monkeypatch):
    """Replicas on other nodes would listen on loopback, where HAProxy cannot reach them."""
    monkeypatch.setattr("bertray.runtime.alive_nodes", lambda: 3)
    with pytest.raises(S.ServeStartError) as e:
        S.start_http("127.0.0.1", 8000, "haproxy")
    assert "--host 127.0.0.1 on a 3-node cluster" in str(e.value) and "--host 0.0.0.0" in str(e.value)
    S.start_http("0.0.0.0", 8000, "haproxy")  # reachable: starts
    S.start_http("127.0.0.1", 8000, "proxy")  # actor calls reach every node: starts
    assert started()["RAY_SERVE_ENABLE_HA_PROXY"] == "0"

"""bertray.serve without a Ray cluster: what it hands Serve's controller and replicas, and what it refuses before
Serve starts.

Who takes HTTP requests (ServeConfig.ingress): Serve reads its ingress settings from the environment of its
processes, so `start_http` passes them in the controller's runtime env; these tests read what it passes
(serve.start recorded). The application `build_app` makes hands replicas no API key in a runtime env (Ray logs
those), and a model that is missing or not a classifier is refused before anything starts. That the settings
take effect in a running Serve is checked in tests/integration/serve."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from bertray import cli
from bertray import config as C
from bertray import serve as S

REPO = Path(__file__).resolve().parents[2]

_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")
_FILES = ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE",
          "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH")
# A value that must never show up in what Ray is handed (tests/integration/test_secrets.py plants the same).
PLANTED = {"MY_API_KEY": "planted-api-5d20"}


@pytest.fixture()
def started(monkeypatch, tmp_path_factory):
    """serve.start recorded instead of run, an HAProxy binary present, a TMPDIR of the test's own (short: Serve's
    socket paths must fit 107 bytes), and none of the variables bertray sets. Returns the list of recorded calls."""
    # pytest picks its own base folder from tempfile on first use; fix it now, or a later test's tmp_path would land
    # in this test's folder, deleted below.
    tmp_path_factory.getbasetemp()
    for name in (*_PORTS, *_FILES, "RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "RAY_SERVE_ENABLE_HA_PROXY",
                 "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "RAY_SERVE_HAPROXY_BINARY_PATH"):
        monkeypatch.delenv(name, raising=False)
    tmp = tempfile.mkdtemp(prefix="bt", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", tmp)
    monkeypatch.setattr(S, "_haproxy_binary", lambda: "/opt/haproxy")
    monkeypatch.setattr("bertray.runtime.alive_nodes", lambda: 1)
    calls = []
    monkeypatch.setattr(S.serve, "start", lambda **kw: calls.append(kw["controller_options"]["runtime_env"]["env_vars"]))
    yield calls
    shutil.rmtree(tmp, ignore_errors=True)


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
    env = started[-1]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert 0 < float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30
    ports = {int(env[k]) for k in _PORTS}
    assert len(ports) == 3 and not ports & {8404, 9101, 8500}, ports
    folder = env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    assert folder.startswith(tempfile.tempdir) and {os.path.dirname(env[k]) for k in _FILES} == {folder}
    st = os.lstat(folder)
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    S.start_http("127.0.0.1", 8000, "haproxy")
    assert started[-1]["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"


def test_the_private_folder_is_closed_if_open_and_refused_if_a_link(started, tmp_path):
    folder = os.path.join(tempfile.tempdir, f"bertray-hap-{os.getuid()}")
    os.makedirs(folder, mode=0o755)
    os.chmod(folder, 0o755)
    assert S._private_dir() == folder and stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    os.rmdir(folder)
    os.symlink(tmp_path, folder)  # someone else's folder, reached through a link
    with pytest.raises(S.ServeStartError, match="not a folder of this user's"):
        S._private_dir()


def test_proxy_turns_haproxy_off_even_where_the_cluster_turns_it_on(started, monkeypatch):
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")  # as cluster/rayservice.yaml sets it on every pod
    S.start_http("127.0.0.1", 8000, "proxy")
    env = started[-1]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and not (set(_PORTS) | set(_FILES)) & set(env)


def test_without_an_haproxy_binary_it_says_so_and_serves_through_rays_proxy(started, monkeypatch, caplog):
    monkeypatch.setattr(S, "_haproxy_binary", lambda: None)
    with caplog.at_level(logging.WARNING, logger="bertray.serve"):
        S.start_http("127.0.0.1", 8000, "haproxy")
    assert started[-1]["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert "HAProxy not found" in caplog.text and "--ingress proxy" in caplog.text


def test_a_named_haproxy_that_is_not_there_is_an_error_not_a_fallback(monkeypatch):
    from ray.serve._private import haproxy

    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", "/nowhere/haproxy")
    monkeypatch.setattr(haproxy, "RAY_SERVE_HAPROXY_BINARY_PATH", "/nowhere/haproxy")  # Ray read it at import
    with pytest.raises(S.ServeStartError, match="/nowhere/haproxy"):
        S._haproxy_binary()


def test_a_loopback_host_on_a_multinode_cluster_is_refused_before_serve_starts(started, monkeypatch):
    """Replicas on other nodes would listen on loopback, where HAProxy cannot reach them."""
    monkeypatch.setattr("bertray.runtime.alive_nodes", lambda: 3)
    monkeypatch.setattr("ray.is_initialized", lambda: True)
    for host in ("127.0.0.1", "localhost", "[::1]"):
        with pytest.raises(S.ServeStartError) as e:
            S.start_http(host, 8000, "haproxy")
        assert f"--host {host} on a 3-node cluster" in str(e.value) and "--host 0.0.0.0" in str(e.value)
    assert started == []  # refused before Serve was asked to start
    S.start_http("0.0.0.0", 8000, "haproxy")  # reachable: starts
    S.start_http("127.0.0.1", 8000, "proxy")  # actor calls reach every node: starts
    assert [env["RAY_SERVE_ENABLE_HA_PROXY"] for env in started] == ["1", "0"]


def test_a_bind_error_blames_the_port_only_when_it_names_it():
    assert S._port_taken("Failed to bind to address '127.0.0.1:8000'.", 8000)
    assert S._port_taken("[ALERT] ... cannot bind socket (Address already in use) for [127.0.0.1:8000]", 8000)
    assert not S._port_taken("cannot bind socket (Address already in use) for [0.0.0.0:18000]", 8000)
    assert not S._port_taken("Failed to bind to address '127.0.0.1:80001'.", 8000)


def test_a_bind_error_on_one_of_haproxys_own_ports_names_that_port(monkeypatch):
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_PORT", raising=False)
    env = {"RAY_SERVE_HAPROXY_STATS_PORT": "21000", "RAY_SERVE_HAPROXY_METRICS_PORT": "21001"}
    taken = S._bind_error("cannot bind socket (Address already in use) for [0.0.0.0:21001]", "127.0.0.1", 8000, env)
    assert taken.startswith("Ray Serve's HAProxy could not listen on port 21001, its Prometheus exporter "
                            "(RAY_SERVE_HAPROXY_METRICS_PORT)"), taken
    assert taken.endswith("Start again: bertray picks a free port each time unless RAY_SERVE_HAPROXY_METRICS_PORT "
                          "is set."), taken  # not set here: bertray picked it
    assert "--port" in S._bind_error("Failed to bind to address '127.0.0.1:8000'.", "127.0.0.1", 8000, env)
    assert S._bind_error("cannot bind socket (Address already in use) for [0.0.0.0:21002]", "h", 8000, env) is None
    # Serve's retries of HAProxy find --port held by the first instance, so both appear; the cause is the stats port.
    both = ("cannot bind socket (Address already in use) for [127.0.0.1:8000]\n"
            "cannot bind socket (Address already in use) for [0.0.0.0:21000]")
    assert S._bind_error(both, "127.0.0.1", 8000, env).startswith("Ray Serve's HAProxy could not listen on port 21000")


def test_serve_hands_no_api_key_to_replicas_in_a_runtime_env(monkeypatch):
    from bertray.config import ServeConfig
    from bertray.serve import build_app

    monkeypatch.setenv("MY_API_KEY", PLANTED["MY_API_KEY"])
    app = build_app(ServeConfig(model="m", api_key_env="MY_API_KEY"))
    assert PLANTED["MY_API_KEY"] not in json.dumps(app._bound_deployment.ray_actor_options)


def test_serve_refuses_a_model_that_is_not_a_classifier_before_starting_anything(tmp_path):
    """Checked on the two JSON files before Ray Serve starts: otherwise each replica fails on it in turn and Serve
    ends with a traceback of its own."""
    from transformers import BertConfig

    from bertray import serve
    from bertray.config import ServeConfig
    from bertray.modeling import ModelError

    tiny = dict(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    BertConfig(**tiny, architectures=["BertModel"]).save_pretrained(tmp_path / "encoder")
    with pytest.raises(ModelError, match=r"encoder: not a sequence-classification model .*\['BertModel'\]"):
        serve.run(ServeConfig(model=str(tmp_path / "encoder")))

    BertConfig(**tiny, architectures=["BertForMaskedLM"]).save_pretrained(tmp_path / "mlm")
    (tmp_path / "mlm" / "bertray.json").write_text('{"kind": "mlm"}')
    with pytest.raises(ModelError, match="'mlm' checkpoint, not a classifier"):
        serve.run(ServeConfig(model=str(tmp_path / "mlm")))
    with pytest.raises(ModelError, match="no such model folder"):
        serve.run(ServeConfig(model=str(tmp_path / "missing")))


def test_a_mistyped_relative_path_is_named_as_missing_not_left_to_the_replicas(tmp_path, monkeypatch):
    """'runs/nope' reads as a Hugging Face Hub id; with no such folder and no such hub model (tests run with
    HF_HUB_OFFLINE=1) the message says both, before Serve starts. A run folder points at its model/."""
    from bertray import serve
    from bertray.config import ServeConfig
    from bertray.modeling import ModelError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="runs/nope: no such local folder, and no Hugging Face Hub model by that "
                                         "name could be fetched"):
        serve.run(ServeConfig(model="runs/nope"))
    (tmp_path / "runs" / "demo" / "model").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "model" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"runs/demo: folder has no config.json; expected a model folder "
                                         r"\(did you mean runs/demo/model\?\)"):
        serve.run(ServeConfig(model="runs/demo"))


def test_shipped_serve_config_is_valid_and_builds_the_app():
    """cluster/serve_config.yaml (for `serve deploy` / a RayService) passes Serve's schema, and its import path
    turns its args into the application; a bad arg is refused with the ServeConfig error."""
    import importlib

    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from bertray.config import ConfigError

    raw = yaml.safe_load((REPO / "cluster" / "serve_config.yaml").read_text())
    (app_cfg,) = ServeDeploySchema.model_validate(raw).applications
    module, _, attr = app_cfg.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    assert isinstance(builder(app_cfg.args), Application)
    with pytest.raises(ConfigError, match="max_batch_size"):
        builder({**app_cfg.args, "max_batch_size": "lots"})

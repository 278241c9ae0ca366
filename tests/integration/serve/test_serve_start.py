"""Starting Serve's HTTP proxy on a port another process holds: one clear error, not the proxy's traceback.

A module of its own: Serve must not be running yet, or serve.start would reuse the running proxy and its port."""
from __future__ import annotations

import socket

import pytest


def test_a_taken_port_gets_one_clear_error(ray_cluster):
    from ray import serve

    from bertray.serve import ServeStartError, start_http

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        try:
            with pytest.raises(ServeStartError) as e:
                start_http("127.0.0.1", port)
        finally:
            serve.shutdown()
    assert str(e.value) == (f"Ray Serve's HTTP proxy could not listen on 127.0.0.1:{port}: the port is in use by "
                            "another process. Choose another --port, or stop that process.")

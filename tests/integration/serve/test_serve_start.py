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


def test_replicas_that_cannot_load_the_model_end_in_one_clear_error(ray_cluster, tmp_path):
    """A classifier folder whose weights are damaged passes the pre-flight check (config and bertray.json are
    fine), so every replica fails on it; after Serve's retries the caller gets one line, not Serve's traceback."""
    import shutil

    from ray import serve
    from transformers import BertConfig, BertForSequenceClassification

    from bertray import modeling
    from bertray.config import ServeConfig
    from bertray.serve import ServeStartError, deploy

    model = tmp_path / "damaged"
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=8, num_hidden_layers=1,
                                             num_attention_heads=1, intermediate_size=8)).save_pretrained(model)
    modeling.load_tokenizer(modeling.resolve("embedded")).save_pretrained(model)
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        with pytest.raises(ServeStartError) as e:
            deploy(ServeConfig(model=str(model), port=port, cpus_per_replica=0.5), name="damaged")
    finally:
        serve.shutdown()
        shutil.rmtree(model)
    assert "Deploying application damaged failed" in str(e.value)
    # The replica's own exception, from Serve's status, ends the line: here safetensors refusing the file.
    assert "The replicas could not start: " in str(e.value) and "SafetensorError" in str(e.value), str(e.value)

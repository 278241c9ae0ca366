"""`--backend onnxruntime` end to end on the shared local Ray cluster: a `bertray label` run and a Serve request give
the labels that torch fp32 gives."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from bertray import cli, export
from bertray.predictor import Predictor

LABELS = ["negative", "positive"]
SST2 = Path(os.environ.get("BERTRAY_SHARED_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data")) / "sst2"

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return pq.read_table(SST2 / "validation.parquet", columns=["text"]).column("text").to_pylist()[:240]


def _labels(output: Path) -> dict[int, tuple[str, float]]:
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(output.glob("part-*.parquet"))]).to_pylist()
    return {r["id"]: (r["label"], r["score"]) for r in rows}


def test_label_run_through_onnxruntime_gives_torch_labels(ray_cluster, spread_classifier, texts, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), corpus / "part0.parquet")
    common = ["label", "--model", spread_classifier, "--input", str(corpus), "--rows-per-file", "80", "--actors", "1"]
    assert cli.main([*common, "--output", str(tmp_path / "torch")]) == 0
    # The checkpoint itself, exported on the fly by the actor.
    assert cli.main([*common, "--output", str(tmp_path / "ort"), "--backend", "onnxruntime"]) == 0
    torch_labels, ort_labels = _labels(tmp_path / "torch"), _labels(tmp_path / "ort")

    assert sorted(ort_labels) == list(range(len(texts)))
    assert {i: label for i, (label, _) in ort_labels.items()} == {i: label for i, (label, _) in torch_labels.items()}
    assert len({label for label, _ in torch_labels.values()}) == 2, "the test model should not be constant"
    scores = np.array([[torch_labels[i][1], ort_labels[i][1]] for i in torch_labels])
    assert np.abs(scores[:, 0] - scores[:, 1]).max() <= export.TOLERANCE
    summary = json.loads((tmp_path / "ort" / "_summary.json").read_text())
    assert summary["backend"] == "onnxruntime" and summary["rows_labeled"] == len(texts)
    assert json.loads((tmp_path / "ort" / "_plan.json").read_text())["config"]["backend"] == "onnxruntime"


def test_serve_request_through_onnxruntime_gives_torch_labels(ray_cluster, spread_classifier, texts, tmp_path, healthy):
    from ray import serve

    from bertray.config import ServeConfig
    from bertray.runtime import free_ports
    from bertray.serve import build_app, start_http

    onnx_dir = str(tmp_path / "onnx")
    export.run(spread_classifier, onnx_dir)
    cfg = ServeConfig(model=onnx_dir, backend="onnxruntime", cpus_per_replica=0.5, max_texts=64)
    port = free_ports(1)[0]
    url = f"http://127.0.0.1:{port}/onnx"
    start_http("127.0.0.1", port, cfg.ingress)
    try:
        serve.run(build_app(cfg), name="onnx", route_prefix="/onnx")
        healthy(url)
        sample = texts[:64]
        r = requests.post(url + "/v1/classify", data=json.dumps({"texts": sample, "probabilities": True}),
                          headers={"Content-Type": "application/json"}, timeout=120)
        assert r.status_code == 200, r.text
        info = requests.get(url + "/v1/model", timeout=30).json()
    finally:
        serve.shutdown()
    preds = r.json()["predictions"]
    expected = Predictor(spread_classifier).predict(sample).probs
    assert [p["label"] for p in preds] == [LABELS[i] for i in expected.argmax(-1)]
    got = np.array([[p["probabilities"][n] for n in LABELS] for p in preds])
    assert np.abs(got - expected).max() <= export.TOLERANCE
    assert info["backend"] == "onnxruntime" and info["model"] == onnx_dir

"""`bertray export --format onnx` and the onnxruntime backend: scores within tolerance of PyTorch through the same
passes, int8, the on-the-fly export, and every refusal as one line with nothing written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bertray import checkpoint, cli, export, modeling
from bertray import config as C
from bertray.modeling import ModelError
from bertray.predictor import Predictor

LABELS = ["negative", "positive"]


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch) -> Path:
    """A model cache of the test's own, so on-the-fly exports are made here, not found from earlier runs."""
    monkeypatch.setenv("BERTRAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def sst2_validation(shared_data) -> str:
    return str(shared_data / "sst2" / "validation.parquet")


@pytest.fixture(scope="module")
def texts(sst2_validation) -> list[str]:
    """300 SST-2 validation sentences."""
    return pq.read_table(sst2_validation, columns=["text"]).column("text").to_pylist()[:300]


def _save(folder: Path, model, tokenizer) -> str:
    checkpoint.save(folder, model, tokenizer, {"kind": "classifier", "base_model": "test", "label_names": LABELS,
                                               "config": {"model": {"max_length": 128, "truncation": "head"}}})
    return str(folder)


@pytest.fixture(scope="module")
def tiny(spread_classifier) -> str:
    return spread_classifier


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, texts) -> str:
    """The embedded MiniLM with a head that splits SST-2 sentences about evenly: a random head on a sentence encoder
    gives every text nearly the same score, so it is set from the pooled features' spread over the sentences."""
    import torch

    from bertray.config import ModelConfig

    model = modeling.build_classifier(ModelConfig(base="embedded"), LABELS).eval()
    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    with torch.no_grad():
        pooled = model.bert(**tok(texts, padding=True, return_tensors="pt")).pooler_output
        torch.manual_seed(1)
        w = torch.randn(2, pooled.shape[1]) / pooled.std(0)
        model.classifier.weight.copy_(w / pooled.shape[1] ** 0.5)
        model.classifier.bias.copy_(-(model.classifier.weight @ pooled.mean(0)))
    return _save(tmp_path_factory.mktemp("minilm"), model, tok)


@pytest.fixture(scope="module")
def tiny_onnx(tiny, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("exports") / "tiny-onnx"
    export.run(tiny, str(out))
    return str(out)


@pytest.fixture(scope="module")
def tiny_int8(tiny, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("exports") / "tiny-int8"
    export.run(tiny, str(out), quantize="int8")
    return str(out)


def test_export_folder_is_a_self_describing_onnx_model(tiny, tiny_onnx):
    import onnx

    assert sorted(os.listdir(tiny_onnx)) == ["bertray.json", "config.json", "model.onnx", "tokenizer.json",
                                             "tokenizer_config.json"]
    meta = json.loads(Path(tiny_onnx, "bertray.json").read_text())
    source = checkpoint.read_meta(tiny)
    assert meta["format"] == export.FORMAT and meta["quantize"] == "none" and meta["source_model"] == tiny
    assert {k: meta[k] for k in ("base_model", "label_names", "config")} == \
        {k: source[k] for k in ("base_model", "label_names", "config")}
    parity = meta["parity"]
    assert parity["sample"] == {"texts": export.SAMPLE_TEXTS, "tokens": parity["sample"]["tokens"],
                                "source": "random token ids", "tolerance": export.TOLERANCE}
    assert parity["fp32"]["max_abs_prob_diff"] <= export.TOLERANCE and parity["fp32"]["top_label_agreement"] == 1.0
    # Batch and sequence axes are named, not fixed at the export example's 2 x 8.
    graph = onnx.load(str(Path(tiny_onnx, "model.onnx"))).graph
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert shapes == {n: ["batch", "sequence"] for n in ("input_ids", "attention_mask", "token_type_ids")}
    assert [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim] == ["batch", 2]
    # A plain transformers config and tokenizer: other runtimes read the labels from it.
    assert json.loads(Path(tiny_onnx, "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}


@pytest.mark.parametrize("model", ["tiny", "minilm"])
def test_onnxruntime_scores_match_pytorch_within_tolerance(model, request, texts, tmp_path, sst2_validation):
    uri = request.getfixturevalue(model)
    out = tmp_path / "onnx"
    meta = export.run(uri, str(out), sample=sst2_validation)
    assert meta["parity"]["sample"]["source"] == sst2_validation
    assert meta["parity"]["fp32"]["max_abs_prob_diff"] <= export.TOLERANCE

    expected = Predictor(uri).predict(texts).probs
    ort = Predictor(str(out), backend="onnxruntime")
    assert ort.model is None and not ort.packed
    got = ort.predict(texts).probs
    assert expected[:, 1].std() > 0.05  # scores that differ from text to text, so a wrong one shows
    assert np.abs(got - expected).max() <= export.TOLERANCE
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_onnxruntime_runs_the_same_passes(tiny_onnx, texts, monkeypatch):
    """Length-sorted passes under the token budget, padded to their longest text: only the logits come from ONNX
    Runtime."""
    ort = Predictor(tiny_onnx, backend="onnxruntime", token_budget=512)
    shapes = []
    run = ort.onnx.session.run

    def recorded(names, feed):
        shapes.append(feed["input_ids"].shape)
        return run(names, feed)

    monkeypatch.setattr(ort.onnx.session, "run", recorded)
    ids = ort.encode(texts)[0]
    ort.predict_ids(ids)
    lengths = sorted(len(x) for x in ids)
    assert sum(n for n, _ in shapes) == len(texts)
    assert all(n * width <= 512 and n <= 64 for n, width in shapes)
    assert [w for _, w in shapes] == sorted(w for _, w in shapes)
    assert {w for _, w in shapes} <= set(lengths)  # padded to the pass's longest text, never further


def test_int8_export_reports_label_agreement_and_runs_int8(tiny, tiny_onnx, tiny_int8, texts):
    import onnx

    meta = json.loads(Path(tiny_int8, "bertray.json").read_text())
    assert meta["quantize"] == "int8"
    assert meta["parity"]["fp32"]["max_abs_prob_diff"] <= export.TOLERANCE  # checked before quantizing
    assert 0.9 <= meta["parity"]["int8"]["top_label_agreement"] <= 1.0
    nodes = onnx.load(str(Path(tiny_int8, "model.onnx"))).graph.node
    head = {n.op_type for n in nodes if "/pooler/" in n.name or "/classifier/" in n.name}
    encoder = {n.op_type for n in nodes if "/encoder/" in n.name}
    # The encoder's linear layers run in int8; the pooler and classifier stay fp32, as in the PyTorch int8 path.
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= encoder
    assert "MatMul" in head and not head & {"MatMulInteger", "DynamicQuantizeLinear"}

    fp32 = Predictor(tiny).predict(texts).probs
    int8 = Predictor(tiny_int8, backend="onnxruntime", quantize="int8").predict(texts).probs
    assert np.abs(int8 - fp32).max() > export.TOLERANCE  # really another model
    assert (int8.argmax(-1) == fp32.argmax(-1)).mean() >= 0.9
    # An fp32 export asked for int8 is quantized on the fly into the cache, to the same graph.
    again = Predictor(tiny_onnx, backend="onnxruntime", quantize="int8").predict(texts).probs
    np.testing.assert_array_equal(again, int8)
    with pytest.raises(ModelError, match="holds an int8 ONNX model; run it with --quantize int8"):
        Predictor(tiny_int8, backend="onnxruntime")


def test_a_checkpoint_is_exported_on_the_fly_once_into_the_cache(tiny, tiny_onnx, texts, model_cache):
    first = Predictor(tiny, backend="onnxruntime")
    exports = [p for p in model_cache.iterdir() if p.is_dir()]
    assert len(exports) == 1 and (exports[0] / "model.onnx").exists()
    stamp = (exports[0] / "model.onnx").stat().st_mtime_ns
    second = Predictor(tiny, backend="onnxruntime")
    assert (exports[0] / "model.onnx").stat().st_mtime_ns == stamp
    assert [p for p in model_cache.iterdir() if p.is_dir()] == exports
    expected = Predictor(tiny_onnx, backend="onnxruntime").predict(texts).probs
    np.testing.assert_array_equal(first.predict(texts).probs, expected)
    np.testing.assert_array_equal(second.predict(texts).probs, expected)


def test_a_graph_that_scores_differently_is_refused_and_nothing_written(tiny, tmp_path, monkeypatch):
    """What a mis-traced graph looks like to the check: one that computes something else than the model."""
    import torch

    real = export._to_onnx

    def off_by_a_little(model, names, path, uri):
        with torch.no_grad():
            model.classifier.bias[1] += 0.01  # moves a probability near 0.5 by about 2.5e-3
        real(model, names, path, uri)

    monkeypatch.setattr(export, "_to_onnx", off_by_a_little)
    out = tmp_path / "out"
    with pytest.raises(ModelError, match=r"differ from PyTorch's by up to .* \(tolerance 0.0001\); nothing written"):
        export.run(tiny, str(out))
    assert not out.exists()


@pytest.fixture(scope="module")
def funnel(tmp_path_factory) -> str:
    """A tiny Funnel Transformer classifier: PyTorch runs it, but its traced graph keeps the example's sequence
    length in its pooling and fails at any other."""
    import torch
    from transformers import FunnelConfig, FunnelForSequenceClassification

    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    cfg = FunnelConfig(vocab_size=tok.vocab_size, d_model=32, n_head=2, d_head=16, d_inner=64, block_sizes=[1, 1],
                       num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    return _save(tmp_path_factory.mktemp("funnel"), FunnelForSequenceClassification(cfg), tok)


def test_cli_export_and_its_refusals_are_one_line(tiny, tiny_onnx, funnel, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.main(["export", tiny, "--format", "onnx", "--quantize", "int8", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["quantize"] == "int8" and 0.9 <= printed["parity"]["int8"]["top_label_agreement"] <= 1.0
    assert printed == {"output": str(out), "quantize": "int8",
                       "parity": json.loads((out / "bertray.json").read_text())["parity"]}

    refusals = [
        (tiny, out, f"error: {out}: already exists and is not empty"),
        (tiny_onnx, tmp_path / "again", f"error: {tiny_onnx}: is an ONNX export already"),
        (funnel, tmp_path / "funnel", f"error: {funnel}: FunnelForSequenceClassification: the exported graph fails "
                                      "in ONNX Runtime on the sample; PyTorch's ONNX exporter does not handle this "
                                      "architecture ("),
    ]
    for model, output, message in refusals:
        assert cli.main(["export", model, "--output", str(output)]) == 1
        captured = capsys.readouterr()
        errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(message), captured.err
        assert "aten::" not in captured.out + captured.err  # the exporter's graph dump stays out of sight
    assert not (tmp_path / "again").exists() and not (tmp_path / "funnel").exists()


def test_backend_options_that_cannot_go_together(tiny, tiny_onnx):
    with pytest.raises(ModelError, match="is an ONNX export; run it with --backend onnxruntime"):
        Predictor(tiny_onnx)
    with pytest.raises(ValueError, match="--backend onnxruntime runs on CPU"):
        Predictor(tiny_onnx, device="cuda", backend="onnxruntime")
    with pytest.raises(ValueError, match="--quantize bf16 is a torch option"):
        Predictor(tiny_onnx, backend="onnxruntime", quantize="bf16")
    with pytest.raises(C.ConfigError, match="backend: onnxruntime runs on CPU; set gpus_per_actor=0"):
        C.load(C.LabelConfig, data={"model": "m", "input": "i", "output": "o", "backend": "onnxruntime",
                                    "gpus_per_actor": 1})
    with pytest.raises(C.ConfigError, match="backend: onnxruntime runs on CPU; set gpus_per_replica=0"):
        C.load(C.ServeConfig, data={"model": "m", "backend": "onnxruntime", "gpus_per_replica": 1})
    with pytest.raises(C.ConfigError, match="quantize: bf16 is a torch option"):
        C.load(C.ServeConfig, data={"model": "m", "backend": "onnxruntime", "quantize": "bf16"})
    assert C.load(C.LabelConfig, data={"model": "m", "input": "i", "output": "o"}).backend == "torch"


def test_cli_evaluate_through_onnxruntime(tiny, tiny_onnx, tmp_path, capsys, sst2_validation):
    data = sst2_validation
    assert cli.main(["evaluate", tiny, data, "--out", str(tmp_path / "torch"), "--max-rows", "200"]) == 0
    torch_summary = json.loads(capsys.readouterr().out)
    assert cli.main(["evaluate", tiny_onnx, data, "--out", str(tmp_path / "ort"), "--max-rows", "200",
                     "--backend", "onnxruntime"]) == 0
    ort_summary = json.loads(capsys.readouterr().out)
    assert ort_summary["backend"] == "onnxruntime" and torch_summary["backend"] == "torch"
    assert ort_summary["accuracy"] == torch_summary["accuracy"] and ort_summary["n"] == 200
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", tiny_onnx, data, "--backend", "onnxruntime", "--quantize", "bf16"])
    assert exc.value.code == 2 and "--quantize bf16 is a torch option" in capsys.readouterr().err


def test_onnxruntime_scores_multi_label_pairs_and_chunked_texts_as_torch(texts, tmp_path):
    """The backend computes only each pass's logits: a multi-label head's sigmoid, pairs' segment ids and the
    pooling of a long text's windows are the torch path's code, and give torch's scores."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    names = ["a", "b", "c"]
    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128, initializer_range=0.5, num_labels=3,
                     id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                     problem_type="multi_label_classification")
    torch.manual_seed(0)
    folder = tmp_path / "multi-label"
    checkpoint.save(folder, BertForSequenceClassification(cfg), tok, {
        "kind": "classifier", "base_model": "test", "label_names": names, "task": "multi_label",
        "config": {"model": {"max_length": 16, "long_text": "chunk", "chunk_overlap": 4}}})
    torch_pred, ort_pred = Predictor(str(folder)), Predictor(str(folder), backend="onnxruntime")
    assert ort_pred.onnx is not None and ort_pred.multi_label

    long = [" ".join(texts[i:i + 4]) for i in range(0, 80, 4)]  # several 16-token windows each
    a, b = torch_pred.predict(long), ort_pred.predict(long)
    assert a.windows.min() > 1 and a.windows.tolist() == b.windows.tolist()
    assert np.abs(a.probs - b.probs).max() < export.TOLERANCE
    assert not np.allclose(a.probs.sum(1), 1, atol=0.05)  # a sigmoid per label, not a softmax
    head = Predictor(str(folder), backend="onnxruntime", long_text="truncate").predict(long)
    assert np.abs(head.probs - b.probs).max() > 10 * export.TOLERANCE  # the windows were pooled, not the head read

    a, b = torch_pred.predict(texts[:20], texts[20:40]), ort_pred.predict(texts[:20], texts[20:40])
    assert np.abs(a.probs - b.probs).max() < export.TOLERANCE
    torch_pred.sep_id = None  # the same pairs with every segment id 0: the equality above needed the segments
    assert np.abs(torch_pred.predict(texts[:20], texts[20:40]).probs - b.probs).max() > 10 * export.TOLERANCE

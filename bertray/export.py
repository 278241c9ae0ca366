"""`bertray export MODEL --format onnx [--quantize int8] --output DIR`, and the onnxruntime backend that runs it.

An export is a model folder like a checkpoint (config.json with the labels, tokenizer files, bertray.json) whose
weights are `model.onnx`: a graph with dynamic batch and sequence axes that ONNX Runtime, Triton or TEI run without
PyTorch. Export runs the PyTorch model and the ONNX one on a sample and refuses to write a graph whose class
probabilities differ by more than TOLERANCE; an int8 graph (ONNX Runtime's dynamic quantizer) is reported instead
by how many of the fp32 model's top labels it keeps, as `bertray evaluate --quantize int8` reports its accuracy.

`Predictor(..., backend="onnxruntime")` runs an export, or a checkpoint exported on the fly into the model cache,
through OnnxLogits: ONNX Runtime computes each padded pass's logits, and Predictor keeps its own tokenizing,
length-sorted passes and softmax.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from bertray import checkpoint, modeling, storage
from bertray.modeling import ModelError

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
FORMAT = "bertray-onnx/1"  # bertray.json's `format` in an export (a checkpoint's is checkpoint.FORMAT)
OPSET = 17  # the lowest opset with LayerNormalization as one op; ONNX Runtime fuses it and attention on load
# Largest difference in any class probability, ONNX Runtime against PyTorch, that an fp32 export may show on the
# sample. Both run the same fp32 arithmetic in another order, which moves probabilities by about 1e-6; a graph that
# traced wrongly (a shape or mask frozen at the example's value) moves them by far more.
TOLERANCE = 1e-4
SAMPLE_TEXTS = 256  # texts in the parity sample
INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the graph's inputs, of those the tokenizer gives


def run(model: str, output: str, quantize: str = "none", sample: str | None = None, text_column: str = "text") -> dict:
    """Export classifier `model` to ONNX in `output` (a new or empty folder, local or s3://); returns bertray.json.
    `sample`: Parquet/CSV/JSON Lines whose `text_column` holds the parity texts; None: random token ids."""
    if storage.exists(output) and (not storage.is_dir(output) or storage.list_files(output)):
        raise ModelError(f"{output}: already exists and is not empty; choose a new or empty folder")
    texts = _sample_texts(sample, text_column) if sample else None
    staging = Path(tempfile.mkdtemp(prefix="bertray-export-"))
    try:
        meta = build(model, staging, quantize, texts, sample)
        # bertray.json last, as checkpoint.export does: a folder without it is not yet a model to readers.
        meta_text = (staging / checkpoint.META_FILE).read_text()
        (staging / checkpoint.META_FILE).unlink()
        storage.upload_dir(staging, output)
        storage.write_text(storage.join(output, checkpoint.META_FILE), meta_text)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def build(model_uri: str, folder: Path, quantize: str = "none", texts: list[str] | None = None,
          texts_from: str | None = None) -> dict:
    """Export `model_uri` into the local `folder` and check it against PyTorch on `texts` (read from `texts_from`;
    None: random token ids); returns the bertray.json written there. A ModelError, with `folder` left incomplete,
    if the fp32 graph does not run or does not match the PyTorch model within TOLERANCE."""
    from bertray.predictor import Predictor

    if quantize not in ("none", "int8"):
        raise ModelError(f"--quantize {quantize}: ONNX export quantizes to int8 only (or none)")
    if is_export(checkpoint.read_meta(model_uri if storage.is_remote(model_uri) else modeling.resolve(model_uri))):
        raise ModelError(f"{model_uri}: is an ONNX export already; export the checkpoint it came from")
    torch_pred = Predictor(model_uri)
    model, tokenizer = torch_pred.model, torch_pred.tokenizer
    ids = torch_pred.encode(texts)[0] if texts else _random_ids(tokenizer, torch_pred.max_length,
                                                                model.config.vocab_size)
    expected = torch_pred.predict_ids(ids)
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _to_onnx(model, [n for n in INPUTS if n in tokenizer.model_input_names], folder / ONNX_FILE, model_uri)
    meta = {k: v for k, v in torch_pred.meta.items() if k != "created"}  # write_meta dates the export itself
    meta.update({"kind": "classifier", "label_names": torch_pred.label_names, "format": FORMAT, "quantize": "none",
                 "source_model": model_uri, "opset": OPSET})
    checkpoint.write_meta(folder, meta)
    try:
        parity = _compare(folder, ids, expected, "none", torch_pred.max_length)
    except ModelError as exc:
        raise ModelError(f"{model_uri}: {type(model).__name__}: {exc}; nothing written") from None
    if parity["max_abs_prob_diff"] > TOLERANCE:
        raise ModelError(f"{model_uri}: the ONNX graph's probabilities differ from PyTorch's by up to "
                         f"{parity['max_abs_prob_diff']:.2g} on the sample (tolerance {TOLERANCE:g}); "
                         "nothing written")
    meta["parity"] = {"fp32": parity}
    if quantize == "int8":
        _quantize(folder / ONNX_FILE)
        meta["quantize"] = "int8"
        checkpoint.write_meta(folder, meta)
        meta["parity"]["int8"] = _compare(folder, ids, expected, "int8", torch_pred.max_length)
    meta["parity"]["sample"] = {"texts": len(ids), "tokens": sum(map(len, ids)),
                                "source": texts_from or "random token ids", "tolerance": TOLERANCE}
    checkpoint.write_meta(folder, meta)
    log.info("exported %s to ONNX (%s): %s", model_uri, quantize, json.dumps(meta["parity"]))
    return json.loads((folder / checkpoint.META_FILE).read_text())


def _compare(folder: Path, ids: list[list[int]], expected: np.ndarray, quantize: str, max_length: int) -> dict:
    """How the ONNX model in `folder` scores `ids` against `expected` (PyTorch fp32), through the same passes."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    from bertray.predictor import Predictor

    predictor = Predictor(str(folder), backend="onnxruntime", quantize=quantize, max_length=max_length)
    try:
        got = predictor.predict_ids(ids)
    except (ort_errors.Fail, ort_errors.RuntimeException, ort_errors.InvalidArgument) as exc:
        # A graph traced with a shape frozen at the example's fails at others' (Funnel's pooling, for one).
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"the exported graph fails in ONNX Runtime on the sample; PyTorch's ONNX exporter does not "
                         f"handle this architecture ({reason})") from None
    return {"max_abs_prob_diff": float(np.abs(got - expected).max()),
            "top_label_agreement": float((got.argmax(-1) == expected.argmax(-1)).mean())}


def _to_onnx(model, names: list[str], path: Path, model_uri: str) -> None:
    """Trace `model` into an ONNX graph taking `names` and giving `logits`, with dynamic batch and sequence axes."""
    # The example: two texts, the second padded, so the mask's effect on attention is traced as computed, not
    # folded away as it can be for a batch without padding.
    example = {"input_ids": torch.full((2, 8), 5, dtype=torch.long),
               "attention_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]),
               "token_type_ids": torch.zeros((2, 8), dtype=torch.long)}
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    try:
        with _quiet_stdout(), warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter (dynamo=False): the dynamo one needs onnxscript, which bertray does not pin.
            # Its deprecation and tracing warnings are about what the parity check in build verifies.
            warnings.simplefilter("ignore")
            # eval(): the exporter leaves the module in the mode it found it in, and `model` with it.
            torch.onnx.export(_Logits(model, names).eval(), tuple(example[n] for n in names), str(path),
                              input_names=names, output_names=["logits"],
                              dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=OPSET, dynamo=False)
    except torch.onnx.errors.OnnxExporterError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{model_uri}: PyTorch's ONNX exporter cannot export this {type(model).__name__} "
                         f"({reason})") from None


class _Logits(torch.nn.Module):
    """`model` as a function of positional tensors named `names` that returns only its logits: the exporter
    passes inputs by position, and a transformers model returns an output object."""

    def __init__(self, model, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, tensors))).logits


@contextlib.contextmanager
def _quiet_stdout():
    """Send file descriptor 1 to a temporary file while inside: the TorchScript exporter prints the whole Torch IR
    graph to C++'s stdout when it meets an op it cannot export, past any Python redirect. What it printed goes
    to the debug log."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile("w+b") as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            if printed := sink.read().decode(errors="replace").strip():
                log.debug("ONNX exporter output:\n%s", printed)


def _quantize(path: Path) -> None:
    """Replace the fp32 graph at `path` with its dynamic int8 form (ONNX Runtime's quantizer).

    As `predictor.quantize_int8` does for PyTorch: the encoder's matrix multiplications get int8 weights per output
    channel (a BERT weight matrix has rows of very different scales, and per tensor kept fewer of fp32's labels);
    the pooler and classifier, which run once per text rather than per token, stay fp32, as do the embeddings
    (quantizing their lookup shrank the file but changed more labels). Weights keep all 8 bits: 7
    (`reduce_range`) changed more labels, and ONNX Runtime chooses its int8 kernels on the machine that runs it."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(path), load_external_data=False).graph
    # Named, not excluded: the quantizer turns the head's Gemm nodes into MatMuls of other names first.
    encoder = [n.name for n in graph.node if n.op_type == "MatMul"
               and not any(part in n.name.lower() for part in ("pooler", "classifier", "score"))]
    out = path.with_name(f"int8-{path.name}")
    with _quiet_root_log("onnxruntime"):
        quantize_dynamic(str(path), str(out), op_types_to_quantize=["MatMul"], nodes_to_quantize=encoder,
                         per_channel=True, weight_type=QuantType.QInt8)
    out.replace(path)


@contextlib.contextmanager
def _quiet_root_log(package: str):
    """Drop records that `package` logs straight to the root logger while inside: ONNX Runtime's quantizer logs a
    line per tensor there, and advice to pre-process the graph, which changed nothing here."""
    def keep(record: logging.LogRecord) -> bool:
        return f"{os.sep}{package}{os.sep}" not in record.pathname

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _random_ids(tokenizer, max_length: int, vocab_size: int, n: int = SAMPLE_TEXTS, seed: int = 0) -> list[list[int]]:
    """`n` texts of random ordinary tokens wrapped in the tokenizer's [CLS]/[SEP]: mostly sentence lengths, and a
    few spread up to max_length, so the graph is checked at many widths, with padding, up to the longest."""
    rng = np.random.default_rng(seed)
    specials = tokenizer("", add_special_tokens=True)["input_ids"]
    room = max_length - len(specials)
    lengths = np.minimum(rng.geometric(1 / 24, size=n), room)
    lengths[-8:] = np.linspace(max(1, room // 8), room, 8).astype(int)
    ordinary = np.setdiff1d(np.arange(min(len(tokenizer), vocab_size)), tokenizer.all_special_ids)
    return [specials[:1] + rng.choice(ordinary, size=int(k)).tolist() + specials[1:] for k in lengths]


def _sample_texts(uri: str, column: str) -> list[str]:
    from bertray import data
    from bertray.config import DataConfig

    texts, _ = data.load_texts(uri, DataConfig(train=uri, text_columns=[column]))
    if not texts:
        raise ModelError(f"--sample {uri}: no texts in column {column!r}")
    if len(texts) > SAMPLE_TEXTS:
        texts = [texts[i] for i in sorted(np.random.default_rng(0).choice(len(texts), SAMPLE_TEXTS, replace=False))]
    return texts


# --------------------------------------------------------------------------------------------------- runtime


def is_export(meta: dict | None) -> bool:
    """Whether a model folder whose bertray.json is `meta` holds a bertray ONNX export. A model.onnx alone does not
    make one: some Hugging Face folders ship one beside their weights, with inputs and outputs of their own."""
    return (meta or {}).get("format") == FORMAT


def onnx_file(model_uri: str, folder: str, meta: dict, quantize: str) -> Path:
    """The ONNX graph the onnxruntime backend runs for `model_uri` (resolved to the local `folder`, or a hub id):
    the export's own, an fp32 export quantized, or a checkpoint exported, both on the fly into the model cache."""
    if is_export(meta):
        have = meta.get("quantize", "none")
        if have == quantize:
            return Path(folder) / ONNX_FILE
        if have == "int8":
            raise ModelError(f"{model_uri}: holds an int8 ONNX model; run it with --quantize int8 (or export the "
                             "model again without --quantize)")

        def quantized(tmp: Path) -> None:
            shutil.copy(Path(folder) / ONNX_FILE, tmp / ONNX_FILE)
            _quantize(tmp / ONNX_FILE)

        return _cached(folder, quantize, quantized) / ONNX_FILE
    return _cached(folder, quantize, lambda tmp: build(model_uri, tmp, quantize)) / ONNX_FILE


def _cached(folder: str, quantize: str, make) -> Path:
    """A cache folder that `make(tmp)` filled once per machine, keyed by `folder`'s files (names, sizes, times)
    and `quantize`. Processes that want the same one at once (label actors) wait for the first instead of all
    exporting."""
    # The folder storage.local_dir caches s3:// models in.
    default = Path(tempfile.gettempdir()) / f"bertray-cache-{os.getuid()}"
    root = storage.private_dir(os.environ.get("BERTRAY_CACHE", default), "set BERTRAY_CACHE to a folder of your own")
    stamps = ([f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(Path(folder).iterdir())]
              if os.path.isdir(folder) else [])
    key = hashlib.sha256("|".join([FORMAT, quantize, str(folder), *stamps]).encode()).hexdigest()[:16]
    target = root / f"onnx-{key}"
    with open(root / f"onnx-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            log.info("exporting %s to ONNX (%s) into %s", folder, quantize, target)
            tmp = Path(tempfile.mkdtemp(dir=root))
            try:
                make(tmp)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


class OnnxLogits:
    """An ONNX Runtime session on the CPU: the logits of one padded pass, as numpy arrays in and out."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # The threads torch was given (a label actor sets them to its CPUs), so a process keeps to its share.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 4  # fatal only: its errors arrive as exceptions too, and would print twice
        errors = ort.capi.onnxruntime_pybind11_state
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except (errors.Fail, errors.InvalidGraph, errors.InvalidProtobuf, errors.NoSuchFile) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"{path}: ONNX Runtime cannot load it ({reason})") from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                 token_type_ids: np.ndarray | None = None) -> np.ndarray:
        given = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": np.zeros_like(input_ids) if token_type_ids is None else token_type_ids}
        return self.session.run(["logits"], {n: given[n] for n in self.inputs})[0]


def onnx_logits(backend: str, model_uri: str, folder: str, meta: dict, quantize: str | None,
                device) -> OnnxLogits | None:
    """What Predictor runs its padded passes through: OnnxLogits for the onnxruntime backend, None for torch's own
    model. ValueError for a backend, device or quantize option that cannot go together."""
    if backend == "torch":
        if is_export(meta):
            raise ModelError(f"{model_uri}: is an ONNX export; run it with --backend onnxruntime")
        return None
    if backend != "onnxruntime":
        raise ValueError(f"unknown backend {backend!r}; use 'torch' or 'onnxruntime'")
    if device.type != "cpu":
        raise ValueError("--backend onnxruntime runs on CPU; drop the GPU option or use --backend torch")
    if quantize not in (None, "none", "int8"):
        raise ValueError(f"--quantize {quantize} is a torch option; with --backend onnxruntime use int8 or none")
    return OnnxLogits(onnx_file(model_uri, folder, meta, quantize or "none"), torch.get_num_threads())

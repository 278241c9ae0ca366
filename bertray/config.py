"""Typed configs: the one home of every default.

A YAML file holds only the differences from these defaults; `--set section.key=value` overrides are cast to
the field's type. `load(cls, path, overrides)` reports *every* problem (unknown keys, wrong types, bad values,
contradictory settings) in one `ConfigError`, before Ray starts.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """All problems found in a config, one per line."""

    def __init__(self, errors: list[str], source: str = "config"):
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in errors))


# --------------------------------------------------------------------------------------------------- sections


@dataclass
class AdapterConfig:
    # lora: PEFT LoRA adapters on the encoder's `target` linears; the base's own weights stay frozen, and the new
    # classification head (with any weight the base lacks, such as a pooler) trains in full. Checkpoints hold the
    # adapter and head only; the run exports the merged model (model/) and the adapter alone (adapter/).
    kind: Literal["none", "lora"] = "none"
    r: int = 8  # rank of each low-rank update
    alpha: int = 16  # the update is scaled by alpha / r
    dropout: float = 0.1  # dropout on the adapter's input
    target: list[str] = field(default_factory=lambda: ["query", "value"])  # module names, or dotted name endings (BERT: query, key, value, dense)


@dataclass
class ModelConfig:
    base: str = "embedded"  # 'embedded' (bundled all-MiniLM-L6-v2), a HF hub id, a local dir, or a bertray checkpoint (local or s3://)
    max_length: int = 128  # tokens per text including [CLS]/[SEP]
    truncation: Literal["head", "tail", "head+tail"] = "head"  # which tokens of a long text to keep
    # Texts longer than max_length when scoring (evaluate, label, serve): truncate (by `truncation`), or chunk: cut
    # into windows of max_length that share chunk_overlap tokens, score every window, and pool the windows' logits
    # per text (mean; or max: "any window says so"). Fine-tuning's validation scores as the checkpoint will.
    long_text: Literal["truncate", "chunk"] = "truncate"
    chunk_overlap: int = 32
    chunk_pool: Literal["mean", "max"] = "mean"
    # What fine-tuning trains on from a long text: one: the window `truncation` keeps; all (needs long_text chunk):
    # every window, each carrying its text's label(s).
    train_windows: Literal["one", "all"] = "one"
    freeze_encoder: bool = False  # train only the classification head
    freeze_layers: int = 0  # freeze the embeddings and the bottom N encoder layers
    dropout: Optional[float] = None  # classifier dropout; None keeps the model's own
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # fine-tuning only; implies a frozen base


@dataclass
class DataConfig:
    train: str = ""  # file, folder or glob of .parquet/.csv/.jsonl; local or s3://; or a Hugging Face dataset (hf_data)
    validation: Optional[str] = None  # same forms; None carves a seeded stratified split out of train
    validation_fraction: float = 0.1  # used only when validation is None
    text_columns: list[str] = field(default_factory=lambda: ["text"])  # joined with a space, e.g. [title, description]
    label_column: str = "label"  # integer ids or string names; for multi_label, lists of them (or a delimited string)
    # single_label: one class per text (softmax). multi_label: any number of labels per text (sigmoid per label,
    # per-label thresholds tuned on validation). auto: multi_label when the label column holds lists or
    # label_delimiter is set.
    task: Literal["auto", "single_label", "multi_label"] = "auto"
    label_delimiter: Optional[str] = None  # multi_label from a string column such as "anger,joy"
    # Sentence pairs: the second text of each pair (the first is text_columns); the tokenizer encodes them as a pair,
    # with segment ids, cutting the longer side first.
    text_pair_column: Optional[str] = None
    labels: Optional[list[str]] = None  # class names in id order; None: from labels.json beside the data, else inferred
    clean_html: bool = False  # strip tags such as <br /> and unescape entities
    normalize_whitespace: bool = True  # collapse runs of whitespace
    max_train_rows: Optional[int] = None  # seeded subsample of train (after cleaning)
    max_validation_rows: Optional[int] = None


@dataclass
class OptimConfig:
    lr: float = 5e-5  # peak learning rate of AdamW
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay after warmup
    warmup_ratio: float = 0.06  # fraction of total optimizer steps spent warming up
    warmup_steps: Optional[int] = None  # overrides warmup_ratio
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    adam_eps: float = 1e-8


@dataclass
class TrainConfig:
    batch_size: int = 32  # texts per worker per micro-batch
    epochs: float = 3.0
    max_steps: Optional[int] = None  # optimizer steps; overrides epochs
    group_by_length: bool = True  # batches of similar length, so dynamic padding wastes little
    eval_every: Optional[int] = None  # optimizer steps between evaluations; None = once per epoch
    # Chooses the best checkpoint and drives early stopping. Multi-label: accuracy is subset accuracy (every label
    # right), and the F1s use the per-label thresholds tuned at that evaluation; macro_f1 or micro_f1 suit it best.
    metric: Literal["accuracy", "macro_f1", "micro_f1", "loss"] = "accuracy"
    patience: Optional[int] = None  # evaluations without improvement before stopping; None = never stop early
    class_weights: Literal["none", "balanced"] = "none"  # 'balanced' weights the loss by inverse class frequency
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # auto: bf16 on GPUs that have it, fp16 on older GPUs, off on CPU
    seed: int = 42
    log_every: int = 10  # optimizer steps between progress lines


@dataclass
class RunConfig:
    # Run folder under storage. Re-running the same name resumes, if the folder holds the same run (same settings
    # and data: trainer.start_run); else the run is refused. None: '<stage>-<8 hex digits of that fingerprint>'
    # (e.g. finetune-3f9a0c1e), so the same command resumes and other settings or data get another folder.
    name: Optional[str] = None
    storage: str = "./runs"  # local path or s3://bucket/prefix; must be shared storage on a multi-node cluster
    num_workers: int = 1  # data-parallel training workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3  # worker-group restarts from the last checkpoint before giving up
    keep_checkpoints: int = 2  # best ones kept (by train.metric); the latest is always kept too
    ray_address: Optional[str] = None  # None: RAY_ADDRESS or a new local cluster
    overwrite: bool = False  # delete what the run folder holds and start afresh, instead of resuming or refusing
    # 'mlflow': the run is an MLflow run (config as params, every progress and evaluation metric at its step,
    # artifacts and the exported model) on the server MLFLOW_TRACKING_URI names (unset: MLflow's local default).
    tracking: Literal["none", "mlflow"] = "none"
    experiment: str = "bertray"  # MLflow experiment the run goes into (created if missing)
    register_as: Optional[str] = None  # register the exported model under this name: a new version per run


@dataclass
class MLMConfig:
    probability: float = 0.15  # fraction of tokens selected for prediction (then 80% [MASK], 10% random, 10% kept)
    whole_word: bool = False  # mask every piece of a selected word together
    packing: bool = True  # concatenate short texts into full max_length sequences
    eval_rows: int = 512  # fixed held-out sample for masked-LM loss / perplexity
    # Micro-batches padded and masked ahead by Ray Data's iterator threads, overlapping the training step (the
    # tokenizing and packing run in Ray Data tasks of their own). None: 4 on a GPU, 1 on CPU; 0 counts as 1.
    prefetch: Optional[int] = None


# --------------------------------------------------------------------------------------------------- stages


def _positive(errors: list[str], name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value != value:  # NaN, which every comparison below lets through
        errors.append(f"{name}: must be a number, got {value}")
    elif value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _quantize_on_cpu(errors: list[str], quantize: str, gpus_key: str, gpus: float) -> None:
    # Dynamic int8 runs on fbgemm/onednn CPU kernels; PyTorch has no CUDA path for it. bf16 weights are not needed
    # on a GPU: inference there already runs under autocast (bf16, or fp16 where bf16 is missing).
    if quantize != "none" and gpus:
        errors.append(f"quantize: {quantize} is a CPU option; drop it or set {gpus_key}=0")


def _backend_on_cpu(errors: list[str], backend: str, quantize: str, gpus_key: str, gpus: float) -> None:
    # bertray runs ONNX Runtime's CPU provider only; bf16 weights are a PyTorch path with no ONNX counterpart here.
    if backend == "onnxruntime" and gpus:
        errors.append(f"backend: onnxruntime runs on CPU; set {gpus_key}=0 or backend=torch")
    if backend == "onnxruntime" and quantize == "bf16":
        errors.append("quantize: bf16 is a torch option; with backend onnxruntime use int8 or none")


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self) -> list[str]:
        return _check_common(self) + _check_labeled(self)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=1000, eval_every=100, metric="loss"))
    mlm: MLMConfig = field(default_factory=MLMConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def check(self) -> list[str]:
        errors = _check_common(self)
        if self.train.max_steps is None:
            errors.append("train.max_steps: pretraining is scheduled in steps; set train.max_steps")
        if self.train.metric != "loss":
            errors.append(f"train.metric: masked-LM reports only 'loss' (perplexity), got {self.train.metric!r}")
        if self.model.adapter.kind != "none":
            errors.append("model.adapter: adapters are for fine-tuning; pretraining trains the whole encoder "
                          "(fine-tune from its model/ with an adapter instead)")
        if not 0 < self.mlm.probability < 1:
            errors.append(f"mlm.probability: must be between 0 and 1, got {self.mlm.probability}")
        _positive(errors, "mlm.eval_rows", self.mlm.eval_rows)
        _positive(errors, "mlm.prefetch", self.mlm.prefetch, allow_zero=True)
        return errors


def _check_common(cfg: FinetuneConfig | PretrainConfig) -> list[str]:
    e: list[str] = []
    m, d, o, t, r = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.run
    if not d.train:
        e.append("data.train: required (a file, folder or glob of .parquet/.csv/.jsonl, local or s3://)")
    if not d.text_columns:
        e.append("data.text_columns: needs at least one column")
    if not 8 <= m.max_length <= 8192:
        e.append(f"model.max_length: must be between 8 and 8192, got {m.max_length}")
    if m.truncation == "head+tail" and m.max_length < 16:
        e.append("model.truncation: 'head+tail' needs model.max_length >= 16")
    if m.long_text == "chunk" and not 0 <= m.chunk_overlap <= m.max_length // 2:
        e.append(f"model.chunk_overlap: must be between 0 and half of model.max_length ({m.max_length // 2}), "
                 f"got {m.chunk_overlap}")
    _positive(e, "model.freeze_layers", m.freeze_layers, allow_zero=True)
    if m.freeze_encoder and m.freeze_layers:
        e.append("model.freeze_layers: contradicts model.freeze_encoder=true (the whole encoder is already frozen)")
    if m.dropout is not None and not 0 <= m.dropout < 1:
        e.append(f"model.dropout: must be in [0, 1), got {m.dropout}")
    _check_adapter(e, m)
    if not 0 < d.validation_fraction < 1:
        e.append(f"data.validation_fraction: must be between 0 and 1, got {d.validation_fraction}")
    _positive(e, "data.max_train_rows", d.max_train_rows)
    _positive(e, "data.max_validation_rows", d.max_validation_rows)
    _positive(e, "optim.lr", o.lr)
    _positive(e, "optim.weight_decay", o.weight_decay, allow_zero=True)
    if not 0 <= o.warmup_ratio < 1:
        e.append(f"optim.warmup_ratio: must be in [0, 1), got {o.warmup_ratio}")
    _positive(e, "optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive(e, "optim.max_grad_norm", o.max_grad_norm, allow_zero=True)
    _positive(e, "optim.grad_accum_steps", o.grad_accum_steps)
    _positive(e, "train.batch_size", t.batch_size)
    _positive(e, "train.epochs", t.epochs)
    _positive(e, "train.max_steps", t.max_steps)
    _positive(e, "train.eval_every", t.eval_every)
    _positive(e, "train.patience", t.patience)
    _positive(e, "train.log_every", t.log_every)
    if t.mixed_precision in ("bf16", "fp16") and not r.use_gpu:
        e.append(f"train.mixed_precision: {t.mixed_precision!r} needs run.use_gpu=true (use 'auto' or 'no' on CPU)")
    if r.name is not None and (not r.name or "/" in r.name or r.name in (".", "..")):
        e.append(f"run.name: must be a folder name (not empty, '.' or '..', no '/'), got {r.name!r}")
    if not r.storage:
        e.append("run.storage: required (local path or s3://bucket/prefix)")
    _positive(e, "run.num_workers", r.num_workers)
    _positive(e, "run.cpus_per_worker", r.cpus_per_worker)
    _positive(e, "run.max_failures", r.max_failures, allow_zero=True)
    _positive(e, "run.keep_checkpoints", r.keep_checkpoints)
    if r.tracking == "mlflow" and not r.experiment.strip():
        e.append("run.experiment: needs a name with run.tracking=mlflow")
    if r.register_as is not None:
        if r.tracking != "mlflow":
            e.append("run.register_as: registering needs run.tracking=mlflow")
        # models:/NAME/VERSION and models:/NAME@ALIAS are how a registered model is named back.
        if not r.register_as.strip() or any(ch in r.register_as for ch in "/@'"):
            e.append(f"run.register_as: must be a model name without '/', '@' or quotes, got {r.register_as!r}")
    return e


def _check_adapter(e: list[str], m: ModelConfig) -> None:
    a = m.adapter
    if a.kind == "none":
        return
    _positive(e, "model.adapter.r", a.r)
    _positive(e, "model.adapter.alpha", a.alpha)
    if not 0 <= a.dropout < 1:
        e.append(f"model.adapter.dropout: must be in [0, 1), got {a.dropout}")
    if not a.target or any(not t.strip() for t in a.target):
        e.append(f"model.adapter.target: needs module names such as [query, value], got {a.target!r}")
    # An adapter already freezes every weight of the base: freezing more of it would change nothing, and reads
    # as if part of the base were meant to train.
    if m.freeze_encoder:
        e.append(f"model.freeze_encoder: contradicts model.adapter.kind={a.kind} (the base is frozen and the "
                 "adapter trains); drop one")
    if m.freeze_layers:
        e.append(f"model.freeze_layers: contradicts model.adapter.kind={a.kind} (the whole base is frozen "
                 "already); drop it")


def _check_labeled(cfg: FinetuneConfig) -> list[str]:
    e: list[str] = []
    if cfg.data.label_column in cfg.data.text_columns:
        e.append(f"data.label_column: {cfg.data.label_column!r} is also listed in data.text_columns")
    d = cfg.data
    if d.labels is not None and len(set(d.labels)) < 2 and d.task != "multi_label":
        e.append("data.labels: needs at least two distinct class names")
    if d.label_delimiter is not None and (not d.label_delimiter or d.task == "single_label"):
        e.append("data.label_delimiter: needs a non-empty delimiter and data.task multi_label or auto"
                 if not d.label_delimiter else "data.label_delimiter: splits labels for data.task=multi_label, "
                 "but data.task is single_label")
    if cfg.model.train_windows == "all" and cfg.model.long_text != "chunk":
        e.append("model.train_windows: 'all' needs model.long_text: chunk (the windows it trains on are the ones "
                 "the checkpoint pools when scoring)")
    if cfg.model.train_windows == "all" and d.text_pair_column is not None:
        e.append("model.train_windows: 'all' does not apply to sentence pairs (a pair is cut longest side first, "
                 "never windowed)")
    if d.text_pair_column is not None and d.text_pair_column in (*d.text_columns, d.label_column):
        e.append(f"data.text_pair_column: {d.text_pair_column!r} is also a text or label column")
    return e


# --------------------------------------------------------------------------------------------------- loading


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None):
    """Build `cls` from a YAML file (or dict) plus `key.sub=value` overrides; raise ConfigError with every problem."""
    source = str(path) if path else "config"
    errors: list[str] = []
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError([f"top level must be a mapping of sections, got {type(raw).__name__}"], source)
    if data:
        raw = _deep_merge(raw, data)
    for item in overrides or []:
        _apply_override(cls, raw, item, errors)
    cfg = _build(cls, raw, "", errors)
    # Fields with a bad type fell back to their defaults above, so the cross-field checks are safe to run too.
    errors.extend(e for e in cfg.check() if e not in errors)
    if errors:
        raise ConfigError(errors, source)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML config file's content; a ConfigError naming the file if it is a folder, not text, or not YAML."""
    source = str(path)
    if Path(path).is_dir():
        raise ConfigError(["is a folder; give the path of a YAML config file"], source)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read config file: {exc.strerror}"], source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not a text file (byte {exc.start} is not UTF-8); give a YAML config file"],
                          source) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError([f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}"], source) from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict):
    """Rebuild a config saved with `to_dict` (e.g. from a checkpoint); raises ConfigError on mismatch."""
    return load(cls, data=data)


def _deep_merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, in new dicts along every path `extra` sets, so that overrides applied to the result
    leave the callers' dicts untouched."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k] if isinstance(out.get(k), dict) else {}, v) if isinstance(v, dict) else v
    return out


def _apply_override(cls: type, raw: dict, item: str, errors: list[str]) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        errors.append(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-5")
        return
    parts = key.split(".")
    ftype = _field_type(cls, parts)
    if ftype is None:
        errors.append(f"--set {key}: unknown key (known: {', '.join(_known_keys(cls))})")
        return
    # A str field takes the text as written; anything else is parsed as YAML ("3e-5" -> 3e-05, "[a, b]" -> list).
    if _accepts_str(ftype) and not text.strip().startswith("["):
        value: Any = None if text.strip().lower() in ("null", "none", "~") and _is_optional(ftype) else text
    else:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            errors.append(f"--set {key}: cannot parse value {text!r}")
            return
        # YAML reads '3e-5' as a string; floats are what the user meant.
        if isinstance(value, str) and _unwrap(ftype) is float:
            try:
                value = float(value)
            except ValueError:
                pass
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            errors.append(f"--set {key}: {p} is not a section")
            return
    node[parts[-1]] = value


def _field_type(cls: type, parts: list[str]):
    hints = typing.get_type_hints(cls)
    if parts[0] not in hints:
        return None
    t = hints[parts[0]]
    if len(parts) == 1:
        return t
    return _field_type(t, parts[1:]) if dataclasses.is_dataclass(t) else None


def _known_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for name, t in typing.get_type_hints(cls).items():
        out.extend(_known_keys(t, f"{prefix}{name}.") if dataclasses.is_dataclass(t) else [f"{prefix}{name}"])
    return out


def _is_optional(t) -> bool:
    return typing.get_origin(t) in (Union, types.UnionType) and type(None) in typing.get_args(t)


def _unwrap(t):
    """Optional[X] -> X."""
    if _is_optional(t):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _accepts_str(t) -> bool:
    t = _unwrap(t)
    return t is str or typing.get_origin(t) is Literal


def _build(cls: type, raw: Any, prefix: str, errors: list[str]):
    if not isinstance(raw, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in hints:
            close = [k for k in hints if k.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{prefix}{key}: unknown key{hint}; known keys here: {', '.join(hints)}")
    kwargs = {}
    for name, t in hints.items():
        if name not in raw:
            continue
        if dataclasses.is_dataclass(t):
            # Start from this stage's own default for the section (e.g. pretrain's max_steps), then apply.
            default = _default_of(cls, name)
            merged = _deep_merge(dataclasses.asdict(default), raw[name] or {}) if isinstance(raw[name], (dict, type(None))) else raw[name]
            kwargs[name] = _build(t, merged, f"{prefix}{name}.", errors)
        else:
            ok, value = _coerce(raw[name], t)
            if ok and isinstance(value, float) and not math.isfinite(value):
                # YAML reads .inf and .nan as floats; no setting means either, and they fail far from here.
                errors.append(f"{prefix}{name}: must be a finite number, got {value}")
            elif ok:
                kwargs[name] = value
            else:
                errors.append(f"{prefix}{name}: expected {_type_name(t)}, got {raw[name]!r}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # only reachable through a bug in this module
        errors.append(f"{prefix or 'config'}: {exc}")
        return cls()


def _default_of(cls: type, name: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _coerce(value: Any, t) -> tuple[bool, Any]:
    if _is_optional(t):
        if value is None:
            return True, None
        t = _unwrap(t)
    origin = typing.get_origin(t)
    if origin is Literal:
        return (value in typing.get_args(t)), value
    if origin is list:
        (inner,) = typing.get_args(t) or (Any,)
        if isinstance(value, str) and inner is str:
            value = [value]  # a lone column name is a one-element list
        if not isinstance(value, list):
            return False, value
        items = [_coerce(v, inner) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict or t is dict:
        return isinstance(value, dict), value
    if t is Any:
        return True, value
    if t is bool:
        return isinstance(value, bool), value
    if t is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if t is str:
        return isinstance(value, str), value
    return isinstance(value, t), value


def _type_name(t) -> str:
    if _is_optional(t):
        return f"{_type_name(_unwrap(t))} or null"
    if typing.get_origin(t) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(t))
    if typing.get_origin(t) is list:
        return f"a list of {_type_name(typing.get_args(t)[0])}"
    return getattr(t, "__name__", str(t))


# --------------------------------------------------------------------------------------------------- labeling


@dataclass
class LabelConfig:
    model: str = ""  # bertray checkpoint (local or s3://) or any HF sequence-classification folder
    input: str = ""  # Parquet file, folder or glob; local or s3://
    output: str = ""  # output folder; local or s3://
    text_column: str = "text"
    text_pair_column: Optional[str] = None  # sentence pairs: the second text (a pair model needs it)
    # Texts longer than max_length: truncate, or chunk into overlapping windows whose logits are pooled per row
    # (model.long_text); None: as the checkpoint says.
    long_text: Optional[Literal["truncate", "chunk"]] = None
    id_column: Optional[str] = "id"  # passed through as it is (not checked unique); None: none (file and row are kept instead)
    passthrough: list[str] = field(default_factory=list)  # more input columns copied to the output
    # Add one prob_<label> column per class. Multi-label models write `labels` (every label at or over its
    # threshold) and `scores` (their probabilities) instead of label/label_id/score.
    probabilities: bool = False
    rows_per_file: int = 100_000  # upper bound on rows per output file (also the resume unit); a corpus under
    # ~64 x this is cut into ~64 smaller units (>= 256 rows) so every actor gets work
    token_budget: Optional[int] = None  # padded tokens per inference micro-batch; None: Predictor's default for the device
    max_length: Optional[int] = None  # None: the checkpoint's own
    actors: Optional[int] = None  # inference actors; None: as many as the cluster's CPUs (or GPUs) allow
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # > 0 runs inference on GPUs (fractions share a GPU)
    # Ray CPUs each read+tokenize and build+write task reserves; the tasks fill the CPUs the actors leave free
    # (two per CPU at 0.5, so one reads while the other tokenizes). Where actors take every CPU (CPU actors by
    # default) the tasks run beside them unreserved, one per actor per stage.
    cpus_per_task: float = 0.5
    # CPU only. int8: dynamic, encoder linears only, weights per channel. bf16: the whole model in bf16, for CPUs
    # with AVX512-BF16 or AMX (emulated, and slower than fp32, elsewhere). Speed and labels changed against fp32:
    # BENCHMARKS.md, "bf16 on a CPU with AVX512-BF16" (bench/precision.py).
    quantize: Literal["none", "int8", "bf16"] = "none"
    # torch, or onnxruntime (CPU): an ONNX export (bertray export), or this model exported on the fly into the
    # model cache; int8 then means ONNX Runtime's int8 graph. The same passes either way.
    backend: Literal["torch", "onnxruntime"] = "torch"
    on_empty: Literal["null", "skip"] = "null"  # null/empty text: keep the row with a null label, or drop it (counted)
    on_bad_file: Literal["error", "skip"] = "error"  # unreadable input file: stop, or skip it (reported)
    confidence_threshold: float = 0.6  # rows whose top probability is below this are counted in the summary
    drift_threshold: float = 0.1  # warn when the predicted label distribution is this far (total variation) from training
    overwrite: bool = False  # start over even if the output folder holds a finished or partial run
    ray_address: Optional[str] = None

    def check(self) -> list[str]:
        e: list[str] = []
        for name in ("model", "input", "output"):
            if not getattr(self, name):
                e.append(f"{name}: required")
        if self.input and self.output and self.input.rstrip("/") == self.output.rstrip("/"):
            e.append("output: must differ from input")
        _positive(e, "rows_per_file", self.rows_per_file)
        _positive(e, "token_budget", self.token_budget)
        _positive(e, "actors", self.actors)
        _positive(e, "cpus_per_actor", self.cpus_per_actor)
        _positive(e, "gpus_per_actor", self.gpus_per_actor, allow_zero=True)
        _positive(e, "cpus_per_task", self.cpus_per_task)
        _quantize_on_cpu(e, self.quantize, "gpus_per_actor", self.gpus_per_actor)
        _backend_on_cpu(e, self.backend, self.quantize, "gpus_per_actor", self.gpus_per_actor)
        if not 0 <= self.confidence_threshold <= 1:
            e.append(f"confidence_threshold: must be in [0, 1], got {self.confidence_threshold}")
        if self.id_column and self.id_column in self.passthrough:
            e.append(f"passthrough: {self.id_column!r} is the id column, already passed through")
        return e


# --------------------------------------------------------------------------------------------------- serving


# A serve batch is at most a few dozen texts of mixed lengths, unsorted until they arrive; in one pass they all pad
# to the longest. Smaller passes pad less, and on CPU ran faster per text than the labeler's budget (whose chunks
# are sorted across thousands of texts, so pad little); packed passes (fp32 and int8 BERT) gain again at this budget
# (BENCHMARKS.md, "Serving"; bench/packing.py).
SERVE_CPU_TOKEN_BUDGET = 512


@dataclass
class ServeConfig:
    model: str = ""  # bertray checkpoint (local or s3://) or any HF sequence-classification folder
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1  # fixed replica count (ignored with autoscaling)
    autoscaling: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    # Most texts one forward pass takes, from however many callers; a request of more runs alone. Passes follow each
    # other with no wait: texts that arrive during one make up the next (bertray.batching).
    max_batch_size: int = 32
    max_texts: int = 64  # per request
    max_text_chars: int = 10_000  # per text
    max_ongoing_requests: int = 64  # per replica, before requests queue
    max_queued_requests: int = 128  # past this the caller gets a fast 503
    api_key_env: Optional[str] = None  # name of an env var holding a bearer token; None: no auth
    # Padded tokens per inference micro-batch; None: SERVE_CPU_TOKEN_BUDGET on CPU, Predictor's default on GPU.
    token_budget: Optional[int] = None
    # As LabelConfig.quantize. On CPU, int8 also gains more from batching than fp32 (BENCHMARKS.md, "Serving").
    quantize: Literal["none", "int8", "bf16"] = "none"
    backend: Literal["torch", "onnxruntime"] = "torch"  # as LabelConfig.backend
    long_text: Optional[Literal["truncate", "chunk"]] = None  # as LabelConfig.long_text
    # Who takes HTTP requests on host:port. haproxy: Ray Serve's HAProxy ingress (Ray's "high throughput" mode)
    # forwards each request straight to an HTTP server inside a replica. proxy: Ray's Python proxy actor, which
    # hands each request to a replica by actor call and is called back for its body, which costs CPU that batching
    # saves (BENCHMARKS.md, "Serving"). It applies where bertray starts Serve (`bertray serve`, serve.deploy); a
    # Serve already running, or one started by `serve deploy` / a RayService, keeps the ingress its cluster was
    # started with (RAY_SERVE_ENABLE_HA_PROXY in the nodes' environment; cluster/rayservice.yaml sets it).
    ingress: Literal["haproxy", "proxy"] = "haproxy"
    ray_address: Optional[str] = None

    def check(self) -> list[str]:
        e: list[str] = []
        if not self.model:
            e.append("model: required")
        if not 0 < self.port < 65536:
            e.append(f"port: must be 1-65535, got {self.port}")
        for name in ("replicas", "min_replicas", "max_replicas", "max_batch_size", "max_texts", "max_text_chars",
                     "max_ongoing_requests", "max_queued_requests", "token_budget", "cpus_per_replica"):
            _positive(e, name, getattr(self, name))
        _quantize_on_cpu(e, self.quantize, "gpus_per_replica", self.gpus_per_replica)
        _backend_on_cpu(e, self.backend, self.quantize, "gpus_per_replica", self.gpus_per_replica)
        if self.autoscaling and self.min_replicas > self.max_replicas:
            e.append(f"min_replicas: {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        return e


# --------------------------------------------------------------------------------------------------- sweeps

# A search-space entry is exactly one of these, e.g. `optim.lr: {loguniform: [1.0e-5, 1.0e-3]}`.
# Ranges: loguniform/uniform draw floats in [lo, hi]; randint draws integers lo..hi, both ends included.
# Lists: choice draws one value per trial; grid runs every value (every combination across grid keys).
SPACE_KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
_RANGE_KINDS = ("loguniform", "uniform", "randint")
# What a trial may vary: data is read once for the whole sweep, run.* and search.* describe the sweep itself, and
# train.metric is what trials are ranked by.
_SWEEPABLE_SECTIONS = ("model", "optim", "train")
_NOT_SWEEPABLE = {"train.metric": "it ranks the trials, so it is one value for the whole sweep"}
_LEAF_ALIASES = {"learning_rate": "lr", "wd": "weight_decay", "bs": "batch_size", "batch": "batch_size",
                 "num_epochs": "epochs", "steps": "max_steps", "seq_len": "max_length"}


@dataclass
class SearchConfig:
    space: dict = field(default_factory=dict)  # dotted config key -> {loguniform|uniform|randint: [lo, hi]} or {choice|grid: [v, ...]}
    algorithm: Literal["grid", "random", "optuna"] = "random"  # grid: every combination once; random: num_samples draws per grid combination; optuna: TPE
    num_samples: int = 10  # trials drawn by random / optuna (grid ignores it)
    scheduler: Literal["none", "asha", "pbt"] = "none"  # asha: stop weak trials early; pbt: weak trials copy strong ones' weights and perturb pbt_keys
    # What ASHA's rungs and PBT's exploit step compare; None: train.metric, which also ranks the trials. 'loss' is
    # finer-grained than accuracy on a small validation set, where trials stuck at the majority class all tie.
    scheduler_metric: Optional[Literal["accuracy", "macro_f1", "loss"]] = None
    # ASHA: epochs of training every trial gets before it may be stopped; its rungs sit at grace_period x
    # reduction_factor^k epochs, and a trial is judged at its first evaluation past a rung.
    grace_period: float = 0.5
    reduction_factor: float = 3.0  # ASHA: about 1/reduction_factor of the trials reaching a rung go on past it
    perturbation_interval: int = 2  # PBT: evaluations between exploit/explore decisions
    pbt_keys: list[str] = field(default_factory=lambda: ["optim.lr", "optim.weight_decay"])  # float keys of `space` that PBT perturbs
    pbt_synch: bool = True  # PBT: trials wait for each other at each perturbation, so they are compared at equal steps
    gpus_per_trial: float = 0.0  # per worker; fractions (e.g. 0.25) pack several small-model trials on one GPU
    cpus_per_trial: float = 1.0  # per worker
    workers_per_trial: int = 1  # 1: a trial trains in its own process; >1: each trial is a data-parallel Ray Train run
    max_concurrent_trials: Optional[int] = None  # None: as many as the cluster's CPUs/GPUs hold at the per-trial resources
    resume_failed: bool = False  # on resume, also retry failed trials from their last checkpoint (default: they stay failed)
    # After a finished sweep, drop the trials' optimizer state (2/3 of their checkpoints' bytes with AdamW) and keep
    # their weights; failed trials keep theirs for resume_failed. true: keep it all, e.g. to continue a trial.
    keep_train_state: bool = False


@dataclass
class TuneConfig(FinetuneConfig):
    """A fine-tuning config (every trial's base) plus the search: the same sections, so the same defaults."""
    search: SearchConfig = field(default_factory=SearchConfig)

    def trial_base(self) -> FinetuneConfig:
        """The fine-tuning config every trial starts from, before its sampled values are applied; it is what the
        best model's checkpoint records, so `bertray finetune` can reproduce the winner."""
        import copy

        s = self.search
        run = dataclasses.replace(self.run, num_workers=s.workers_per_trial, use_gpu=s.gpus_per_trial > 0,
                                  cpus_per_worker=s.cpus_per_trial)
        sections = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(FinetuneConfig)}
        return FinetuneConfig(**{**sections, "run": run})

    def check(self) -> list[str]:
        s = self.search
        base = self.trial_base()
        e = base.check()
        for name in ("num_workers", "use_gpu", "cpus_per_worker"):
            if getattr(self.run, name) != getattr(RunConfig(), name):
                e.append(f"run.{name}: a sweep sizes its trials with search.workers_per_trial, search.cpus_per_trial "
                         "and search.gpus_per_trial")
        space, space_errors = parse_space(s.space)
        e += space_errors
        e += _check_trial_values(base, space, set(e))
        if self.model.adapter.kind == "none" and "model.adapter.kind" not in space:
            e += [f"search.space.{k}: has no effect without an adapter; set model.adapter.kind: lora"
                  for k in space if k.startswith("model.adapter.")]
        _positive(e, "search.num_samples", s.num_samples)
        _positive(e, "search.grace_period", s.grace_period)
        if (s.scheduler == "asha" and self.train.max_steps is None and s.grace_period and self.train.epochs
                and s.grace_period >= self.train.epochs):
            e.append(f"search.grace_period: ASHA's first rung ({s.grace_period:g} epochs) is at or past the end of "
                     f"training (train.epochs {self.train.epochs:g}), so it could never stop a trial; lower it")
        if s.reduction_factor <= 1:
            e.append(f"search.reduction_factor: must be > 1, got {s.reduction_factor}")
        _positive(e, "search.perturbation_interval", s.perturbation_interval)
        _positive(e, "search.gpus_per_trial", s.gpus_per_trial, allow_zero=True)
        _positive(e, "search.cpus_per_trial", s.cpus_per_trial)
        _positive(e, "search.workers_per_trial", s.workers_per_trial)
        _positive(e, "search.max_concurrent_trials", s.max_concurrent_trials)
        if s.workers_per_trial > 1 and s.gpus_per_trial not in (0, 1):
            e.append(f"search.gpus_per_trial: data-parallel trials (workers_per_trial > 1) take whole GPUs, got "
                     f"{s.gpus_per_trial}")
        kinds = {k: kind for k, (kind, _) in space.items()}
        ranges = sorted(k for k, kind in kinds.items() if kind in _RANGE_KINDS)
        if s.algorithm == "grid" and ranges:
            e.append(f"search.algorithm: 'grid' cannot enumerate the ranges of {', '.join(ranges)}; give them "
                     "grid: [...] lists, or use algorithm random or optuna")
        if s.algorithm == "random" and kinds and all(k == "grid" for k in kinds.values()):
            e.append("search.algorithm: 'random' with only grid keys would run every combination num_samples times; "
                     "use algorithm: grid")
        if s.algorithm == "optuna" and "grid" in kinds.values():
            e.append(f"search.algorithm: optuna samples, it cannot run the grid of "
                     f"{', '.join(k for k, v in kinds.items() if v == 'grid')}; use choice: [...] instead")
        if s.scheduler == "pbt":
            e += _check_pbt(self, space)
        if s.scheduler_metric is not None and s.scheduler == "none":
            e.append("search.scheduler_metric: only a scheduler uses it; set search.scheduler to asha or pbt, or drop it")
        return e


def parse_space(space: dict) -> tuple[dict[str, tuple[str, list]], list[str]]:
    """A search space with numbers parsed and checked: ({key: (kind, values)}, every problem found).

    YAML reads `1e-3` (no dot) as a string, so numeric strings are parsed here for numeric fields."""
    import difflib

    out: dict[str, tuple[str, list]] = {}
    errors: list[str] = []
    if not isinstance(space, dict) or not space:
        return out, ["search.space: needs at least one key, e.g. optim.lr: {loguniform: [1.0e-5, 1.0e-3]}"]
    known = [k for k in _known_keys(FinetuneConfig) if k.split(".")[0] in _SWEEPABLE_SECTIONS and k not in _NOT_SWEEPABLE]
    for key, spec in space.items():
        where = f"search.space.{key}"
        parts = str(key).split(".")
        ftype = _field_type(FinetuneConfig, parts)
        if ftype is None or dataclasses.is_dataclass(ftype):
            # Same field in another section, common other names (learning_rate), then near spellings.
            leaf = _LEAF_ALIASES.get(parts[-1], parts[-1])
            close = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
            close += [k for k in difflib.get_close_matches(str(key), known, n=3, cutoff=0.6) if k not in close]
            close = close[:3]
            errors.append(f"{where}: unknown config field" + (f"; did you mean {' or '.join(close)}?" if close else
                          f"; sweepable fields: {', '.join(known)}"))
            continue
        if parts[0] not in _SWEEPABLE_SECTIONS or key in _NOT_SWEEPABLE:
            why = _NOT_SWEEPABLE.get(key, f"{parts[0]}.* settings hold for the whole sweep (data is read once)")
            errors.append(f"{where}: cannot vary per trial: {why}")
            continue
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            errors.append(f"{where}: expected one of {', '.join('{' + k + ': [...]}' for k in SPACE_KINDS)}, got {spec!r}")
            continue
        ((kind, args),) = spec.items()
        if not isinstance(args, list) or not args:
            errors.append(f"{where}: {kind} needs a non-empty list, got {args!r}")
            continue
        inner = _unwrap(ftype)
        if kind in _RANGE_KINDS:
            want = int if kind == "randint" else float
            if inner is not want:
                errors.append(f"{where}: {kind} draws {want.__name__}s but {key} is {_type_name(ftype)}; "
                              + ("use randint or choice" if inner is int else "use choice or grid"))
                continue
            nums = [_number(a, want) for a in args]
            if len(args) != 2 or None in nums:
                errors.append(f"{where}: {kind} needs [lo, hi] as two {want.__name__}s, got {args!r}")
                continue
            lo, hi = nums
            if not lo < hi:
                errors.append(f"{where}: {kind} needs lo < hi, got [{lo}, {hi}]")
                continue
            if kind == "loguniform" and lo <= 0:
                errors.append(f"{where}: loguniform needs lo > 0, got {lo}")
                continue
            out[key] = (kind, [lo, hi])
        else:
            values, bad = [], []
            for v in args:
                v = _number(v, float) if inner is float and isinstance(v, str) and _number(v, float) is not None else v
                ok, v = _coerce(v, ftype)
                (values if ok else bad).append(v)
            if bad:
                errors.append(f"{where}: {key} is {_type_name(ftype)}, but {kind} lists {', '.join(map(repr, bad))}")
                continue
            out[key] = (kind, values)
    return out, errors


def _number(value: Any, want: type):
    """`value` as a `want` (int or float), or None; YAML's '1e-3' strings count as floats."""
    if isinstance(value, bool):
        return None
    if want is int:
        return value if isinstance(value, int) else None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _check_trial_values(base: FinetuneConfig, space: dict, known_errors: set) -> list[str]:
    """Run the fine-tuning checks on the values trials can take (each listed value, each range's ends), two keys
    at a time, so a value no trial could use (a negative lr, a batch size of 0) or two no trial could use together
    (model.train_windows 'all' with model.long_text 'truncate') stops the sweep before any trial starts. A problem
    a value has with every value of the other keys is that value's own; else it belongs to the pair."""
    import copy
    import itertools

    def problems(values: dict) -> frozenset[str]:
        cfg = copy.deepcopy(base)
        for key, v in values.items():
            *path, last = key.split(".")
            node = cfg
            for p in path:
                node = getattr(node, p)
            setattr(node, last, v)
        return frozenset(x for x in cfg.check() if x not in known_errors)

    keys = list(space)
    pairs = {}
    for a, b in itertools.combinations(keys, 2):
        for x, y in itertools.product(space[a][1], space[b][1]):
            pairs[(a, x, b, y)] = problems({a: x, b: y})
    own = {}
    for key in keys:
        for v in space[key][1]:
            seen = [p for (a, x, b, y), p in pairs.items() if (a, x) == (key, v) or (b, y) == (key, v)]
            own[(key, v)] = frozenset.intersection(*seen) if seen else problems({key: v})
    errors = [f"search.space.{key}: value {v!r} is not allowed: {'; '.join(sorted(p))}"
              for (key, v), p in own.items() if p]
    for (a, x, b, y), p in pairs.items():
        if rest := p - own[(a, x)] - own[(b, y)]:
            errors.append(f"search.space: {a} {x!r} with {b} {y!r} is not allowed: {'; '.join(sorted(rest))}")
    return errors


def planned_trials(s: SearchConfig, space: dict) -> int:
    """How many trials a sweep runs: every grid combination (choice lists too under algorithm grid), times
    num_samples draws for random; num_samples for optuna."""
    import math

    if s.algorithm == "optuna":
        return s.num_samples
    sizes = [len(v) for kind, v in space.values() if kind == "grid" or (kind == "choice" and s.algorithm == "grid")]
    return math.prod(sizes) * (1 if s.algorithm == "grid" else s.num_samples)


def _check_pbt(cfg: TuneConfig, space: dict) -> list[str]:
    s = cfg.search
    e = []
    if s.algorithm == "optuna":
        e.append("search.scheduler: pbt chooses its own configurations and cannot follow optuna; use algorithm random or grid")
    if s.workers_per_trial > 1:
        e.append("search.scheduler: pbt moves checkpoints between trials, which data-parallel trials (workers_per_trial > 1) "
                 "keep in Ray Train; use asha or workers_per_trial: 1")
    if not s.pbt_keys:
        e.append("search.pbt_keys: pbt needs at least one key to perturb, e.g. [optim.lr]")
    for key in s.pbt_keys:
        if key not in space and key in (s.space or {}):
            continue  # its distribution is invalid, and reported as such
        if key not in space:
            e.append(f"search.pbt_keys: {key} has no distribution in search.space (PBT resamples from it); add one or "
                     "drop it from pbt_keys")
        elif _unwrap(_field_type(FinetuneConfig, key.split("."))) is not float:
            e.append(f"search.pbt_keys: {key} is not a float setting; PBT can only scale floats such as optim.lr")
    population = planned_trials(s, space)
    if population < 2:
        e.append(f"search.num_samples: pbt needs a population of at least 2 trials, this space gives {population}")
    return e

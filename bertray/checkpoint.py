"""Self-describing checkpoints.

A bertray checkpoint is a plain Hugging Face model folder (config.json with id2label, model.safetensors,
tokenizer files) that `transformers` loads with no bertray import, plus `bertray.json`: what it is, the base
model, label names, the resolved config, metrics, the training label distribution and the data report.
Training checkpoints add `train_state.pt` (optimizer, scheduler, step, RNG); exported ones leave it out.

A model trained with an adapter (model.adapter) is checkpointed as PEFT saves it, the adapter and the fully
trained head only (adapter_model.safetensors, adapter_config.json), beside config.json and the tokenizer;
bertray.json's `adapter` names its kind and base model. Exporting merges it into the base: a plain HF folder again.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

from bertray import storage

META_FILE = "bertray.json"
TRAIN_STATE = "train_state.pt"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What PEFT writes: the weights, its config, and a model card (README.md).
ADAPTER_FILES = (ADAPTER_WEIGHTS, "adapter_config.json", "README.md")
FORMAT = "bertray-checkpoint/1"


def save(directory: str | Path, model, tokenizer, meta: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    model.save_pretrained(directory, safe_serialization=True)  # a PEFT model saves its adapter and head only
    if hasattr(model, "peft_config"):
        inner = model.get_base_model()
        inner.config.architectures = [type(inner).__name__]
        inner.config.save_pretrained(directory)  # labels and head settings, to rebuild the model on its base
        meta = {**meta, "adapter": adapter_meta(model, meta.get("base_model"))}
    tokenizer.save_pretrained(directory)
    write_meta(directory, meta)
    return directory


def adapter_meta(model, base_model: str | None) -> dict:
    """bertray.json's description of a PEFT model's adapter: enough to tell what to rebuild it on."""
    pc = model.peft_config[model.active_adapter]
    trainable, total = model.get_nb_trainable_parameters()
    return {"kind": str(pc.peft_type.value).lower(), "base_model": base_model, "r": pc.r, "alpha": pc.lora_alpha,
            "dropout": pc.lora_dropout, "target": sorted(pc.target_modules),
            "modules_to_save": sorted(set(pc.modules_to_save or [])), "trainable_params": trainable,
            "total_params": total}


def write_meta(directory: str | Path, meta: dict) -> None:
    full = {"format": FORMAT, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **meta}
    (Path(directory) / META_FILE).write_text(json.dumps(full, indent=2, default=_jsonable))


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def read_meta(uri: str | Path) -> dict | None:
    """bertray.json of a checkpoint (local or remote), or None for a plain HF folder."""
    path = storage.join(str(uri), META_FILE)
    if not storage.exists(path):
        return None
    return json.loads(storage.read_text(path))


def export(src_dir: str | Path, uri: str, extra_meta: dict | None = None, adapter_uri: str | None = None) -> str:
    """Copy a training checkpoint to `uri` without its optimizer state; readers never see a half copy
    because bertray.json, which marks the folder as a checkpoint, is written last. A checkpoint holding an adapter
    goes to `uri` merged into its base, and (given `adapter_uri`) as the adapter alone to `adapter_uri`."""
    src_dir = Path(src_dir)
    meta = json.loads((src_dir / META_FILE).read_text()) if (src_dir / META_FILE).exists() else {}
    meta.update(extra_meta or {})
    staging = src_dir.parent / f".export-{src_dir.name}"
    adapter = meta.get("adapter")
    if adapter and adapter_uri:
        _publish(_stage(src_dir, staging, (TRAIN_STATE, META_FILE)), adapter_uri, meta)
    if adapter:
        from bertray import modeling  # here, not at the top: modeling imports this module

        modeling.merge_adapter(str(src_dir), _stage(src_dir, staging, (TRAIN_STATE, META_FILE, *ADAPTER_FILES)))
        meta = {**meta, "adapter": {**adapter, "merged": True, **({"adapter": adapter_uri} if adapter_uri else {})}}
    else:
        _stage(src_dir, staging, (TRAIN_STATE, META_FILE))
    return _publish(staging, uri, meta)


def _stage(src_dir: Path, staging: Path, leave_out: tuple) -> Path:
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src_dir, staging, ignore=shutil.ignore_patterns(*leave_out))
    return staging


def _publish(staging: Path, uri: str, meta: dict) -> str:
    if storage.exists(uri):
        storage.delete(storage.join(uri, META_FILE))  # stale marker first: a reader sees "not ready", not a mix
    storage.upload_dir(staging, uri)
    storage.write_text(storage.join(uri, META_FILE), json.dumps(meta, indent=2, default=_jsonable))
    shutil.rmtree(staging, ignore_errors=True)
    return uri


def label_names(config: dict) -> list[str]:
    """Label names in id order from a config.json's id2label. transformers leaves its default out of the file: no
    id2label is num_labels (2 unless given) labels named LABEL_0, LABEL_1, ..."""
    default = {i: f"LABEL_{i}" for i in range(config.get("num_labels", 2))}
    id2label = {int(k): v for k, v in (config.get("id2label") or default).items()}
    return [id2label[i] for i in range(len(id2label))]

"""Self-describing checkpoints.

A bertray checkpoint is a plain Hugging Face model folder (config.json with id2label, model.safetensors,
tokenizer files) that `transformers` loads with no bertray import, plus `bertray.json`: what it is, the base
model, label names, the resolved config, metrics, the training label distribution and the data report.
Training checkpoints add `train_state.pt` (optimizer, scheduler, step, RNG); exported ones leave it out.
"""
from __future__ import annotations

import datetime as _dt
import json
import shutil
from pathlib import Path

from bertray import storage

META_FILE = "bertray.json"
TRAIN_STATE = "train_state.pt"
FORMAT = "bertray-checkpoint/1"


def save(directory: str | Path, model, tokenizer, meta: dict) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    write_meta(directory, meta)
    return directory


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


def export(src_dir: str | Path, uri: str, extra_meta: dict | None = None) -> str:
    """Copy a training checkpoint to `uri` without its optimizer state; readers never see a half copy
    because bertray.json, which marks the folder as a checkpoint, is written last."""
    src_dir = Path(src_dir)
    staging = src_dir.parent / f".export-{src_dir.name}"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src_dir, staging, ignore=shutil.ignore_patterns(TRAIN_STATE, META_FILE))
    meta = json.loads((src_dir / META_FILE).read_text()) if (src_dir / META_FILE).exists() else {}
    meta.update(extra_meta or {})
    if storage.exists(uri):
        storage.delete(storage.join(uri, META_FILE))  # stale marker first: a reader sees "not ready", not a mix
    storage.upload_dir(staging, uri)
    storage.write_text(storage.join(uri, META_FILE), json.dumps(meta, indent=2, default=_jsonable))
    shutil.rmtree(staging, ignore_errors=True)
    return uri


def label_names(model_config) -> list[str]:
    """Label names in id order from a HF config's id2label."""
    id2label = {int(k): v for k, v in (model_config.id2label or {}).items()}
    return [id2label[i] for i in range(len(id2label))]

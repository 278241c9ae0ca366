"""bertray.checkpoint: a checkpoint is a plain Hugging Face folder plus bertray.json; export drops the optimizer."""
from __future__ import annotations

import os
import stat

import torch
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertForSequenceClassification

from bertray import checkpoint, modeling


def _tiny(tmp_path):
    tok = AutoTokenizer.from_pretrained(modeling.resolve("embedded"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, num_labels=3, id2label={0: "c", 1: "a", 2: "b"})
    return BertForSequenceClassification(cfg), tok


def test_export_drops_the_train_state_and_writes_its_meta_last(tmp_path):
    model, tok = _tiny(tmp_path)
    src = checkpoint.save(tmp_path / "ckpt", model, tok, {"kind": "classifier", "label_names": ["c", "a", "b"]})
    torch.save({"step": 3}, src / checkpoint.TRAIN_STATE)
    old = os.umask(0o022)
    try:
        out = checkpoint.export(src, str(tmp_path / "model"), extra_meta={"best_step": 3})
    finally:
        os.umask(old)
    names = {p.name for p in (tmp_path / "model").iterdir()}
    assert checkpoint.TRAIN_STATE not in names and {"config.json", "model.safetensors", checkpoint.META_FILE} <= names
    meta = checkpoint.read_meta(out)
    assert meta["format"] == checkpoint.FORMAT and meta["best_step"] == 3 and meta["label_names"] == ["c", "a", "b"]
    assert stat.S_IMODE(os.stat(tmp_path / "model" / checkpoint.META_FILE).st_mode) == 0o644
    # label names come back in id order, from config.json alone
    assert checkpoint.label_names(AutoConfig.from_pretrained(out)) == ["c", "a", "b"]


def test_a_plain_hugging_face_folder_has_no_meta(tmp_path):
    model, tok = _tiny(tmp_path)
    model.save_pretrained(tmp_path / "plain")
    assert checkpoint.read_meta(tmp_path / "plain") is None

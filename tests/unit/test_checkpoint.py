"""bertray.checkpoint: a checkpoint is a plain Hugging Face folder plus bertray.json; export drops the optimizer;
a LoRA checkpoint holds only the adapter and head, rebuilds exactly and exports merged."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForMaskedLM,
                          BertForSequenceClassification)

from bertray import checkpoint, modeling
from bertray.train_loop import _load_weights


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
    assert checkpoint.label_names(json.loads((tmp_path / "model" / "config.json").read_text())) == ["c", "a", "b"]


def test_a_plain_hugging_face_folder_has_no_meta(tmp_path):
    model, tok = _tiny(tmp_path)
    model.save_pretrained(tmp_path / "plain")
    assert checkpoint.read_meta(tmp_path / "plain") is None


@pytest.fixture(scope="module")
def mlm_base(tmp_path_factory) -> str:
    """A tiny masked-LM BERT: what further pretraining exports, and a base without a pooler."""
    tok = AutoTokenizer.from_pretrained(modeling.resolve("embedded"))
    out = tmp_path_factory.mktemp("mlm-base")
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_an_adapter_checkpoint_is_small_and_rebuilds_exactly_on_a_base_without_a_pooler(mlm_base, tmp_path, lora_model_cfg):
    """The base has no pooler, so the classifier's pooler starts random: it is trained and saved with the head, and
    a resume or export that rebuilds the model under another seed gives the same scores."""
    cfg, tok = lora_model_cfg(mlm_base, r=4, alpha=8), AutoTokenizer.from_pretrained(mlm_base)
    torch.manual_seed(1)
    model = modeling.build_classifier(cfg, ["neg", "pos"])
    with torch.no_grad():  # stand-in for training: move every trainable weight
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    ckpt = checkpoint.save(tmp_path / "ckpt", model, tok, {"kind": "classifier", "base_model": mlm_base})
    names = {p.name for p in ckpt.iterdir()}
    assert checkpoint.ADAPTER_WEIGHTS in names and "model.safetensors" not in names
    meta = checkpoint.read_meta(ckpt)["adapter"]
    assert meta["kind"] == "lora" and meta["base_model"] == mlm_base and (meta["r"], meta["alpha"]) == (4, 8)
    assert "bert.pooler.dense" in meta["modules_to_save"] and meta["trainable_params"] < meta["total_params"] / 50

    x = tok(["a fine film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.eval()(**x).logits
        torch.manual_seed(2)
        rebuilt = modeling.build_classifier(cfg, ["neg", "pos"])
        _load_weights(rebuilt, str(ckpt))
        torch.testing.assert_close(rebuilt.eval()(**x).logits, expected)

        checkpoint.export(ckpt, str(tmp_path / "model"), adapter_uri=str(tmp_path / "adapter"))
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
        torch.testing.assert_close(merged(**x).logits, expected, atol=1e-5, rtol=0)
    assert "model.safetensors" in {p.name for p in (tmp_path / "model").iterdir()}
    assert modeling.check_classifier("model", str(tmp_path / "model"))["adapter"]["merged"] is True
    with pytest.raises(modeling.ModelError, match="holds a lora adapter and head, not a whole model"):
        modeling.check_classifier("adapter", str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4

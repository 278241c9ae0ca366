"""LoRA adapters (model.adapter): config checks, what trains, what a checkpoint stores, and rebuilding it exactly."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForMaskedLM

from bertray import checkpoint
from bertray import config as C
from bertray import modeling
from bertray.train_loop import _load_weights


def _model_cfg(base: str, **adapter) -> C.ModelConfig:
    return C.load(C.FinetuneConfig, data={"data": {"train": "x"},
                                          "model": {"base": base, "adapter": {"kind": "lora", **adapter}}}).model


def test_adapter_settings_are_checked_all_at_once():
    with pytest.raises(C.ConfigError) as e:
        C.load(C.FinetuneConfig, data={"data": {"train": "x"}, "model": {
            "freeze_encoder": True, "adapter": {"kind": "lora", "r": 0, "alpha": -2, "dropout": 1.0, "target": []}}})
    assert e.value.errors == [
        "model.adapter.r: must be > 0, got 0",
        "model.adapter.alpha: must be > 0, got -2",
        "model.adapter.dropout: must be in [0, 1), got 1.0",
        "model.adapter.target: needs module names such as [query, value], got []",
        "model.freeze_encoder: contradicts model.adapter.kind=lora (the base is frozen and the adapter trains); drop one",
    ]
    with pytest.raises(C.ConfigError, match="model.freeze_layers: contradicts model.adapter.kind=lora"):
        C.load(C.FinetuneConfig, data={"data": {"train": "x"}}, overrides=["model.adapter.kind=lora",
                                                                          "model.freeze_layers=2"])
    with pytest.raises(C.ConfigError, match="model.adapter: adapters are for fine-tuning"):
        C.load(C.PretrainConfig, data={"data": {"train": "x"}}, overrides=["model.adapter.kind=lora"])
    cfg = C.load(C.FinetuneConfig, data={"data": {"train": "x"}},
                 overrides=["model.adapter.kind=lora", "model.adapter.r=4", "model.adapter.target=key"])
    assert (cfg.model.adapter.r, cfg.model.adapter.alpha, cfg.model.adapter.target) == (4, 16, ["key"])
    assert C.FinetuneConfig().model.adapter.kind == "none"


def test_rank_and_alpha_are_sweepable_and_each_value_is_checked():
    def sweep(space: dict, kind: str = "lora") -> C.TuneConfig:
        return C.load(C.TuneConfig, data={"data": {"train": "x"}, "model": {"adapter": {"kind": kind}},
                                          "search": {"space": space}})

    cfg = sweep({"model.adapter.r": {"choice": [4, 8, 16]}, "model.adapter.alpha": {"randint": [8, 32]}})
    assert C.parse_space(cfg.search.space) == ({"model.adapter.r": ("choice", [4, 8, 16]),
                                                "model.adapter.alpha": ("randint", [8, 32])}, [])
    with pytest.raises(C.ConfigError) as e:
        sweep({"model.adapter.r": {"choice": [4, 0]}, "model.adapter.alpha": {"uniform": [1, 2]}})
    assert e.value.errors == [
        "search.space.model.adapter.alpha: uniform draws floats but model.adapter.alpha is int; use randint or choice",
        "search.space.model.adapter.r: value 0 is not allowed: model.adapter.r: must be > 0, got 0",
    ]
    with pytest.raises(C.ConfigError, match="model.adapter.r: has no effect without an adapter"):
        sweep({"model.adapter.r": {"choice": [4, 8]}}, kind="none")


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


def test_only_the_adapter_and_the_new_head_train(tiny_bert):
    model = modeling.build_classifier(_model_cfg(tiny_bert, r=2), ["a", "b", "c"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier.modules_to_save" in n for n in trainable), trainable
    assert {n.split(".attention.self.")[1].split(".")[0] for n in trainable if "lora_" in n} == {"query", "value"}
    assert model.config.num_labels == 3


def test_an_adapter_checkpoint_is_small_and_rebuilds_exactly_on_a_base_without_a_pooler(mlm_base, tmp_path):
    """The base has no pooler, so the classifier's pooler starts random: it is trained and saved with the head, and
    a resume or export that rebuilds the model under another seed gives the same scores."""
    cfg, tok = _model_cfg(mlm_base, r=4, alpha=8), AutoTokenizer.from_pretrained(mlm_base)
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


def test_a_full_checkpoint_is_not_loaded_into_an_adapter_model_or_the_reverse(tiny_bert, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    full = modeling.build_classifier(C.ModelConfig(base=tiny_bert), ["a", "b"])
    adapted = modeling.build_classifier(_model_cfg(tiny_bert), ["a", "b"])
    checkpoint.save(tmp_path / "full", full, tok, {"kind": "classifier"})
    checkpoint.save(tmp_path / "adapter", adapted, tok, {"kind": "classifier"})
    with pytest.raises(RuntimeError, match="does not match the model"):
        _load_weights(adapted, str(tmp_path / "full"))
    with pytest.raises(RuntimeError, match="holds an adapter, and the model has none"):
        _load_weights(full, str(tmp_path / "adapter"))


def test_targets_the_model_lacks_are_refused_in_one_line_naming_its_layers(tiny_bert):
    with pytest.raises(modeling.ModelError) as e:
        modeling.check_adapter(_model_cfg(tiny_bert, target=["q_lin", "value"]))
    assert str(e.value) == (f"model.adapter.target: q_lin names no module of {tiny_bert!r} "
                            "(BertForSequenceClassification); its linear layers are called dense, key, query, value")
    with pytest.raises(modeling.ModelError) as e:
        modeling.check_adapter(_model_cfg(tiny_bert, target=["LayerNorm"]))
    assert str(e.value).startswith(f"model.adapter: PEFT cannot put lora adapters on {tiny_bert!r}")
    assert "is not supported" in str(e.value) and "\n" not in str(e.value)
    modeling.check_adapter(_model_cfg(tiny_bert, target=["attention.output.dense"]))  # a dotted name ending
    modeling.check_adapter(C.ModelConfig(base="/no/such/model"))  # no adapter: nothing to check here

"""bertray.modeling: resolving model folders, refusing damaged weights and heads before any worker loads them,
truncation and windows of long texts, and building a classifier with a LoRA adapter."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from bertray import config as C
from bertray import modeling


def _folder(tmp_path, weights: bytes | None):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    if weights is not None:
        (tmp_path / "model.safetensors").write_bytes(weights)
    return str(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_damaged_weights_are_refused_by_name_before_loading(tmp_path, damage, capsys):
    save_file({"w": torch.zeros(256)}, tmp_path / "whole.safetensors")
    whole = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "whole.safetensors").unlink()
    folder = _folder(tmp_path, whole[: len(whole) // 2] if damage == "truncated" else os.urandom(600))
    with pytest.raises(modeling.ModelError, match=r"model.safetensors: the weights file is damaged or incomplete"):
        modeling.resolve(folder)
    from bertray import cli

    assert cli.main(["predict", folder, "some text"]) == 1
    err = capsys.readouterr().err
    assert "damaged or incomplete" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_whole_weights_and_folders_without_safetensors_pass(tmp_path):
    save_file({"w": torch.zeros(4)}, tmp_path / "model.safetensors")
    assert modeling.resolve(_folder(tmp_path, None)) == str(tmp_path.resolve())
    modeling.check_weights(str(tmp_path / "nothing-here"))


@pytest.mark.parametrize("config,words", [
    ({"problem_type": "regression", "id2label": {"0": "LABEL_0"}}, "problem_type 'regression': a regression head"),
    ({"id2label": {"0": "score"}}, "problem_type 'regression'"),  # HF reads one output as regression
    ({"problem_type": "some_new_problem", "id2label": {"0": "a", "1": "b"}}, "problem_type 'some_new_problem'"),
])
def test_heads_that_a_softmax_would_score_wrongly_are_refused_by_name(tmp_path, config, words):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForSequenceClassification"], **config}))
    with pytest.raises(modeling.ModelError, match=words):
        modeling.check_classifier(str(tmp_path), str(tmp_path))
    with pytest.raises(modeling.ModelError, match=words):  # what labeling checks on its driver
        modeling.classifier_labels(str(tmp_path))


def test_a_single_label_classifier_passes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"],
                                                      "id2label": {"0": "neg", "1": "pos"}}))
    assert modeling.check_classifier(str(tmp_path), str(tmp_path)) == {}


def test_a_multi_label_classifier_passes_and_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"],
                                                      "problem_type": "multi_label_classification",
                                                      "id2label": {"0": "a", "1": "b", "2": "c"}}))
    assert modeling.classifier_labels(str(tmp_path)) == (["a", "b", "c"], {}, True)


def test_pair_segments_are_zero_through_the_first_separator_and_on_padding():
    sep = 102
    ids = torch.tensor([[101, 7, 8, sep, 9, sep, 0, 0], [101, 7, sep, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    assert modeling.pair_segments(ids, mask, sep).tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]]


def test_unused_trainable_weights_are_found_and_frozen_or_used_ones_are_not():
    """What DDP is told to look for: trainable weights a forward and backward pass leaves without a gradient (a
    head the forward never calls, or one it calls and drops); a masked-LM or a classifier has none; frozen weights
    do not count; a model the probe cannot drive gets None (DDP keeps looking, the safe setting)."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    class Wrapped(torch.nn.Module):
        def __init__(self, inner, side_effect):
            super().__init__()
            self.inner, self.side, self.side_effect = inner, torch.nn.Linear(2, 2), side_effect

        def forward(self, **inputs):
            self.side_effect(self)
            return self.inner(**inputs)

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    assert modeling.unused_trainable(BertForMaskedLM(cfg)) == []
    clf = BertForSequenceClassification(cfg)
    assert modeling.unused_trainable(clf) == []
    clf.extra = torch.nn.Linear(16, 2)
    clf.train()
    assert modeling.unused_trainable(clf) == ["extra.weight", "extra.bias"]
    assert clf.training and all(p.grad is None for p in clf.parameters())  # the probe leaves no trace
    clf.extra.requires_grad_(False)
    assert modeling.unused_trainable(clf) == []
    dropped = Wrapped(clf, lambda m: m.side(torch.zeros(1, 2)))  # called, its output thrown away
    assert modeling.unused_trainable(dropped) == ["side.weight", "side.bias"]

    def fails(m):
        raise TypeError("needs other inputs")
    assert modeling.unused_trainable(Wrapped(clf, fails)) is None


def test_truncation_policies():
    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    words = [f"w{i}" for i in range(200)]
    text = " ".join(words)
    for policy in ("head", "tail", "head+tail"):
        ids, cut = modeling.encode(tok, [text, "short"], 32, policy)
        assert len(ids[0]) == 32 and cut == 1 and ids[0][0] == tok.cls_token_id and ids[0][-1] == tok.sep_token_id
    head = tok.decode(modeling.encode(tok, [text], 32, "head")[0][0], skip_special_tokens=True)
    tail = tok.decode(modeling.encode(tok, [text], 32, "tail")[0][0], skip_special_tokens=True)
    both = tok.decode(modeling.encode(tok, [text], 32, "head+tail")[0][0], skip_special_tokens=True)
    assert head.startswith("w0") and tail.endswith("w199") and both.startswith("w0") and both.endswith("w199")


def test_the_tokenize_only_tokenizer_gives_the_models_own_ids_on_real_texts(shared_data):
    """Ray Data's tokenize tasks read tokenizer.json with transformers' generic fast tokenizer, which needs no torch;
    training, checkpoints and the Predictor use the model's own tokenizer class. Both must cut every text alike:
    sentences, long posts (by each truncation policy, and into windows) and sentence pairs."""
    path = modeling.resolve("embedded")
    own, light = modeling.load_tokenizer(path), modeling.load_tokenizer(path, tokenize_only=True)
    assert type(own) is not type(light)
    sentences = pq.read_table(shared_data / "sst2" / "validation.parquet").column("text").to_pylist()
    posts = pq.read_table(shared_data / "20newsgroups" / "test.parquet").slice(0, 300).column("text").to_pylist()
    for texts in (sentences, posts):
        for policy in ("head", "tail", "head+tail"):
            assert modeling.encode(own, texts, 128, policy) == modeling.encode(light, texts, 128, policy)
    ids, counts = modeling.windows(own, posts, 128, 32)
    light_ids, light_counts = modeling.windows(light, posts, 128, 32)
    assert ids == light_ids and counts.tolist() == light_counts.tolist() and counts.max() > 1
    pairs = pq.read_table(shared_data / "mrpc" / "validation.parquet")
    a, b = pairs.column("sentence1").to_pylist(), pairs.column("sentence2").to_pylist()
    assert modeling.encode(own, a, 48, pairs=b) == modeling.encode(light, a, 48, pairs=b)
    assert (own.cls_token_id, own.sep_token_id, own.pad_token_id, own.model_max_length) == (
        light.cls_token_id, light.sep_token_id, light.pad_token_id, light.model_max_length)


def test_windows_cover_the_text_within_max_length_and_overlap_as_asked():
    from bertray import modeling

    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    text = " ".join(f"w{i}" for i in range(200))
    body = tok(text, add_special_tokens=False)["input_ids"]
    ids, counts = modeling.windows(tok, [text, "short one", ""], 64, 16)
    assert counts.tolist()[1:] == [1, 1] and counts[0] == len(ids) - 2
    inner = [w[1:-1] for w in ids[: counts[0]]]
    assert all(len(w) <= 64 for w in ids) and inner[0] == body[:62] and inner[-1][-5:] == body[-5:]
    assert all(a[-16:] == b[:16] for a, b in zip(inner, inner[1:-1]))  # consecutive windows share 16 tokens
    assert sorted({t for w in inner for t in w}) == sorted(set(body))  # nothing of the text is left out
    pooled = modeling.pool_windows(np.array([[1.0, 0.0], [3.0, 2.0], [5.0, -1.0]]), np.array([2, 1]), "mean")
    assert pooled.tolist() == [[2.0, 1.0], [5.0, -1.0]]
    assert modeling.pool_windows(np.array([[1.0, 0.0], [3.0, -2.0]]), np.array([2]), "max").tolist() == [[3.0, 0.0]]


def test_only_the_adapter_and_the_new_head_train(tiny_bert, lora_model_cfg):
    model = modeling.build_classifier(lora_model_cfg(tiny_bert, r=2), ["a", "b", "c"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier.modules_to_save" in n for n in trainable), trainable
    assert {n.split(".attention.self.")[1].split(".")[0] for n in trainable if "lora_" in n} == {"query", "value"}
    assert model.config.num_labels == 3


def test_targets_the_model_lacks_are_refused_in_one_line_naming_its_layers(tiny_bert, lora_model_cfg):
    with pytest.raises(modeling.ModelError) as e:
        modeling.check_adapter(lora_model_cfg(tiny_bert, target=["q_lin", "value"]))
    assert str(e.value) == (f"model.adapter.target: q_lin names no module of {tiny_bert!r} "
                            "(BertForSequenceClassification); its linear layers are called dense, key, query, value")
    with pytest.raises(modeling.ModelError) as e:
        modeling.check_adapter(lora_model_cfg(tiny_bert, target=["LayerNorm"]))
    assert str(e.value).startswith(f"model.adapter: PEFT cannot put lora adapters on {tiny_bert!r}")
    assert "is not supported" in str(e.value) and "\n" not in str(e.value)
    modeling.check_adapter(lora_model_cfg(tiny_bert, target=["attention.output.dense"]))  # a dotted name ending
    modeling.check_adapter(C.ModelConfig(base="/no/such/model"))  # no adapter: nothing to check here

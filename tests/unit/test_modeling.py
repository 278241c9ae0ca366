"""bertray.modeling: resolving model folders, and refusing damaged weights before any worker loads them."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

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

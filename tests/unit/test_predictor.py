"""Predictor's length-aware micro-batching: bounded batches on CPU, results back in input order."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertray import modeling
from bertray.predictor import Predictor

LABELS = ["neg", "pos"]
REPO = Path(__file__).resolve().parents[2]
WORDS = ["good", "bad", "film", "plot", "quite", "never", "the", "actors", "unbelievably", "dull", "!"]


def _saved_bert_classifier(folder: Path, **config) -> str:
    """A random 2-label BERT classifier (`config` sizes it), saved with the embedded model's tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    cfg = BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=128, num_labels=2,
                     id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}, **config)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> str:
    return _saved_bert_classifier(tmp_path_factory.mktemp("tiny-cls"), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32)


@pytest.fixture(scope="module")
def plain_spread_classifier(tmp_path_factory) -> str:
    """Like tiny_classifier, with 2 layers and weights large enough that its scores differ from text to text
    (tiny_classifier gives every text 0.50 to three decimals, which cannot tell a right score from a wrong one).
    A plain Hugging Face folder with no bertray.json, unlike the shared `spread_classifier` checkpoint."""
    return _saved_bert_classifier(tmp_path_factory.mktemp("spread-cls"), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, initializer_range=0.5)


def test_cpu_micro_batches_stay_small_and_results_keep_input_order(plain_spread_classifier):
    pred = Predictor(plain_spread_classifier, max_length=128)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(n))) for n in rng.integers(1, 100, size=300)]
    batched, shapes = _probs_and_passes(pred, texts)

    assert pred.token_budget == 2048 and pred.max_batch == 64 and pred.pass_cost == 64  # the CPU defaults
    assert sum(rows for rows, _ in shapes) == len(texts)
    assert all(rows <= 64 and rows * width <= 2048 for rows, width in shapes), shapes
    widths = [w for _, w in shapes]
    assert widths == sorted(widths)  # sorted by length, so each batch pads to its own longest text only

    one_by_one = np.concatenate([pred.predict([t]).probs for t in texts[:40]])
    assert one_by_one[:, 0].std() > 0.05  # scores that differ, so a row out of place shows
    np.testing.assert_allclose(batched[:40], one_by_one, atol=1e-5)


def _padded_cost(lengths, cuts, pass_cost):
    return sum((end - start) * lengths[end - 1] + pass_cost for start, end in cuts)


def test_passes_trade_padding_against_passes():
    from bertray.predictor import plan_passes

    # Three short texts and one long one: greedy pads all four to 100; two passes cost less than 400 tokens.
    assert plan_passes([10, 10, 10, 100], 4, 2048, None) == [(0, 4)]
    assert plan_passes([10, 10, 10, 100], 4, 2048, 64) == [(0, 3), (3, 4)]
    assert plan_passes([600, 700], 8, 512, 64) == [(0, 1), (1, 2)]  # over the budget alone: still one pass each
    assert plan_passes([], 8, 512, 64) == []

    rng = np.random.default_rng(1)
    for _ in range(50):
        lengths = sorted(rng.integers(1, 200, size=int(rng.integers(1, 300))).tolist())
        greedy = plan_passes(lengths, 64, 2048, None)
        cut = plan_passes(lengths, 64, 2048, 64)
        # Contiguous cover of every text, within both limits ...
        assert [s for s, _ in cut] == [0] + [e for _, e in cut[:-1]] and cut[-1][1] == len(lengths)
        assert all(e - s <= 64 and ((e - s) * lengths[e - 1] <= 2048 or e - s == 1) for s, e in cut)
        # ... and never dearer than the greedy cut, which is one of the cuts it chooses among.
        assert _padded_cost(lengths, cut, 64) <= _padded_cost(lengths, greedy, 64)


def test_explicit_budget_wins(tiny_classifier):
    pred = Predictor(tiny_classifier, token_budget=512, max_batch=8)
    assert (pred.token_budget, pred.max_batch) == (512, 8)


def test_serve_replicas_use_smaller_passes_on_cpu(tiny_classifier):
    """A serve batch is a few dozen unsorted texts: on CPU its passes are capped lower than the labeler's."""
    from bertray.config import SERVE_CPU_TOKEN_BUDGET, ServeConfig
    from bertray.serve import load_predictor

    assert load_predictor(ServeConfig(model=tiny_classifier)).token_budget == SERVE_CPU_TOKEN_BUDGET < 2048
    assert load_predictor(ServeConfig(model=tiny_classifier, token_budget=300)).token_budget == 300


def test_serve_replicas_load_the_int8_and_bf16_models_when_asked(tiny_classifier):
    import torch

    from bertray.config import ServeConfig
    from bertray.predictor import Int8Linear
    from bertray.serve import load_predictor

    def int8_layers(cfg):
        return sum(type(m) is Int8Linear for m in load_predictor(cfg).model.modules())

    assert int8_layers(ServeConfig(model=tiny_classifier)) == 0
    assert int8_layers(ServeConfig(model=tiny_classifier, quantize="int8")) > 0
    assert load_predictor(ServeConfig(model=tiny_classifier, quantize="bf16")).model.dtype == torch.bfloat16


def test_bf16_runs_the_whole_model_in_bf16_and_scores_in_fp32(tiny_classifier, caplog, monkeypatch):
    import torch

    from bertray import predictor

    fp32 = Predictor(tiny_classifier)
    bf16 = Predictor(tiny_classifier, quantize="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    texts = ["a fine film", "dull and long", "x " * 50]
    probs = bf16.predict(texts).probs
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)  # a bf16 softmax would be off by ~1e-3
    np.testing.assert_allclose(probs, fp32.predict(texts).probs, atol=0.02)
    # bf16 is a CPU option: a GPU already runs inference under bf16 autocast.
    with pytest.raises(ValueError, match="bf16 is a CPU option"):
        Predictor(tiny_classifier, device="cuda", quantize="bf16")
    # Where the CPU would emulate bf16, the user is told it is likely slower, and the model still loads.
    monkeypatch.setattr(predictor, "cpu_has_bf16", lambda: False)
    with caplog.at_level("WARNING", logger="bertray.predictor"):
        assert Predictor(tiny_classifier, quantize="bf16").model.dtype == torch.bfloat16
    assert "neither AVX512-BF16 nor AMX" in caplog.text


def test_int8_quantizes_the_encoder_per_channel_and_keeps_the_head_fp32(tiny_classifier):
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from bertray.predictor import Int8Linear

    fp32 = Predictor(tiny_classifier)
    q = Predictor(tiny_classifier, quantize="int8")
    assert type(q.model.classifier) is torch.nn.Linear and type(q.model.bert.pooler.dense) is torch.nn.Linear
    quantized = {n: m for n, m in q.model.named_modules() if isinstance(m, DynamicInt8Linear)}
    # q, k, v, attention output, FFN in and FFN out of the one layer; nothing else.
    assert sorted(quantized) == sorted(n for n, m in fp32.model.named_modules()
                                       if isinstance(m, torch.nn.Linear) and ".encoder." in n)
    assert len(quantized) == 6
    # ... and each is ours, which picks 7- or 8-bit activations for the CPU it runs on.
    assert all(type(m) is Int8Linear for m in quantized.values())
    assert all(m.weight().qscheme() == torch.per_channel_affine for m in quantized.values())
    texts = ["a fine film", "dull and long", "x " * 50]
    np.testing.assert_allclose(q.predict(texts).probs, fp32.predict(texts).probs, atol=0.05)


def test_a_plain_hf_folder_truncates_to_the_positions_its_model_has(tiny_classifier):
    # The tiny model has 128 positions and its tokenizer says 512: a long text used to fail inside the embeddings.
    pred = Predictor(tiny_classifier)
    assert pred.max_length == 128
    out = pred.predict(["word " * 300, "short"])
    assert out.truncated == 1 and out.probs.shape == (2, 2)


def _pass_shapes(pred, run) -> list[tuple[int, int]]:
    """(texts, padded width) of each forward pass `run` makes through `pred`; a packed pass pads only attention, to
    the same width."""
    shapes, inner = [], pred._pass
    pred._pass = lambda seqs, width, *rest: shapes.append((len(seqs), width)) or inner(seqs, width, *rest)
    try:
        run()
    finally:
        del pred._pass
    return shapes


def _probs_and_passes(pred, texts) -> tuple[np.ndarray, list[tuple[int, int]]]:
    out = []
    shapes = _pass_shapes(pred, lambda: out.append(pred.predict(texts).probs))
    return out[0], shapes


def _model_calls(pred, run) -> list[tuple[int, int]]:
    """The input shape of each call `run` makes to the Hugging Face model's own forward."""
    shapes = []
    hook = pred.model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return shapes


def _widths_seen(pred, run) -> list[int]:
    return [width for _, width in _model_calls(pred, run)]


def test_bf16_pads_to_multiples_of_8_and_warms_every_width_up(tiny_classifier):
    """bf16 builds a kernel per input shape on first sight, so its passes pad to a multiple of 8 tokens and a
    replica runs one text at each of those widths before serving; fp32 pads to the text and needs no warm-up."""
    texts = [" ".join(["word"] * n) for n in (1, 5, 9, 14, 30, 61)]
    bf16 = Predictor(tiny_classifier, quantize="bf16", max_length=60)
    fp32 = Predictor(tiny_classifier, max_length=60)
    lengths = [len(x) for x in fp32.encode(texts)[0]]
    assert lengths == [3, 7, 11, 16, 32, 60]
    assert _widths_seen(bf16, lambda: [bf16.predict([t]) for t in texts]) == [8, 8, 16, 16, 32, 60]  # capped
    assert [w for _, w in _pass_shapes(fp32, lambda: [fp32.predict([t]) for t in texts])] == lengths
    assert _widths_seen(bf16, bf16.warm_up) == [8, 16, 24, 32, 40, 48, 56, 60]
    assert _pass_shapes(fp32, fp32.warm_up) == []
    # The padding is masked: a text scores the same alone, padded to 8, as in a pass with longer texts.
    alone = np.concatenate([bf16.predict([t]).probs for t in texts])
    np.testing.assert_allclose(bf16.predict(texts).probs, alone, atol=0.01)


def test_bf16_passes_are_planned_at_their_padded_width_so_they_keep_the_token_budget(tiny_classifier):
    bf16 = Predictor(tiny_classifier, quantize="bf16", max_length=128, token_budget=512)
    # Texts of 33 tokens run padded to 40: planned at 33, a pass of 15 (495 tokens) would run at 600.
    shapes = _model_calls(bf16, lambda: bf16.predict(["word " * 31] * 62 + ["word " * 9] * 40))
    assert sum(rows for rows, _ in shapes) == 102
    assert all(rows * width <= 512 and width % 8 == 0 for rows, width in shapes), shapes


def _mixed_texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(k))) for k in rng.integers(1, 60, size=n)]


@pytest.mark.parametrize("model", ["spread", "embedded"])
def test_cpu_bert_passes_run_packed_and_score_as_the_models_own_padded_forward(model, plain_spread_classifier,
                                                                              tmp_path):
    """Packed passes never call the model's forward, and give what padded passes through it give."""
    from transformers import AutoModelForSequenceClassification

    if model == "embedded":  # the default base model with a fresh 3-class head: 6 layers, 12 heads
        AutoModelForSequenceClassification.from_pretrained(modeling.resolve("embedded"), num_labels=3)\
            .save_pretrained(tmp_path)
        modeling.load_tokenizer(modeling.resolve("embedded")).save_pretrained(tmp_path)
    pred = Predictor(plain_spread_classifier if model == "spread" else str(tmp_path), max_length=64)
    texts = _mixed_texts(150)
    assert pred.packed
    packed, shapes = _probs_and_passes(pred, texts)
    assert len(shapes) > 1 and _model_calls(pred, lambda: pred.predict(texts)) == []
    pred.packed = False
    padded, padded_shapes = _probs_and_passes(pred, texts)
    assert padded_shapes == shapes  # the same passes, each through the model's forward
    assert len(_model_calls(pred, lambda: pred.predict(texts))) == len(shapes)
    assert packed.std(axis=0).min() > 1e-4  # scores that differ from text to text, far beyond the tolerance
    np.testing.assert_allclose(packed, padded, atol=1e-6)


def test_int8_runs_packed_with_its_quantized_layers(plain_spread_classifier):
    """int8 quantizes activations with one scale per call. Where no text has padding the packed and padded calls
    see the same rows, so they must agree exactly; with padding they may not, since pad rows widen a padded
    call's range."""
    pred = Predictor(plain_spread_classifier, quantize="int8")
    assert pred.packed
    same_length = [[101] + [2000 + 37 * i + j for j in range(20)] + [102] for i in range(12)]
    mixed = [x[: 3 + 2 * i] + [102] for i, x in enumerate(same_length)]
    packed = {"same": pred.predict_ids(same_length), "mixed": pred.predict_ids(mixed)}
    pred.packed = False
    assert packed["same"][:, 0].std() > 0.05
    np.testing.assert_array_equal(packed["same"], pred.predict_ids(same_length))
    one_at_a_time = np.concatenate([pred.predict_ids([x]) for x in mixed])  # no padding: exact too
    pred.packed = True
    np.testing.assert_array_equal(np.concatenate([pred.predict_ids([x]) for x in mixed]), one_at_a_time)
    np.testing.assert_allclose(packed["mixed"], one_at_a_time, atol=0.1)


def _bert(**changes):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, **changes)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


def test_packing_is_refused_where_it_would_not_compute_what_the_model_does(plain_spread_classifier, tmp_path):
    import torch
    from transformers import BertForSequenceClassification, DistilBertConfig, DistilBertForSequenceClassification

    from bertray.predictor import can_pack

    class MeanPooled(BertForSequenceClassification):  # a subclass may change the forward: not ours to redo
        pass

    assert can_pack(_bert())
    assert can_pack(_bert(attn_implementation="eager"))
    assert not can_pack(_bert().train())  # packed passes skip dropout
    assert not can_pack(_bert(is_decoder=True))
    assert not can_pack(_bert(attn_implementation="flex_attention"))
    assert not can_pack(_bert().to(torch.bfloat16))  # a bf16 checkpoint loads as bf16: no packed bf16 passes
    assert not can_pack(MeanPooled(_bert().config).eval())
    assert not can_pack(DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=100, dim=16, n_layers=1, n_heads=2, hidden_dim=32)).eval())
    assert not Predictor(plain_spread_classifier, quantize="bf16").packed

    texts = _mixed_texts(40, seed=1)
    tok = modeling.load_tokenizer(plain_spread_classifier)
    torch.manual_seed(0)
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2,
                                                         hidden_dim=32, max_position_embeddings=64)) \
        .save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    other = Predictor(str(tmp_path))
    assert not other.packed
    assert len(_model_calls(other, lambda: other.predict(texts))) > 0


def test_replicas_warm_bf16_up_before_serving(tiny_classifier, monkeypatch):
    from bertray.config import ServeConfig
    from bertray.serve import load_predictor

    calls = []
    monkeypatch.setattr(Predictor, "warm_up", lambda self: calls.append(self.width_step))
    load_predictor(ServeConfig(model=tiny_classifier, quantize="bf16"))
    assert calls == [8]


def test_a_max_length_beyond_the_models_positions_is_refused_by_name(tiny_classifier):
    with pytest.raises(modeling.ModelError, match="max_length 256 exceeds the 128 positions the model has"):
        Predictor(tiny_classifier, max_length=256)


def _int8_layer_outputs():
    """One 384 x 384 layer on random activations: fp32 output, Int8Linear's, and stock PyTorch int8's (7 bits)."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig

    from bertray.predictor import Int8Linear, _quantize_dynamic

    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(384, 384))
    x = torch.randn(256, 384)
    spec = {torch.nn.Linear: per_channel_dynamic_qconfig}
    with torch.inference_mode():
        ours = _quantize_dynamic(layer, spec, mapping={torch.nn.Linear: Int8Linear})
        stock = _quantize_dynamic(layer, spec)
        return layer(x), ours(x), stock(x)


def _has_avx2() -> bool:
    try:
        return "avx2" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="fbgemm's ISA levels are x86's")
@pytest.mark.skipif(not _has_avx2(), reason="the test limits fbgemm to AVX2, which this CPU lacks (or /proc is absent)")
def test_int8_keeps_7_bit_activations_where_the_kernels_saturate():
    """fbgemm limited to AVX2 sums pairs of 8-bit products in 16 bits, which saturate at full range: the probe must
    say so, and Int8Linear must then compute exactly what PyTorch's own 7-bit layer does."""
    code = ("import torch\n"
            "from bertray.predictor import int8_full_range\n"
            "from tests.unit.test_predictor import _int8_layer_outputs\n"
            "_, ours, stock = _int8_layer_outputs()\n"
            "print(int8_full_range(), torch.equal(ours, stock))")
    avx2 = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"})
    assert avx2.returncode == 0, avx2.stderr
    assert avx2.stdout.split() == ["False", "True"]


def test_int8_takes_8_bit_activations_where_the_kernels_sum_exactly():
    """Where the probe finds exact sums (VNNI), a layer's output tracks fp32 about twice as closely as PyTorch's
    7-bit one."""
    from bertray.predictor import int8_full_range

    if not int8_full_range():
        pytest.skip("this CPU's int8 kernels saturate at full range (no VNNI): 7-bit activations")
    exact, ours, stock = _int8_layer_outputs()
    err8, err7 = (ours - exact).abs().mean(), (stock - exact).abs().mean()
    assert err8 < 0.75 * err7, (err8, err7)


def _multi_label_classifier(folder: Path) -> str:
    """A plain Hugging Face multi-label BERT (problem_type set, as transformers writes it), 3 labels."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    names = ["a", "b", "c"]
    cfg = BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=128, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, initializer_range=0.5, num_labels=3,
                     id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                     problem_type="multi_label_classification")
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("packed", [True, False])
def test_a_multi_label_hf_checkpoint_is_scored_with_a_sigmoid_per_label(tmp_path, packed):
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = _multi_label_classifier(tmp_path / "ml")
    pred = Predictor(folder)
    pred.packed = pred.packed and packed
    texts = _mixed_texts(40)
    probs = pred.predict(texts).probs
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    enc = pred.tokenizer(texts, padding=True, truncation=True, max_length=pred.max_length, return_tensors="pt")
    with torch.no_grad():
        expected = torch.sigmoid(model(**enc).logits).numpy()
    assert pred.multi_label and np.allclose(probs, expected, atol=1e-5)
    assert not np.allclose(probs.sum(axis=1), 1.0, atol=1e-2)  # not a softmax
    assert pred.thresholds.tolist() == [0.5, 0.5, 0.5]  # a plain HF folder has no tuned thresholds


@pytest.mark.parametrize("packed", [True, False])
def test_pairs_are_scored_as_the_model_scores_them_with_segment_ids(plain_spread_classifier, packed):
    import torch
    from transformers import AutoModelForSequenceClassification

    pred = Predictor(plain_spread_classifier)
    pred.packed = pred.packed and packed
    first, second = _mixed_texts(30, seed=1), _mixed_texts(30, seed=2)
    probs = pred.predict(first, second).probs
    model = AutoModelForSequenceClassification.from_pretrained(plain_spread_classifier).eval()
    enc = pred.tokenizer(first, second, padding=True, truncation="longest_first", max_length=pred.max_length,
                         return_tensors="pt")
    assert enc["token_type_ids"].any()  # the reference really has second segments
    with torch.no_grad():
        expected = torch.softmax(model(**enc).logits, -1).numpy()
    assert np.allclose(probs, expected, atol=1e-5)
    # Without segment ids the model scores otherwise: the test can tell.
    with torch.no_grad():
        flat = torch.softmax(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits, -1)
    assert not np.allclose(probs, flat.numpy(), atol=1e-4)

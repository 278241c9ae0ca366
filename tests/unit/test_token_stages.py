"""The tokenize stages without Ray: pretraining's packing, truncation and counts, and that the module stays light
(fine-tuning's encode_block is tested with the driver side that reassembles its blocks, in test_finetune.py)."""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest

from bertray import config as C
from bertray import modeling
from bertray.token_stages import STAGE_COUNTS, SequenceStream, tokenize_batch


@pytest.fixture(scope="module")
def tok():
    return modeling.load_tokenizer(modeling.resolve("embedded"))


def _cfg(**mlm) -> C.PretrainConfig:
    return C.load(C.PretrainConfig, data={"data": {"train": "x.parquet"}, "model": {"max_length": 16}, "mlm": mlm})


def test_packing_fills_sequences_and_keeps_every_token(tok):
    cfg = _cfg(packing=True)
    texts = ["a short one", "another rather short sentence here", "x", "the last text of the pass"]
    stream = SequenceStream(tok, cfg)
    seqs = stream.sequences(texts[:2]) + stream.sequences(texts[2:]) + stream.flush()
    assert all(len(s) == 16 for s in seqs[:-1]) and len(seqs[-1]) <= 16
    assert all(s[0] == tok.cls_token_id and s[-1] == tok.sep_token_id for s in seqs)
    body = [t for s in seqs for t in s[1:-1]]
    expected = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        expected += ids + [tok.sep_token_id]
    assert body == expected[:-1]  # documents joined by [SEP], nothing dropped, no trailing [SEP][SEP]


def test_truncation_mode_one_text_per_sequence(tok):
    cfg = _cfg(packing=False)
    stream = SequenceStream(tok, cfg)
    seqs = stream.sequences(["short", "word " * 40])
    assert len(seqs) == 2 and len(seqs[1]) == 16 and stream.counts["truncated"] == 1
    assert stream.flush() == []


def test_stream_counts_dropped_texts(tok):
    cfg = _cfg()
    stream = SequenceStream(tok, cfg, holdout=frozenset({"kept out"}))
    kept = stream.texts(pa.table({"text": ["fine", None, "   ", "kept out", "also fine"]}), "mem")
    assert kept == ["fine", "also fine"]
    assert dict(stream.counts) == {"texts_read": 5, "null_text": 1, "empty_text": 1, "held_out": 1}


def test_the_tokenize_stage_packs_a_batch_and_attaches_its_counts():
    """What each Ray Data task of the stream does: the workers get token ids, never text."""
    cfg = C.load(C.PretrainConfig, data={"data": {"train": "x.parquet"}, "model": {"base": "embedded", "max_length": 16}})
    texts = ["a short one", None, "  ", "kept out", "another rather short sentence here, a little longer", "x"]
    out = tokenize_batch(pa.table({"text": texts}), cfg, frozenset({"kept out"}))
    assert out.column_names == ["input_ids", *STAGE_COUNTS]
    seqs = out.column("input_ids").to_pylist()
    tok = modeling.cached_tokenizer("embedded")
    stream = SequenceStream(tok, cfg)
    assert seqs == stream.sequences(["a short one", "another rather short sentence here, a little longer", "x"]) \
        + stream.flush()
    assert all(len(s) == 16 for s in seqs[:-1]) and len(seqs) > 1
    counts = {k: out.column(k).to_pylist() for k in STAGE_COUNTS}
    assert {k: v[0] for k, v in counts.items()} == {"texts_read": 6, "null_text": 1, "empty_text": 1, "held_out": 1,
                                                     "truncated": 0}
    assert all(sum(v[1:]) == 0 for v in counts.values())  # counted once, on the first row
    nothing = tokenize_batch(pa.table({"text": [None, ""]}), cfg, frozenset())
    assert nothing.column("input_ids").to_pylist() == [[]] and nothing.column("texts_read").to_pylist() == [2]


def test_the_stages_load_neither_the_training_loop_nor_the_model_classes_nor_torch():
    """What a tokenize task (and Ray Train's controller, which unpickles the stream) imports to run the stages:
    importing torch and the model classes would cost each task's process seconds and hundreds of MB."""
    code = ("import sys, pyarrow as pa; from bertray import token_stages as t; "
            "t.encode_block(pa.table({'row': [0], 'text': ['a text']}), 'embedded', 16, 'head'); "
            "print(sorted(m for m in ('bertray.finetune', 'bertray.pretrain', 'bertray.train_loop', "
            "'transformers.modeling_utils', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout

"""Masked-LM pieces without Ray: masking, the held-out sample, column checks, the masked-only head."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bertray import config as C
from bertray import data as D
from bertray import modeling
from bertray import pretrain as P
from bertray.token_stages import STAGE_COUNTS


@pytest.fixture(scope="module")
def tok():
    return modeling.load_tokenizer(modeling.resolve("embedded"))


@pytest.fixture(scope="module")
def vocab(tok):
    return P.Vocab(tok)


def _cfg(**mlm) -> C.PretrainConfig:
    return C.load(C.PretrainConfig, data={"data": {"train": "x.parquet"}, "model": {"max_length": 16}, "mlm": mlm})


def test_masking_rates_and_never_special(vocab):
    rng = np.random.default_rng(0)
    ids = rng.choice(vocab.random_ids, size=(64, 128))
    ids[:, 0], ids[:, -1] = vocab.cls_id, vocab.sep_id
    ids[:8, 100:] = vocab.pad_id
    special = np.isin(ids, vocab.special_ids)
    inputs, labels = P.mask_tokens(ids, special, rng, C.MLMConfig(), vocab)
    sel = labels != -100
    assert not sel[special].any()  # [CLS], [SEP] and padding never predicted
    assert abs(sel.sum() / (~special).sum() - 0.15) < 0.01
    assert (labels[sel] == ids[sel]).all() and (inputs[~sel] == ids[~sel]).all()
    masked = (inputs[sel] == vocab.mask_id).mean()
    kept = (inputs[sel] == ids[sel]).mean()
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.02
    assert not np.isin(inputs[sel & (inputs != vocab.mask_id) & (inputs != ids)], vocab.special_ids).any()


def test_whole_word_masking_masks_all_pieces_together(tok, vocab):
    words = "unbelievably tokenization hypersensitivity photosynthesis antidisestablishmentarianism".split() * 40
    enc = tok(" ".join(words), add_special_tokens=True)["input_ids"]
    ids = np.array([enc])
    special = np.isin(ids, vocab.special_ids)
    inputs, labels = P.mask_tokens(ids, special, np.random.default_rng(1), C.MLMConfig(whole_word=True), vocab)
    sel = (labels != -100)[0]
    cont = vocab.is_continuation[ids[0]]
    assert cont.sum() > 50 and sel.any()
    # every word is either fully selected or not at all
    word = np.cumsum(~cont & ~special[0])
    for w in np.unique(word[~special[0]]):
        assert len(set(sel[(word == w) & ~special[0]])) == 1


def test_masking_always_selects_at_least_one(vocab):
    ids = np.array([[vocab.cls_id, 2000, vocab.sep_id]])
    special = np.isin(ids, vocab.special_ids)
    for seed in range(20):
        _, labels = P.mask_tokens(ids, special, np.random.default_rng(seed), C.MLMConfig(), vocab)
        assert (labels != -100).sum() >= 1


def test_eval_batches_are_fixed(tok, vocab):
    cfg = _cfg()
    texts = [f"sentence number {i} about films" for i in range(50)]
    a = P.eval_batches_for(texts, tok, vocab, cfg)
    b = P.eval_batches_for(texts, tok, vocab, cfg)
    assert all(torch.equal(x["labels"], y["labels"]) and torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))


def test_masked_only_head_gives_the_full_logit_loss(tiny_bert, tok, vocab):
    model, initialised = modeling.build_masked_lm(C.ModelConfig(base=tiny_bert))
    assert initialised  # tiny_bert is a bare encoder
    model.eval()
    batch = P.make_batch([tok("a film about films and more films")["input_ids"]] * 4, vocab, C.MLMConfig(probability=0.4),
                         np.random.default_rng(0))
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        gather = P.attach_gather(model)
        logits, labels = P.masked_logits(model, batch, gather)
        assert logits.shape == (int((batch["labels"] != -100).sum()), model.config.vocab_size)
        sparse = torch.nn.functional.cross_entropy(logits, labels)
        # inactive outside masked_logits: the model returns full logits again
        assert model(input_ids=batch["input_ids"]).logits.dim() == 3
        no_hook_logits, no_hook_labels = P.masked_logits(model, batch, None)  # a model without an output embedding
    assert torch.allclose(full, sparse, atol=1e-5)
    assert torch.equal(no_hook_labels, labels) and torch.allclose(no_hook_logits, logits, atol=1e-5)


def test_keep_pooler_carries_the_base_pooler(tiny_bert):
    from transformers import AutoModel

    model, _ = modeling.build_masked_lm(C.ModelConfig(base=tiny_bert))
    P.keep_pooler(model, tiny_bert)
    base = AutoModel.from_pretrained(tiny_bert)
    assert torch.equal(model.bert.pooler.dense.weight, base.pooler.dense.weight)
    assert not model.bert.pooler.dense.weight.requires_grad


def test_text_column_check_names_what_exists(tmp_path):
    f = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"body": ["x"], "id": [1]}), f)
    with pytest.raises(D.DataError, match=r"missing text column\(s\) 'text'.*the file has: body, id"):
        P.train_source(C.DataConfig(train=str(tmp_path)))
    pq.write_table(pa.table({"text": [1, 2]}), f)
    with pytest.raises(D.DataError, match="text column 'text' has type int64"):
        P.check_text_columns(str(f), ["text"])
    (tmp_path / "notes.csv").write_text("text\nhello\n")
    with pytest.raises(D.DataError, match="streams Parquet files or a Hugging Face dataset; these are not: .*notes.csv"):
        P.train_source(C.DataConfig(train=str(tmp_path)))


def test_held_out_sample_from_last_file(tmp_path):
    pq.write_table(pa.table({"text": [f"a{i}" for i in range(10)]}), tmp_path / "part-0.parquet")
    pq.write_table(pa.table({"text": ["", None, *[f"b{i}" for i in range(10)]]}), tmp_path / "part-1.parquet")
    d = C.DataConfig(train=str(tmp_path))
    texts, report = P.held_out_texts(d, P.train_source(d), 4)
    assert texts == ["b0", "b1", "b2", "b3"]
    assert report["source"].endswith("part-1.parquet") and report["held_out_from_training"]


def test_the_collate_pads_masks_and_sums_the_counts(vocab):
    cfg = _cfg()
    table = pa.table({"input_ids": pa.array([[101, 7592, 2088, 102], [], [101, 2023, 102]], pa.list_(pa.int32())),
                      **{k: pa.array([3, 0, 1]) for k in STAGE_COUNTS}})
    collate = P.SequenceCollate(vocab, cfg.mlm, [42, 0, 0, 0], pad_multiple=8)
    batch = collate(table)
    assert batch["input_ids"].shape == (2, 8)  # the empty row dropped, padded to a multiple of 8
    assert batch["attention_mask"].sum(dim=1).tolist() == [4, 3]
    assert batch["counts"].tolist() == [4] * len(STAGE_COUNTS)
    assert (batch["masked_labels"] >= 0).all() and len(batch["masked_index"]) >= 1
    again = P.SequenceCollate(vocab, cfg.mlm, [42, 0, 0, 0], pad_multiple=8)(table)
    assert torch.equal(again["input_ids"], batch["input_ids"])  # masks drawn from (seed, batch number)
    assert set(collate(table.slice(1, 1))) == {"counts"}  # nothing to train on: counts only


def test_a_hugging_face_dataset_is_a_training_source(tmp_path):
    """data.train as a save_to_disk folder: its Arrow files are the run's files, its columns are checked, and the
    held-out sample is its first non-empty texts."""
    import datasets

    texts = ["", None, *[f"text {i}" for i in range(10)]]
    datasets.Dataset.from_dict({"body": texts, "n": list(range(12))}).save_to_disk(str(tmp_path / "ds"))
    d = C.DataConfig(train=str(tmp_path / "ds"), text_columns=["body"])
    source = P.train_source(d)
    files = source.files
    assert files and all(f.startswith(str(tmp_path / "ds")) and f.endswith(".arrow") for f in files)
    sample, report = P.held_out_texts(d, source, 3)
    assert sample == ["text 0", "text 1", "text 2"] and report["source"] == str(tmp_path / "ds")
    with pytest.raises(D.DataError, match=r"ds: missing column\(s\) 'text'; the dataset has: body, n"):
        P.train_source(C.DataConfig(train=str(tmp_path / "ds")))
    with pytest.raises(D.DataError, match="ds: text column 'n' has type int64, expected strings"):
        P.train_source(C.DataConfig(train=str(tmp_path / "ds"), text_columns=["n"]))

"""bertray.finetune without Ray: the batch plan, dynamic padding, and tokenizing a split (in-process or in blocks
that come back in any order)."""
import numpy as np
import pytest

from bertray import modeling
from bertray.finetune import collate, plan_batches


@pytest.mark.parametrize("world", [1, 2, 3])
def test_plan_batches_covers_every_row_and_splits_evenly(world):
    lengths = np.random.default_rng(0).integers(3, 60, size=101)
    batches = plan_batches(lengths, 8, world, seed=5, group_by_length=True)
    assert len(batches) % world == 0
    seen = np.concatenate(batches)
    assert set(seen.tolist()) == set(range(101))
    assert plan_batches(lengths, 8, world, seed=5, group_by_length=True)[0].tolist() == batches[0].tolist()
    assert lengths[batches[0]].max() == lengths.max()  # longest first: OOM shows at once


def test_length_grouping_cuts_padding():
    lengths = np.random.default_rng(1).integers(3, 120, size=2000)

    def padded(bs):
        return sum(len(b) * lengths[b].max() for b in bs)

    grouped = padded(plan_batches(lengths, 32, 1, 0, True))
    plain = padded(plan_batches(lengths, 32, 1, 0, False))
    assert grouped < 0.7 * plain


def test_collate_pads_dynamically():
    ids = [[101, 5, 102], [101, 5, 6, 7, 102]]
    b = collate(ids, np.array([0, 1]), pad_id=0, labels=np.array([1, 0]))
    assert b["input_ids"].shape == (2, 5) and b["attention_mask"].sum() == 8 and b["labels"].tolist() == [1, 0]
    assert collate(ids, np.array([0]), pad_id=0, multiple=8)["input_ids"].shape == (1, 8)


def test_token_ids_are_compact_and_index_like_lists():
    from bertray.finetune import TokenIds

    lists = [[101, 7, 102], [101, 102], [101, 5, 6, 7, 102]]
    ids = TokenIds.from_lists(lists)
    assert ids.values.dtype == np.int32 and ids.values.nbytes == 4 * 10
    assert len(ids) == 3 and [ids[i].tolist() for i in range(3)] == lists and ids.lengths.tolist() == [3, 2, 5]
    b = collate(ids, np.array([2, 1]), pad_id=0, labels=np.array([0, 1, 1]))
    assert b["input_ids"].tolist() == [[101, 5, 6, 7, 102], [101, 102, 0, 0, 0]]
    assert b["attention_mask"].sum(1).tolist() == [5, 2] and b["labels"].tolist() == [1, 1]


def test_a_split_that_fits_one_block_is_tokenized_without_ray(monkeypatch):
    """A small split is encoded in the calling process, pairs included, exactly as the tokenizer does it; Ray is
    not asked for anything (its calls here would fail the test)."""
    import ray
    import ray.data

    from bertray.config import ModelConfig
    from bertray.finetune import tokenize

    def no_ray(*args, **kwargs):
        raise AssertionError("a one-block split went to Ray")

    monkeypatch.setattr(ray, "cluster_resources", no_ray)
    monkeypatch.setattr(ray.data, "from_arrow", no_ray)
    texts = ["a fine film", "dull", "", "the plot never moves and the actors look lost in it"]
    pairs = ["yes", "no at all", "x", "maybe"]
    m = ModelConfig(base="embedded", max_length=8, truncation="head+tail")
    tok = modeling.load_tokenizer(modeling.resolve("embedded"))
    for second in (None, pairs):
        ids, windows = tokenize(texts, m, second)
        assert windows is None
        expected, _ = modeling.encode(tok, texts, 8, "head+tail", second)
        assert ids.values.dtype == np.int32 and [ids[i].tolist() for i in range(len(texts))] == expected


def test_encoded_blocks_sliced_anywhere_and_shuffled_come_back_whole_and_in_order():
    """Ray Data may slice a big output block, even inside one text's windows, and blocks finish in any order: the
    ids and windows per text come back as one encoding in one piece gives them, and a lost slice is an error."""
    import random

    import pyarrow as pa

    from bertray.finetune import _in_order, _token_ids
    from bertray.token_stages import encode_block

    texts = [" ".join(f"word{i}" for i in range(n)) for n in (3, 40, 0, 25, 7, 60)]
    table = pa.table({"row": np.arange(len(texts), dtype=np.int64), "text": texts})
    whole = encode_block(table, "embedded", 16, "head", overlap=4)
    assert whole.num_rows > 2 * len(texts)
    cuts = [0, 1, 3, 4, 9, 10, 11, 17, whole.num_rows]  # inside texts' windows as well as between texts
    slices = [whole.slice(a, b - a) for a, b in zip(cuts, cuts[1:])]
    random.Random(0).shuffle(slices)
    want_ids, want_windows = _token_ids([whole], len(texts), 4)
    ids, windows = _token_ids(_in_order(slices, len(texts)), len(texts), 4)
    assert windows.tolist() == want_windows.tolist() and windows.sum() == whole.num_rows
    assert np.array_equal(ids.values, want_ids.values) and np.array_equal(ids.offsets, want_ids.offsets)
    for lost in range(len(slices)):  # the last text's last windows too
        with pytest.raises(RuntimeError, match="lost or repeated"):
            _in_order(slices[:lost] + slices[lost + 1:], len(texts))
    with pytest.raises(RuntimeError, match="lost or repeated"):
        _in_order(slices + slices[:1], len(texts))

"""Pieces of the training path that need no Ray: batching, truncation, metrics."""
from pathlib import Path

import numpy as np
import pytest

from bertray import metrics as M
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


def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    p[:5] = 0
    m = M.from_confusion(M.confusion(y, p, 3), ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p))
    assert m["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))
    prec, rec, f1, sup = precision_recall_fscore_support(y, p)
    assert [m["per_class"][k]["recall"] for k in "abc"] == pytest.approx(rec.tolist())
    assert m["confusion_matrix"][0][0] == int(((y == 0) & (p == 0)).sum())


def test_trainer_without_a_dashboard_leaves_out_the_placement_group_cleaner():
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from bertray import trainer

    assert trainer.torch_trainer_cls(dashboard=True) is TorchTrainer
    local = trainer.torch_trainer_cls(dashboard=False)
    # If Ray renames the private hook, this fails, instead of the cleaner's warnings silently coming back.
    assert issubclass(local, TorchTrainer) and "_create_default_callbacks" in vars(local)
    kept = object()
    assert trainer.without_pg_cleaner([PlacementGroupCleanerCallback(), kept]) == [kept]


def test_scratch_left_by_killed_processes_is_removed_and_nothing_else(tmp_path, monkeypatch):
    """A SIGKILLed worker leaves its checkpoint scratch copy in /tmp; the next worker on the node deletes it, but
    never a live process's, a young one, or anything not ours."""
    import os
    import subprocess
    import sys
    import tempfile
    import time

    from bertray import train_loop

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    old = time.time() - 2 * train_loop._ORPHAN_MIN_AGE_S

    def make(name, age=old):
        d = tmp_path / name
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "model.safetensors").write_bytes(b"x" * 10)
        os.utime(d, (age, age))
        return d

    orphans = [make(f"bertray-ckpt-{gone.pid}-ab12"), make(f"bertray-restore-{gone.pid}-cd34")]
    kept = [make(f"bertray-ckpt-{os.getpid()}-ef56"),              # live process
            make(f"bertray-ckpt-{gone.pid}-young", time.time()),  # may belong to another pid namespace's writer
            make(f"bertray-export-{gone.pid}-gh78"),              # not a loop scratch directory
            make("bertray-ckpt-notapid-ij90")]
    train_loop._remove_orphaned_scratch()
    assert [d.exists() for d in orphans] == [False, False]
    assert all(d.exists() for d in kept)
    with train_loop._scratch_dir("ckpt") as live:  # what the loop creates carries its pid, so the sweep knows it
        assert train_loop._SCRATCH_NAME.fullmatch(Path(live).name).group(2) == str(os.getpid())


class _Payload:
    """Stands in for what a hostile train_state.pt could unpickle: any importable callable."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_train_state_with_more_than_tensors_is_refused_not_run(tmp_path, capsys):
    import torch

    from bertray import checkpoint
    from bertray.train_loop import Loop

    torch.save({"optimizer": _Payload()}, tmp_path / checkpoint.TRAIN_STATE)
    with pytest.raises(RuntimeError, match="holds more than tensors and plain values"):
        Loop.__new__(Loop)._restore_state(str(tmp_path))
    assert "unpickled" not in capsys.readouterr().out


def test_numpy_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import torch

    from bertray.train_loop import _numpy_rng_state, _set_numpy_rng_state

    np.random.seed(7)
    np.random.normal()  # leaves a cached gaussian in the state
    torch.save({"numpy": _numpy_rng_state()}, tmp_path / "s.pt")
    expected = np.random.random(5)
    _set_numpy_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["numpy"])
    np.testing.assert_array_equal(np.random.random(5), expected)


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

    from bertray.finetune import _encode_block, _in_order, _token_ids

    texts = [" ".join(f"word{i}" for i in range(n)) for n in (3, 40, 0, 25, 7, 60)]
    table = pa.table({"row": np.arange(len(texts), dtype=np.int64), "text": texts})
    whole = _encode_block(table, "embedded", 16, "head", overlap=4)
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

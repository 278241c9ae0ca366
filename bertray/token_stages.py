"""The CPU stages that turn texts into token ids in Ray Data tasks across the cluster: fine-tuning's encoded blocks
(encode_block) and pretraining's packed stream (tokenize_batch, SequenceStream).

A module apart from the stages, which import the training loop: the tasks, and Ray Train's controller (which
unpickles the stream it hands pretraining's workers), load this module, the tokenizer and numpy/pyarrow, not the
training loop and the model classes (BENCHMARKS.md, "Ray Train start-up").
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from bertray import data as D
from bertray import modeling
from bertray.config import PretrainConfig

def encode_block(block, base: str, max_length: int, truncation: str, overlap: int | None = None):
    """Fine-tuning's stage (finetune.tokenize): a block of row, text (and pair) columns -> its token ids, one row per
    sequence: each text's, or (`overlap`) each of its windows, under its row and its window's index in that text,
    of how many."""
    pairs = block.column("pair").to_pylist() if "pair" in block.column_names else None
    ids, _, windows = modeling.tokenize(modeling.cached_tokenizer(base), block.column("text").to_pylist(), max_length,
                                        truncation, overlap, pairs)
    rows = block.column("row").to_numpy()
    counts = np.ones(len(rows), np.int64) if windows is None else windows
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return pa.table({"row": np.repeat(rows, counts), "window": (np.arange(counts.sum()) - starts).astype(np.int32),
                     "of": np.repeat(counts, counts).astype(np.int32), "ids": pa.array(ids, pa.list_(pa.int32()))})


# Counted by the tokenize stage; sequences and tokens are counted where they are trained on.
STAGE_COUNTS = ("texts_read", "null_text", "empty_text", "held_out", "truncated")


def tokenize_batch(table: pa.Table, cfg: PretrainConfig, holdout: frozenset) -> pa.Table:
    """A Ray Data stage: a batch of texts -> token sequences, packed (or truncated) as SequenceStream does, one per
    row. A batch's packing remainder is its last, shorter sequence. The first row carries the batch's counts of
    texts read and dropped (the others 0), so the workers can sum them; a batch that yields no sequence is one
    row with no tokens."""
    stream = SequenceStream(modeling.cached_tokenizer(cfg.model.base), cfg, holdout)
    seqs = stream.sequences(stream.texts(table, cfg.data.train)) + stream.flush()
    rows = max(1, len(seqs))
    cols = {"input_ids": pa.array(seqs or [[]], pa.list_(pa.int32()))}
    for key in STAGE_COUNTS:
        counts = np.zeros(rows, dtype=np.int64)
        counts[0] = stream.counts[key]
        cols[key] = pa.array(counts)
    return pa.table(cols)


class SequenceStream:
    """Texts -> token sequences with [CLS]/[SEP]: packed into full `max_length` sequences (documents separated by
    [SEP], a document may span sequences), or one text per sequence truncated by `model.truncation`. Counts what
    it read and dropped; the packing buffer carries over between calls until `flush`."""

    def __init__(self, tokenizer, cfg: PretrainConfig, holdout: frozenset = frozenset()):
        self.tokenizer, self.cfg, self.holdout = tokenizer, cfg, holdout
        self.cls_id, self.sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.counts: Counter = Counter()
        self._buf: list[int] = []

    def texts(self, table: pa.Table, source: str) -> list[str]:
        kept = []
        for t in D.texts_from(table, self.cfg.data, source):
            reason = "null_text" if t is None else "empty_text" if not t else "held_out" if t in self.holdout else None
            if reason:
                self.counts[reason] += 1
            else:
                kept.append(t)
        self.counts["texts_read"] += table.num_rows
        return kept

    def sequences(self, texts: list[str]) -> list[list[int]]:
        if not texts:  # the tokenizer fails on an empty batch
            return []
        m = self.cfg.model
        if not self.cfg.mlm.packing:
            ids, cut = modeling.encode(self.tokenizer, texts, m.max_length, m.truncation)
            self.counts["truncated"] += cut
            return ids
        body, buf, out = m.max_length - 2, self._buf, []
        for ids in self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]:
            buf += ids
            buf.append(self.sep_id)
            while len(buf) >= body:
                out.append([self.cls_id, *buf[:body], self.sep_id])
                del buf[:body]
        return out

    def flush(self) -> list[list[int]]:
        """The shorter last sequence of a pass (the packing remainder), so no text is lost."""
        buf, self._buf = self._buf, []
        if buf and buf[-1] == self.sep_id:
            buf.pop()
        return [[self.cls_id, *buf, self.sep_id]] if buf else []

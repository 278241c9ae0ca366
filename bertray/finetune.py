"""Fine-tune a BERT-family classifier with Ray Train: `run(cfg)`.

Labeled data is read and checked once on the driver (every dropped row counted by reason), tokenized once across
the cluster's CPUs by Ray Data tasks, and put in the object store as compact token ids (TokenIds: int32 values and
offsets), which the workers of a node map rather than copy. Each worker cuts them into length-grouped batches whose
order depends only on (seed, epoch): that is what makes resume exact to the batch.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from bertray import data as D
from bertray import modeling, runtime, storage, trainer
from bertray.config import FinetuneConfig, ModelConfig
from bertray.modeling import TokenIds
from bertray.metrics import confusion, from_confusion, mode_of, multilabel_report, tune_thresholds
from bertray.token_stages import encode_block
from bertray.train_loop import Objective

log = logging.getLogger(__name__)


def run(cfg: FinetuneConfig) -> dict:
    """Train, export the best checkpoint to `<storage>/<name>/model`, and return the run summary."""
    import ray

    runtime.check_shared_storage(cfg.run.storage, "run.storage")
    check_model(cfg.model)
    train, val = load_splits(cfg)
    cfg = trainer.start_run(cfg, "finetune", trainer.labeled_data(train, val))
    train_ref, val_ref = (ray.put(ingest(part, cfg.model, training)) for part, training in ((train, True), (val, False)))
    objective = ClassificationObjective(cfg, train_ref, val_ref, train.label_names,
                                        report={"train": train.report, "validation": val.report})
    log.info("fine-tuning %s on %d train / %d validation rows, classes %s", cfg.model.base, len(train.texts),
             len(val.texts), train.label_names)
    result = trainer.build_trainer(cfg, objective).fit()
    summary = trainer.export_run(cfg, result, objective)
    m = summary["metrics"]
    log.info("best %s %.4f at step %s (accuracy %.4f, macro-F1 %.4f); model exported to %s",
             objective.metric, m.get(objective.metric, float("nan")), summary["best_step"], m.get("accuracy", float("nan")),
             m.get("macro_f1", float("nan")), summary["model"])
    return summary


def check_model(m) -> None:
    """Before any worker starts: a missing or damaged local base, or an adapter PEFT cannot put on the base, fails
    here in one line, not in every worker (and not again in each of Ray Train's restarts)."""
    if not storage.is_remote(m.base):  # a remote base is read by the workers; this process need not fetch it
        modeling.resolve(m.base)
    modeling.check_adapter(m)


def load_splits(cfg: FinetuneConfig) -> tuple[D.Labeled, D.Labeled]:
    """Train and validation sets: validation from its own file or a seeded stratified split of train."""
    d = cfg.data
    full = D.load_labeled(d.train, d)
    if d.validation:
        train = full
        val = D.load_labeled(d.validation, d, label_names=full.label_names)
    else:
        tr_idx, va_idx = D.stratified_split(full.labels, d.validation_fraction, cfg.train.seed)
        train, val = D.subset(full, tr_idx), D.subset(full, va_idx)
        train.report["split"] = val.report["split"] = f"stratified {d.validation_fraction:.0%} of train, seed {cfg.train.seed}"
    train = D.sample(train, d.max_train_rows, cfg.train.seed)
    val = D.sample(val, d.max_validation_rows, cfg.train.seed)
    for part in ({p.report["source"]: p for p in (full, val)}).values():  # one line per data read, not per split
        dropped = part.report.get("dropped")
        if dropped:
            log.warning("%s: dropped %s of %d rows (%s)", part.report["source"], sum(dropped.values()),
                        part.report["rows_read"], ", ".join(f"{k}: {v}" for k, v in dropped.items()))
    for part in (train, val):
        part.report["rows_in_split"] = len(part.texts)
    if len(val.texts) == 0:
        raise D.DataError(f"{d.validation or d.train}: validation set is empty")
    unseen = D.check_classes(train)
    if unseen:
        log.warning("%s: no training rows for class(es) %s; the model will never predict them (drop them from "
                    "data.labels / labels.json, or add rows)", d.train, ", ".join(map(repr, unseen)))
    return train, val


@dataclass(frozen=True)
class Ingested:
    """A labeled split as the workers take it: token ids made with `tokenized_with` (how `_tokenization` says), or
    the texts, for a sweep whose trials change that. `windows`: how many windows each text was cut into, their ids
    in text order (long_text chunk); None: one sequence per text."""

    labels: np.ndarray
    ids: TokenIds | None = None
    windows: np.ndarray | None = None
    tokenized_with: tuple | None = None
    texts: list[str] | None = None
    pairs: list[str] | None = None
    training: bool = True


def ingest(part: D.Labeled, m: ModelConfig, training: bool, keep_texts: bool = False) -> Ingested:
    """`part` tokenized once (see `tokenize`) as the train split (`training`) or the validation split; with
    `keep_texts`, its texts too. Windowed splits say in their report how many windows they became."""
    overlap = _overlap(m, training)
    ids, windows = tokenize(part.texts, m, part.pairs, overlap)
    if windows is not None:
        report = part.report
        report["windows"], report["texts_over_one_window"] = int(windows.sum()), int((windows > 1).sum())
        log.info("%s split: %d texts cut into %d windows of up to %d tokens (%d texts longer than one window)",
                 "train" if training else "validation", len(windows), report["windows"], m.max_length,
                 report["texts_over_one_window"])
    return Ingested(part.labels, ids, windows, _tokenization(m, training), part.texts if keep_texts else None,
                    part.pairs if keep_texts else None, training)


def _overlap(m: ModelConfig, training: bool) -> int | None:
    """The windows' overlap when a split is cut into windows, else None: validation is scored as the checkpoint
    scores (long_text), and training takes every window only with train_windows all."""
    if m.long_text == "chunk" and (not training or m.train_windows == "all"):
        return modeling.window_overlap(m.chunk_overlap, m.max_length)  # as scoring cuts them
    return None


def _tokenization(m: ModelConfig, training: bool) -> tuple:
    return (m.base, m.max_length, m.truncation, _overlap(m, training))


# Texts per Ray Data block when tokenizing: big enough that a task's start-up is small beside it, small enough that
# a cluster's CPUs all get some.
_TOKENIZE_BLOCK_ROWS = (2048, 65536)


def tokenize(texts: list[str], m: ModelConfig, pairs: list[str] | None = None,
             overlap: int | None = None) -> tuple[TokenIds, np.ndarray | None]:
    """Token ids of `texts` (or of the pairs (texts[i], pairs[i])), in order, computed by Ray Data tasks spread over
    the cluster's CPUs; a split that fits in one block is encoded here. With `overlap`, each text's windows
    (modeling.tokenize), and how many each text has."""
    import pyarrow as pa

    table = pa.table({"row": np.arange(len(texts), dtype=np.int64), "text": pa.array(texts, pa.string()),
                      **({"pair": pa.array(pairs, pa.string())} if pairs is not None else {})})
    if len(texts) > _TOKENIZE_BLOCK_ROWS[0]:
        return tokenize_on_cluster(table, m, overlap)
    # One block runs as one task either way; in a Ray Data pipeline it also waits for the executor and a worker
    # that imports transformers and loads the tokenizer, seconds beside its milliseconds of encoding
    # (BENCHMARKS.md, "Fine-tuning ingest: small splits").
    return _token_ids([encode_block(table, m.base, m.max_length, m.truncation, overlap)], len(texts), overlap)


def tokenize_on_cluster(table, m: ModelConfig, overlap: int | None = None) -> tuple[TokenIds, np.ndarray | None]:
    """`tokenize`'s Ray Data pipeline over a table of row, text (and pair) columns."""
    import ray.data

    n = table.num_rows
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    lo, hi = _TOKENIZE_BLOCK_ROWS
    rows = min(hi, max(lo, math.ceil(n / (2 * cpus))))
    ds = ray.data.from_arrow([table.slice(i, rows) for i in range(0, n, rows)])
    ds = ds.map_batches(encode_block, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"base": m.base, "max_length": m.max_length, "truncation": m.truncation,
                                   "overlap": overlap})
    ds.context.enable_progress_bars = False
    runtime.quiet_ray_data()
    return _token_ids(_in_order(list(ds.iter_batches(batch_size=None, batch_format="pyarrow")), n), n, overlap)


def _in_order(blocks: list, n: int) -> list:
    """Encoded blocks back in (row, window) order, checked to hold every window of each of the `n` texts once.
    Each block is a run of consecutive sequences, finished in any order; Ray Data may slice a big output block,
    even inside one text's windows."""
    blocks = sorted((b for b in blocks if b.num_rows),
                    key=lambda b: (b.column("row")[0].as_py(), b.column("window")[0].as_py()))
    row = np.concatenate([b.column("row").to_numpy() for b in blocks]) if blocks else np.zeros(0, np.int64)
    window, of = (np.concatenate([b.column(c).to_numpy() for b in blocks]) if blocks else np.zeros(0, np.int32)
                  for c in ("window", "of"))
    step = np.diff(row)
    in_order = ((step == 1) & (window[1:] == 0)) | ((step == 0) & (np.diff(window) == 1))
    if (len(row) < n or (n and (row[0] != 0 or window[0] != 0 or row[-1] != n - 1)) or not in_order.all()
            or not np.array_equal(np.bincount(row, minlength=n)[row], of)):
        raise RuntimeError("tokenizing lost or repeated texts or windows")
    return blocks


def _token_ids(blocks: list, n: int, overlap: int | None) -> tuple[TokenIds, np.ndarray | None]:
    """One TokenIds from encoded blocks in row order (values and offsets, no per-text Python lists) and, for
    windows (`overlap`), how many each of the `n` texts has."""
    columns = [b.column("ids").combine_chunks() for b in blocks]
    lengths = np.concatenate([np.diff(c.offsets.to_numpy()) for c in columns])
    values = np.concatenate([c.values.to_numpy() for c in columns]).astype(np.int32)
    ids = TokenIds(values, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    if overlap is None:
        return ids, None
    rows = np.concatenate([b.column("row").to_numpy() for b in blocks])
    return ids, np.bincount(rows, minlength=n).astype(np.int64)


def plan_batches(lengths: np.ndarray, batch_size: int, world: int, seed: int, group_by_length: bool) -> list[np.ndarray]:
    """Every rank's batches for one epoch (rank r takes [r::world]); a pure function of its arguments.

    Length grouping (as HF's LengthGroupedSampler): shuffle, sort within mega-batches of 50 global batches,
    then shuffle the batches, so each batch holds texts of similar length and padding stays small. The longest
    batch goes first so an out-of-memory shows at once, not hours in. The batch count is padded to a multiple
    of `world` by repeating early batches, so every rank takes the same number of steps."""
    n = len(lengths)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)
    if group_by_length:
        mega = batch_size * world * 50
        idx = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in np.array_split(idx, max(1, math.ceil(n / mega)))])
    batches = [idx[i:i + batch_size] for i in range(0, n, batch_size)]
    if group_by_length and len(batches) > 1:
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = int(np.argmax([lengths[b].max() for b in batches]))
        batches[0], batches[longest] = batches[longest], batches[0]
    batches += batches[: (-len(batches)) % world]
    return batches


def collate(ids: TokenIds, rows: np.ndarray, pad_id: int, multiple: int = 1, labels: np.ndarray | None = None,
            sep_id: int | None = None) -> dict:
    """A padded batch of `rows`; with `sep_id` (pairs, for a model that reads segment ids) their token_type_ids;
    multi-label labels (2-D) as floats for the binary cross-entropy."""
    width = max(len(ids[r]) for r in rows)
    width = int(math.ceil(width / multiple) * multiple)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for j, r in enumerate(rows):
        seq = ids[r]
        input_ids[j, : len(seq)] = seq
        mask[j, : len(seq)] = 1
    out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask)}
    if sep_id is not None:
        out["token_type_ids"] = modeling.pair_segments(out["input_ids"], out["attention_mask"], sep_id)
    if labels is not None:
        out["labels"] = torch.as_tensor(labels[rows], dtype=torch.float32 if labels.ndim == 2 else torch.long)
    return out


class ClassificationObjective(Objective):
    kind = "classifier"

    def __init__(self, cfg: FinetuneConfig, train_ref, val_ref, label_names: list[str], report: dict | None = None):
        self.cfg = cfg
        self.train_ref, self.val_ref = train_ref, val_ref
        self.label_names = label_names
        self.report = report or {}
        self.metric = "loss" if cfg.train.metric == "loss" else cfg.train.metric
        self.mode = mode_of(self.metric)

    # Built on each worker, not pickled from the driver.
    def setup(self, rank: int, world: int, device: torch.device) -> None:
        import ray

        self.rank, self.world, self.device = rank, world, device
        m = self.cfg.model
        self._tokenizer = modeling.load_tokenizer(modeling.resolve(m.base))
        train, val = ray.get(self.train_ref), ray.get(self.val_ref)
        self.train_ids, train_windows = self._ids(train)
        self.val_ids, self.val_windows = self._ids(val)
        # A text cut into windows trains on each of them, with its label(s).
        self.train_labels = train.labels if train_windows is None else np.repeat(train.labels, train_windows, axis=0)
        self.val_labels = val.labels
        self.multi_label = self.train_labels.ndim == 2
        self.pairs = self.cfg.data.text_pair_column is not None
        self.lengths = self.train_ids.lengths
        self.pad_id = self._tokenizer.pad_token_id or 0
        # Tensor cores want multiples of 8; on CPU padding further only costs.
        self.pad_multiple = 8 if device.type == "cuda" else 1
        self.thresholds = None  # multi-label: per-label decision thresholds, tuned at each evaluation
        counts = (self.train_labels.sum(axis=0) if self.multi_label
                  else np.bincount(self.train_labels, minlength=len(self.label_names)))
        self.class_weight = self.pos_weight = None
        if self.cfg.train.class_weights == "balanced":
            n = len(self.train_labels)
            if self.multi_label:  # each label's negatives per positive, as BCEWithLogitsLoss's pos_weight means
                w = (n - counts) / np.maximum(counts, 1)
                self.pos_weight = torch.tensor(w, dtype=torch.float32, device=device)
            else:
                w = n / (len(self.label_names) * np.maximum(counts, 1))
                self.class_weight = torch.tensor(w, dtype=torch.float32, device=device)
        # Of the texts, not their windows (label's drift check compares rows). Multi-label: each label's share of
        # rows, not a distribution.
        counts = (train.labels.sum(axis=0) if self.multi_label
                  else np.bincount(train.labels, minlength=len(self.label_names)))
        total = len(train.labels) if self.multi_label else counts.sum()
        self.train_distribution = {n: float(c / total) for n, c in zip(self.label_names, counts)}

    def _ids(self, part: Ingested) -> tuple[TokenIds, np.ndarray | None]:
        """The split's token ids and windows per text: as ingested, or (a sweep trial that changes how texts are
        tokenized) its own."""
        m = self.cfg.model
        if part.ids is not None and part.tokenized_with == _tokenization(m, part.training):
            return part.ids, part.windows
        overlap = _overlap(m, part.training)
        ids, _, windows = modeling.tokenize(self._tokenizer, part.texts, m.max_length, m.truncation, overlap,
                                            part.pairs)
        if windows is None and overlap is not None:
            windows = np.ones(len(ids), np.int64)  # pairs: never windowed, one sequence each
        return TokenIds.from_lists(ids), windows

    @property
    def tokenizer(self):
        return self._tokenizer

    def build_model(self):
        model = modeling.build_classifier(self.cfg.model, self.label_names, self.multi_label)
        # Pairs need the segment ids only where the model reads them (BERT, not RoBERTa).
        segments = self.pairs and modeling.uses_segments(model.config.to_dict())
        self.sep_id = self._tokenizer.sep_token_id if segments else None
        return model

    def _batches(self, epoch: int) -> list[np.ndarray]:
        t = self.cfg.train
        return plan_batches(self.lengths, t.batch_size, self.world, t.seed + epoch, t.group_by_length)[self.rank::self.world]

    def steps_per_epoch(self) -> int:
        return len(self._batches(0))

    def train_batches(self, epoch: int, skip: int):
        for rows in self._batches(epoch)[skip:]:
            yield collate(self.train_ids, rows, self.pad_id, self.pad_multiple, self.train_labels, self.sep_id)

    def _logits(self, model, batch) -> torch.Tensor:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        return model(**inputs).logits.float()

    def _loss(self, logits, labels, reduction: str = "mean", weighted: bool = True) -> torch.Tensor:
        if self.multi_label:
            return torch.nn.functional.binary_cross_entropy_with_logits(
                logits, labels, pos_weight=self.pos_weight if weighted else None, reduction=reduction)
        return torch.nn.functional.cross_entropy(logits, labels, weight=self.class_weight if weighted else None,
                                                 reduction=reduction)

    def loss(self, model, batch):
        return self._loss(self._logits(model, batch), batch["labels"])

    @torch.inference_mode()
    def evaluate(self, model, device) -> dict:
        import torch.distributed as dist

        model.eval()
        n_cls = len(self.label_names)
        rows = np.arange(len(self.val_labels))[self.rank::self.world]  # this rank's share of the texts
        logits = torch.from_numpy(self._val_logits(model, device, rows))
        labels = torch.as_tensor(self.val_labels[rows], dtype=torch.float32 if self.multi_label else torch.long)
        # Unweighted: a validation loss comparable across class_weights settings.
        loss_sum = float(self._loss(logits, labels, reduction="sum", weighted=False)) if len(rows) else 0.0
        if self.multi_label:
            return self._multilabel_metrics(rows, [torch.sigmoid(logits).numpy()], loss_sum)
        cm = confusion(labels.numpy(), logits.argmax(-1).numpy(), n_cls)
        if self.world > 1 and dist.is_initialized():
            # Every rank scored a disjoint share; summing confusion matrices gives the exact global metrics.
            t = torch.tensor(np.append(cm.ravel(), loss_sum), dtype=torch.float64)
            dist.all_reduce(t)
            cm = t[:-1].numpy().astype(np.int64).reshape(n_cls, n_cls)
            loss_sum = float(t[-1])
        out = from_confusion(cm, self.label_names)
        out["loss"] = loss_sum / max(1, int(cm.sum()))
        return out

    def _val_logits(self, model, device, rows: np.ndarray) -> np.ndarray:
        """Logits of validation texts `rows`, in that order: their sequences scored in length-sorted batches and,
        where texts were cut into windows, each text's windows pooled as the checkpoint will pool them."""
        if len(rows) == 0:  # more ranks than validation texts
            return np.zeros((0, len(self.label_names)), np.float32)
        if self.val_windows is None:
            seqs = rows
        else:
            starts = np.concatenate([[0], np.cumsum(self.val_windows)])
            seqs = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in rows])
        out = np.zeros((len(seqs), len(self.label_names)), np.float32)
        order = np.argsort(self.val_ids.lengths[seqs], kind="stable")
        bs = max(32, self.cfg.train.batch_size * 2)
        for i in range(0, len(order), bs):
            batch = collate(self.val_ids, seqs[order[i:i + bs]], self.pad_id, self.pad_multiple, sep_id=self.sep_id)
            out[order[i:i + bs]] = self._logits(model, {k: v.to(device) for k, v in batch.items()}).cpu().numpy()
        if self.val_windows is None:
            return out
        return modeling.pool_windows(out, self.val_windows[rows], self.cfg.model.chunk_pool)

    def _multilabel_metrics(self, rows: np.ndarray, probs: list, loss_sum: float) -> dict:
        """Thresholds are tuned on the whole validation set, so every rank gathers every rank's probabilities (a
        validation set's worth of floats per label) and all compute the same thresholds and metrics."""
        import torch.distributed as dist

        n_cls = len(self.label_names)
        probs = np.concatenate(probs) if probs else np.zeros((0, n_cls), np.float32)
        shares = [(rows, probs, loss_sum)]
        if self.world > 1 and dist.is_initialized():
            shares = [None] * self.world
            dist.all_gather_object(shares, (rows, probs, loss_sum))
        rows = np.concatenate([r for r, _, _ in shares])
        probs = np.concatenate([p for _, p, _ in shares])
        labels = self.val_labels[rows]
        self.thresholds = tune_thresholds(labels, probs)
        out = multilabel_report(labels, probs, self.thresholds, self.label_names)
        out["loss"] = sum(l for _, _, l in shares) / max(1, labels.size)
        return out

    def checkpoint_meta(self) -> dict:
        return {
            "kind": self.kind,
            "base_model": self.cfg.model.base,
            "label_names": self.label_names,
            "train_label_distribution": self.train_distribution,
            "data_report": self.report,
            "task": "multi_label" if self.multi_label else "single_label",
            "text_pair": self.pairs,
            # The decision thresholds of the checkpoint's own evaluation: label, evaluate and serve apply them.
            **({"thresholds": dict(zip(self.label_names, map(float, self.thresholds)))}
               if self.multi_label and self.thresholds is not None else {}),
        }

"""Further (domain-adaptive) masked-LM pretraining with Ray Train: `run(cfg)`.

Keep training the base encoder's masked-LM objective on unlabeled in-domain text, then fine-tune from the
result (`bertray finetune --set model.base=<storage>/<name>/model`): the encoder carries over, the
classification head is new.

Data. Unlabeled text is read from Parquet (local or s3://, any number of files, larger than memory), or from a
Hugging Face dataset (one table: it must fit in the driver's memory unless mapped from a local folder), by a Ray
Data pipeline and streamed to the DDP workers. Its CPU tasks, spread over the cluster's free CPUs, clean the texts,
tokenize them and either pack them (documents joined with [SEP] and cut into full `max_length` sequences, so short
sentences waste no compute on padding) or truncate each to `max_length`. Each worker takes its shard with
`iter_torch_batches`, whose threads pad the sequences and mask 15% of the non-special tokens (80% [MASK], 10% a
random token, 10% kept; optionally whole words) `mlm.prefetch` micro-batches ahead: the training process only
trains. A stream has no fixed length, so the schedule is in optimizer steps (`train.max_steps`) and a new pass over
the data starts whenever one ends.

Evaluation. A fixed sample of `mlm.eval_rows` texts (from `data.validation`, else the first rows of the last
training file, which training then skips) is tokenized and masked once on the driver with a constant seed, so
every evaluation scores the same positions. The workers also score it before the first update
(`initial_metrics`: the step-0 row of a pretraining study).

Resume. A killed worker or a re-run of the same command continues from the last checkpoint.
Exact: the optimizer step, the weights, the optimizer and LR-scheduler state, and the number of micro-batches
already consumed in the current pass over the data (they are skipped). Approximate: which texts those were.
Ray Data hands blocks to workers in the order they finish reading and starts every pass from the first file,
so after a restart each worker skips as many micro-batches as were consumed, not necessarily the same texts,
and their masks are drawn afresh.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from bertray import checkpoint as ckpt_io
from bertray import data as D
from bertray import hf_data, modeling, runtime, storage, trainer
from bertray.config import ConfigError, DataConfig, MLMConfig, PretrainConfig
from bertray.token_stages import STAGE_COUNTS, SequenceStream, tokenize_batch
from bertray.train_loop import Objective

log = logging.getLogger(__name__)

EVAL_SEED = 0  # masks of the held-out sample: a constant, so runs with different train.seed score the same positions
_ROWS_PER_READ = 1024  # texts per Ray Data batch, i.e. per tokenizer call
_SHUFFLE_ROWS = 4096  # local shuffle buffer: mixes neighbouring texts of sorted files at little memory cost
_COUNTS = ("texts_read", "null_text", "empty_text", "held_out", "truncated", "sequences", "tokens")


def run(cfg: PretrainConfig) -> dict:
    """Pretrain, export the best checkpoint to `<storage>/<name>/model`, and return the run summary
    (with `initial_metrics`: the held-out loss and perplexity before training)."""
    import ray

    runtime.check_shared_storage(cfg.run.storage, "run.storage")
    source = train_source(cfg.data)
    _check_spare_cpu(cfg)
    path = modeling.resolve(cfg.model.base)
    tokenizer = modeling.load_tokenizer(path)
    vocab = Vocab(tokenizer)
    _check_model(cfg, path, vocab)

    eval_texts, eval_report = held_out_texts(cfg.data, source, cfg.mlm.eval_rows)
    eval_batches = eval_batches_for(eval_texts, tokenizer, vocab, cfg)
    eval_report["sequences"] = sum(len(b["input_ids"]) for b in eval_batches)
    eval_report["masked_tokens"] = int(sum((b["labels"] != -100).sum() for b in eval_batches))
    holdout = frozenset() if cfg.data.validation else frozenset(eval_texts)
    if holdout:
        log.info("holding out the first %d texts of %s for evaluation (training skips them; set data.validation "
                 "to evaluate on other text)", len(eval_texts), eval_report["source"])
    log.info("held-out sample: %d sequences, %d masked tokens", eval_report["sequences"], eval_report["masked_tokens"])

    report = {"train": {"source": cfg.data.train, "files": len(source.files),
                        "text_columns": list(cfg.data.text_columns)},
              "eval": eval_report}
    data = {"train": trainer.files_part(cfg.data.train, source.files)}
    if cfg.data.validation:
        data["validation"] = trainer.files_part(cfg.data.validation, D.data_files(cfg.data.validation))
    cfg = trainer.start_run(cfg, "pretrain", data)
    objective = MaskedLMObjective(cfg, ray.put(eval_batches), report)
    stream = read_stream(source, cfg, holdout)
    del source  # a dataset's table is in the object store now: the driver need not hold a copy while it trains
    result = trainer.build_trainer(cfg, objective, datasets={"train": stream}).fit()
    summary = trainer.export_run(cfg, result, objective)
    initial = summary["initial_metrics"] = ckpt_io.read_meta(summary["model"])["initial_metrics"]
    # export_run wrote metrics.json without the step-0 evaluation, which only this stage has.
    storage.write_text(storage.join(summary["run_dir"], "metrics.json"), json.dumps(summary, indent=2, default=str))
    stream = (summary.get("data_report") or {}).get("train", {}).get("stream", {})
    if stream.get("held_out"):
        log.info("training skipped %d of %d texts read as copies of held-out evaluation texts", stream["held_out"],
                 stream["texts_read"])
    m = summary["metrics"]
    log.info("held-out perplexity %.2f at step 0 -> %.2f at step %s (best); model exported to %s",
             initial["perplexity"], m.get("perplexity", float("nan")), summary["best_step"], summary["model"])
    return summary


# --------------------------------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class Source:
    """`data.train` as a run reads it: its files (what the run's fingerprint lists) and, for a Hugging Face dataset,
    its text columns as one table, read once for the checks, the held-out sample and the stream."""

    files: list[str]
    table: pa.Table | None = None


def train_source(d: DataConfig) -> Source:
    """`data.train`: Parquet files, with the text columns checked in the first and last file (checking every footer
    of a large remote dataset would cost a round trip per file); or a Hugging Face dataset, its columns checked."""
    if hf_data.is_hf(d.train):
        table = hf_data.read_table(d.train, list(d.text_columns))
        _check_text_types(d.train, table.schema, d.text_columns)
        return Source(hf_data.data_files(d.train), table)
    files = D.data_files(d.train)
    other = [f for f in files if not f.lower().endswith((".parquet", ".pq"))]
    if other:
        raise D.DataError(f"{d.train}: pretraining streams Parquet files or a Hugging Face dataset; these are not: "
                          f"{', '.join(other[:5])}" + (f" and {len(other) - 5} more" if len(other) > 5 else ""))
    for f in dict.fromkeys([files[0], files[-1]]):
        check_text_columns(f, d.text_columns)
    return Source(files)


def check_text_columns(path: str, columns: list[str]) -> None:
    fs, p = storage.filesystem(path)
    try:
        schema = pq.read_schema(p, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as exc:
        raise D.DataError(f"{path}: cannot read as parquet: {exc}") from None
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise D.DataError(f"{path}: missing text column(s) {', '.join(map(repr, missing))}; the file has: "
                          f"{', '.join(schema.names)} (set data.text_columns)")
    _check_text_types(path, schema, columns)


def _check_text_types(path: str, schema: pa.Schema, columns: list[str]) -> None:
    for c in columns:
        t = schema.field(c).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise D.DataError(f"{path}: text column {c!r} has type {t}, expected strings")


def read_stream(source: Source, cfg: PretrainConfig, holdout: frozenset = frozenset()):
    """The training stream as a Ray Data pipeline: Parquet reads (or a dataset's table), then tokenizing and packing
    in CPU tasks across the cluster, as token sequences. The training workers only pad and mask them
    (SequenceCollate)."""
    import ray

    d = cfg.data
    if source.table is not None:
        # Handed to Ray Data in slices, so the tokenize tasks still spread over the cluster.
        t, step = source.table, _ROWS_PER_READ
        ds = ray.data.from_arrow([t.slice(i, step) for i in range(0, t.num_rows, step)] or [t])
    else:
        fs, _ = storage.filesystem(source.files[0])
        paths = [storage.filesystem(f)[1] for f in source.files]
        ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(list(d.text_columns))
    if d.max_train_rows:
        ds = ds.limit(d.max_train_rows)  # the first rows of the stream, not a sample: a stream cannot be sampled cheaply
    ds = ds.map_batches(tokenize_batch, batch_size=_ROWS_PER_READ, batch_format="pyarrow",
                        fn_kwargs={"cfg": cfg, "holdout": holdout})
    # Every pass over the stream is a new Ray Data execution; its progress bars would drown the training lines.
    ds.context.enable_progress_bars = False
    runtime.quiet_ray_data()
    return ds


def held_out_texts(d: DataConfig, train: Source, n: int) -> tuple[list[str], dict]:
    """The evaluation sample: the first `n` non-empty texts of `data.validation`, else of the last training file (of
    a Hugging Face dataset, its first rows)."""
    if d.validation:
        texts, report = D.load_texts(d.validation, d)
        texts = texts[:n]
        report["rows_used"] = len(texts)
    else:
        source = d.train if train.table is not None else train.files[-1]
        size = max(n, 256)
        if train.table is not None:
            batches = train.table.to_batches(max_chunksize=size)
        else:  # only as many row batches as the sample needs: the file may be large
            fs, p = storage.filesystem(source)
            batches = pq.ParquetFile(fs.open_input_file(p)).iter_batches(batch_size=size, columns=d.text_columns)
        texts, read = [], 0
        for batch in batches:
            read += batch.num_rows
            texts += [t for t in D.texts_from(pa.Table.from_batches([batch]), d, source) if t]
            if len(texts) >= n:
                break
        texts = texts[:n]
        report = {"source": source, "rows_read": read, "rows_used": len(texts), "held_out_from_training": True}
    if not texts:
        raise D.DataError(f"{report['source']}: no non-empty text for the held-out evaluation sample")
    return texts, report


def eval_batches_for(texts: list[str], tokenizer, vocab: "Vocab", cfg: PretrainConfig) -> list[dict]:
    """The held-out sample as masked batches, built the same way as training batches but with a fixed seed."""
    stream = SequenceStream(tokenizer, cfg)
    seqs = stream.sequences(texts) + stream.flush()
    rng = np.random.default_rng(EVAL_SEED)
    bs = max(32, cfg.train.batch_size * 2)
    return [make_batch(seqs[i:i + bs], vocab, cfg.mlm, rng) for i in range(0, len(seqs), bs)]


def _check_spare_cpu(cfg: PretrainConfig) -> None:
    """Ray Data reads the stream in tasks that need a CPU the training workers do not hold; without one the run
    would wait forever."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    taken = cfg.run.num_workers * cfg.run.cpus_per_worker
    if total - taken < 1:
        raise ConfigError([f"run.num_workers x run.cpus_per_worker = {taken:g} of the cluster's {total:g} CPUs leaves "
                           "none for Ray Data to read the text stream; lower run.cpus_per_worker (torch threads per "
                           "worker can be set with BERTRAY_TORCH_THREADS) or add CPUs"], "pretrain")


def _check_model(cfg: PretrainConfig, path: str, vocab: "Vocab") -> None:
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    if limit and cfg.model.max_length > limit:
        raise modeling.ModelError(f"model.max_length={cfg.model.max_length} exceeds what {cfg.model.base} supports "
                                  f"(max_position_embeddings={limit})")
    if cfg.mlm.whole_word and not vocab.is_continuation.any():
        raise modeling.ModelError(f"mlm.whole_word: the tokenizer of {cfg.model.base} has no '##' word pieces, so word "
                                  "boundaries are unknown; set mlm.whole_word=false")


# --------------------------------------------------------------------------------------------------- tokens and masks


class Vocab:
    """What packing and masking need from the tokenizer, as arrays."""

    def __init__(self, tokenizer):
        for name in ("mask", "cls", "sep"):
            if getattr(tokenizer, f"{name}_token_id") is None:
                raise modeling.ModelError(f"tokenizer {tokenizer.name_or_path!r} has no {name} token; masked-LM needs one")
        self.mask_id, self.cls_id, self.sep_id = tokenizer.mask_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id
        self.pad_id = tokenizer.pad_token_id or 0
        self.special_ids = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        size = len(tokenizer)
        self.is_continuation = np.array([t.startswith("##") for t in tokenizer.convert_ids_to_tokens(list(range(size)))])
        self.random_ids = np.setdiff1d(np.arange(size), self.special_ids)  # replacements are never special tokens


def mask_tokens(ids: np.ndarray, special: np.ndarray, rng: np.random.Generator, mlm: MLMConfig,
                vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking: select `mlm.probability` of the non-special tokens (whole words if `mlm.whole_word`); of those
    80% become [MASK], 10% a random token, 10% stay. Returns (inputs, labels) with labels -100 where unselected."""
    b, n = ids.shape
    if mlm.whole_word:
        cont = vocab.is_continuation[ids] & ~special
        # A '##' piece right after a special token lost its word to packing; it starts a word of its own.
        after_special = np.concatenate([np.ones((b, 1), bool), special[:, :-1]], axis=1)
        starts = (~special & ~cont) | (cont & after_special)
        word = np.cumsum(starts, axis=1)  # pieces share their word's number
        selected = np.take_along_axis(rng.random((b, n + 1)) < mlm.probability, word, axis=1) & ~special
    else:
        selected = (rng.random((b, n)) < mlm.probability) & ~special
    if not selected.any() and (~special).any():
        # A short batch can draw no position at all; one keeps the loss defined.
        rows, cols = np.nonzero(~special)
        k = rng.integers(len(rows))
        selected[rows[k], cols[k]] = True
    u = rng.random((b, n))
    inputs = ids.copy()
    inputs[selected & (u < 0.8)] = vocab.mask_id
    replace = selected & (u >= 0.8) & (u < 0.9)
    inputs[replace] = rng.choice(vocab.random_ids, size=int(replace.sum()))
    return inputs, np.where(selected, ids, -100)


def make_batch(seqs: list[list[int]], vocab: Vocab, mlm: MLMConfig, rng: np.random.Generator,
               pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    width = int(math.ceil(max(len(s) for s in seqs) / pad_multiple) * pad_multiple)
    ids = np.full((len(seqs), width), vocab.pad_id, dtype=np.int64)
    attn = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        attn[i, : len(s)] = 1
    special = np.isin(ids, vocab.special_ids) | (attn == 0)
    inputs, labels = mask_tokens(ids, special, rng, mlm, vocab)
    # The masked positions as flat indices, found here on the host: selecting them on the GPU with a boolean mask
    # has a data-dependent size, so it would wait for the GPU every step (see masked_logits).
    where = np.flatnonzero(labels != -100)
    return {"input_ids": torch.from_numpy(inputs), "attention_mask": torch.from_numpy(attn),
            "labels": torch.from_numpy(labels), "masked_index": torch.from_numpy(where),
            "masked_labels": torch.from_numpy(labels.reshape(-1)[where])}


class SequenceCollate:
    """Pads and masks a batch of the stream's token sequences into a training micro-batch, in Ray Data's iterator
    threads (`iter_torch_batches(collate_fn=...)`), so the next batches are ready while a step runs. Also returns
    the counts the tokenize stage attached, under "counts"."""

    def __init__(self, vocab: "Vocab", mlm: MLMConfig, seed: list[int], pad_multiple: int):
        self.vocab, self.mlm, self.seed, self.pad_multiple = vocab, mlm, seed, pad_multiple
        self._calls = itertools.count()  # thread-safe in CPython: each batch draws its masks from its own seed

    def __call__(self, table: pa.Table) -> dict[str, torch.Tensor]:
        seqs = [s for s in table.column("input_ids").to_pylist() if s]
        counts = torch.tensor([int(pc.sum(table.column(k)).as_py() or 0) for k in STAGE_COUNTS])
        if not seqs:
            return {"counts": counts}
        rng = np.random.default_rng([*self.seed, next(self._calls)])
        return {**make_batch(seqs, self.vocab, self.mlm, rng, self.pad_multiple), "counts": counts}


def _arrow_collate(fn):
    """`fn` (pyarrow.Table -> tensors) as the ArrowBatchCollateFn that iter_torch_batches requires; built here, so
    that importing this module does not import Ray Data."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Collate(ArrowBatchCollateFn):
        def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
            return fn(batch)

    return _Collate()


# --------------------------------------------------------------------------------------------------- model side


class GatherMasked:
    """Forward pre-hook on the vocabulary projection that keeps only the masked positions. That projection is the
    costliest matmul of a small BERT (MiniLM: 11.7M multiply-adds per token, more than its six layers together),
    and masked-LM needs its output at ~15% of the positions. Inactive (full logits) unless `select` is set."""

    def __init__(self):
        self.select: torch.Tensor | None = None  # flat indices into (batch x positions)

    def __call__(self, module, args):
        if self.select is None:
            return None
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.select),)


def attach_gather(model) -> GatherMasked | None:
    head = model.get_output_embeddings()
    if head is None:
        return None
    gather = GatherMasked()
    head.register_forward_pre_hook(gather)
    return gather


def masked_logits(model, batch: dict, gather: GatherMasked | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) at the masked positions only, picked by the batch's host-computed `masked_index`."""
    index = batch["masked_index"]
    if gather is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return logits.reshape(-1, logits.shape[-1]).index_select(0, index), batch["masked_labels"]
    gather.select = index
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        gather.select = None
    return logits, batch["masked_labels"]


@torch.inference_mode()
def masked_lm_sums(model, batches: list[dict], device: torch.device, gather) -> tuple[float, int]:
    """(sum of cross-entropy, number of masked tokens) over `batches`."""
    loss_sum, n = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits, labels = masked_logits(model, batch, gather)
        loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        n += int(labels.numel())
    return loss_sum, n


def eval_metrics(loss_sum: float, n: int) -> dict:
    loss = loss_sum / max(1, n)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "masked_tokens": n}


def keep_pooler(model, base: str) -> None:
    """Carry the base's pooler through pretraining, frozen. Masked-LM models drop it, and the sequence classifier
    that fine-tuning builds on the export would then start from a random pooler instead of the base's: a confound
    when comparing fine-tuning from the base with fine-tuning from the pretrained export."""
    from transformers import AutoModel

    enc = modeling.encoder_of(model)
    if getattr(enc, "pooler", "no such module") is not None:
        return  # it kept one, or the architecture has none
    src, info = AutoModel.from_pretrained(modeling.resolve(base), output_loading_info=True)
    if getattr(src, "pooler", None) is None or any("pooler" in k for k in info.get("missing_keys", [])):
        return  # the base has no trained pooler to keep
    enc.pooler = src.pooler.requires_grad_(False)


def _say(msg: str) -> None:
    # As the loop does: straight to stdout, which Ray forwards once (Ray Train's patched print() echoes twice).
    sys.stdout.write(f"[bertray] {msg}\n")
    sys.stdout.flush()


def _checkpoint_meta(ckpt) -> dict:
    """bertray.json of a Ray checkpoint, read without downloading the weights."""
    if ckpt is None:
        return {}
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/{ckpt_io.META_FILE}") as f:
        return json.loads(f.read())


# --------------------------------------------------------------------------------------------------- objective


class MaskedLMObjective(Objective):
    kind = "mlm"
    metric = "loss"
    mode = "min"

    def __init__(self, cfg: PretrainConfig, eval_ref, report: dict):
        self.cfg, self.eval_ref, self.report = cfg, eval_ref, report
        self.head_initialised = False
        self.initial: dict = {}

    # Built on each worker, not pickled from the driver.
    def setup(self, rank: int, world: int, device: torch.device) -> None:
        import ray
        import ray.train

        self.rank, self.world, self.device = rank, world, device
        self._tokenizer = modeling.load_tokenizer(modeling.resolve(self.cfg.model.base))
        self.vocab = Vocab(self._tokenizer)
        self.eval_batches = ray.get(self.eval_ref)
        self.counts: Counter = Counter()  # what this worker's share of the stream held, since the (re)start
        self.shard = ray.train.get_dataset_shard("train")  # a barrier: every rank calls it here
        # Stream counts and the step-0 evaluation from before a restart live in the checkpoint.
        self.previous = previous = _checkpoint_meta(ray.train.get_checkpoint())
        self.counts_before = Counter(previous.get("data_report", {}).get("train", {}).get("stream", {}))
        self.stream_report = dict(self.counts_before)
        self.pad_multiple = 8 if device.type == "cuda" else 1  # tensor cores want multiples of 8
        self.gather = None
        self._host_group = None

    @property
    def tokenizer(self):
        return self._tokenizer

    def build_model(self):
        model, self.head_initialised = modeling.build_masked_lm(self.cfg.model)
        if self.head_initialised and self.rank == 0:
            _say(f"base {self.cfg.model.base} has no masked-LM head: initialised one (decoder tied to the word "
                 "embeddings, transform new)")
        keep_pooler(model, self.cfg.model.base)
        self.gather = attach_gather(model)
        self.initial = self.previous.get("initial_metrics") or self._score_untrained(model)
        return model

    def _score_untrained(self, model) -> dict:
        """Held-out metrics of exactly the model training starts from, on the workers' devices (the driver may
        have no accelerator), before the loop wraps it in DDP: every rank is here, so the all-reduce is safe."""
        import torch.distributed as dist

        model.to(self.device)
        if self.head_initialised and self.world > 1 and dist.is_initialized():
            # Each rank drew its own random head (seeded by rank); DDP will start every rank from rank 0's.
            with torch.no_grad():
                for p in model.parameters():
                    dist.broadcast(p.data, src=0)
        metrics = self.evaluate(model, self.device)
        if self.rank == 0:
            _say(f"held-out masked-LM loss before training {metrics['loss']:.4f} (perplexity {metrics['perplexity']:.2f})")
        return metrics

    def steps_per_epoch(self) -> None:
        return None  # a stream: the loop schedules by train.max_steps

    def train_batches(self, epoch: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over this rank's shard as masked micro-batches, after skipping `skip` of them (resume).
        Every rank ends the pass when the first one runs out, so DDP steps stay in lockstep."""
        if skip and self.rank == 0:
            _say(f"skipping the {skip} micro-batches of pass {epoch} trained on before the restart (the same count; "
                 "under streaming not necessarily the same texts)")
        depth = self.cfg.mlm.prefetch
        if depth is None:
            depth = 4 if self.device.type == "cuda" else 1
        seed = self.cfg.train.seed
        collate = SequenceCollate(self.vocab, self.cfg.mlm, [seed, self.rank, epoch, skip], self.pad_multiple)
        batches = iter(self.shard.iter_torch_batches(
            batch_size=self.cfg.train.batch_size, collate_fn=_arrow_collate(collate), device="cpu",
            prefetch_batches=max(1, depth), pin_memory=self.device.type == "cuda",
            local_shuffle_buffer_size=_SHUFFLE_ROWS, local_shuffle_seed=(seed * 1_000_003 + epoch) * 64 + self.rank))
        produced = 0
        try:
            while True:
                batch = next(batches, None)
                if batch is not None:
                    self.counts.update(dict(zip(STAGE_COUNTS, batch.pop("counts").tolist())))
                    if "input_ids" not in batch:
                        continue  # every text of that stretch was empty or held out
                if not self._all_ranks_have(batch is not None):
                    break
                produced += 1
                if produced <= skip:
                    continue
                real = batch["attention_mask"]
                self.counts["sequences"] += int(real.shape[0])
                self.counts["tokens"] += int(real.sum())
                yield batch
        finally:
            close = getattr(batches, "close", None)
            if close:
                close()  # tells Ray Data this split is done with the pass, also when stopped early
        if produced == 0:
            raise D.DataError(f"{self.cfg.data.train}: no training text reached worker {self.rank} "
                              f"({dict(self.counts) or 'no rows'}); too few rows for {self.world} workers, "
                              "or every text was empty or held out for evaluation")

    def _all_ranks_have(self, have: bool) -> bool:
        if self.world == 1:
            return have
        import torch.distributed as dist

        if self._host_group is None:
            # A CPU (gloo) group for this per-step agreement: on NCCL the flag would be a GPU tensor, and reading
            # it back would wait for all the GPU work queued before it, every step. Every rank arrives here first
            # at the same point (the first batch of the run), as creating a group requires.
            self._host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        t = torch.tensor([int(have)])
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._host_group)
        return bool(t.item())

    def loss(self, model, batch):
        logits, labels = masked_logits(model, batch, self.gather)
        return torch.nn.functional.cross_entropy(logits.float(), labels)

    def evaluate(self, model, device) -> dict:
        import torch.distributed as dist

        # The plain module, not the DDP wrapper: ranks score different numbers of batches, and DDP's forward may
        # broadcast buffers, a collective that would then wait for a rank that has no batch left.
        net = getattr(model, "module", model)
        net.eval()
        loss_sum, n = masked_lm_sums(net, self.eval_batches[self.rank::self.world], device, self.gather)
        counts = [self.counts[k] for k in _COUNTS]
        if self.world > 1 and dist.is_initialized():
            t = torch.tensor([loss_sum, n, *counts], dtype=torch.float64, device=device)
            dist.all_reduce(t)
            loss_sum, n, *counts = t.tolist()
        self.stream_report = {k: int(self.counts_before[k] + c) for k, c in zip(_COUNTS, counts)}
        return eval_metrics(loss_sum, int(n))

    def checkpoint_meta(self) -> dict:
        return {
            "kind": self.kind,
            "base_model": self.cfg.model.base,
            "head_initialised": self.head_initialised,
            "initial_metrics": self.initial,
            "mlm": asdict(self.cfg.mlm),
            "data_report": {**self.report, "train": {**self.report["train"], "stream": self.stream_report}},
        }

"""Reading labeled and unlabeled text: Parquet, CSV or JSON Lines; files, folders or globs; local or s3://.

Nothing is dropped silently: every row that is not used is counted under a reason, and the counts go into the
run's report and checkpoint.
"""
from __future__ import annotations

import dataclasses
import html
import json
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from bertray import storage
from bertray.config import DataConfig

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "json", ".ndjson": "json", ".json": "json"}


class DataError(ValueError):
    """Bad input data; the message names the file, column or row."""


def data_files(uri: str) -> list[str]:
    from bertray import hf_data  # imported here: it imports this module

    if hf_data.is_hf(uri):
        return hf_data.data_files(uri)
    files = [f for f in storage.list_files(uri) if _format(f)]
    if not files:
        raise DataError(f"{uri}: no data files found (looked for {', '.join(sorted(set(FORMATS)))})")
    return files


def _format(path: str) -> str | None:
    for suffix, fmt in FORMATS.items():
        if path.lower().endswith(suffix):
            return fmt
    return None


def read_file(path: str, columns: list[str] | None = None) -> pa.Table:
    """One file as a table with only `columns`; errors name the file and, for a missing column, the columns it has."""
    fs, p = storage.filesystem(path)
    fmt = _format(path)
    try:
        if fmt == "parquet":
            pf = pq.ParquetFile(fs.open_input_file(p))
            schema_names = pf.schema_arrow.names
            _require_columns(path, schema_names, columns)
            table = pf.read(columns=columns)
        else:
            with fs.open_input_stream(p) as f:
                table = pacsv.read_csv(f) if fmt == "csv" else pajson.read_json(f)
            _require_columns(path, table.column_names, columns)
            table = table.select(columns) if columns else table
    except DataError:
        raise
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read as {fmt}: {exc}") from None
    return table


def _require_columns(path: str, have: list[str], want: list[str] | None) -> None:
    missing = [c for c in want or [] if c not in have]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(map(repr, missing))}; the file has: {', '.join(have)}")


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    from bertray import hf_data

    if hf_data.is_hf(uri):  # a Hugging Face dataset (hub id or save_to_disk folder), read into one table
        return hf_data.read_table(uri, columns)
    tables = [read_file(f, columns) for f in data_files(uri)]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise DataError(f"{uri}: files disagree on column types: {exc}") from None


class _Invalid:
    """The value of a text whose bytes are not UTF-8: falsy, like a null, but told apart from one by identity."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "INVALID_TEXT"

    def __reduce__(self) -> str:  # unpickles as the one module-level instance, so `is` still works in workers
        return "INVALID_TEXT"


INVALID_TEXT = _Invalid()


def strings(col: pa.Array | pa.ChunkedArray) -> list:
    """A string column's values as Python strings; None for nulls, INVALID_TEXT for a value that is not UTF-8.

    Arrow does not check UTF-8 when it reads Parquet, and one such value makes `to_pylist` fail for the whole
    column: the good rows must not be lost with it."""
    try:
        return col.to_pylist()
    except UnicodeDecodeError:
        out = []
        for raw in col.cast(pa.binary()).to_pylist():
            try:
                out.append(None if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(INVALID_TEXT)
        return out


def invalid_text(text: str) -> str | None:
    """Why a Python string cannot be tokenized, or None. A lone UTF-16 surrogate (valid in JSON as "\\ud83d", and
    what Python makes of undecodable command-line bytes) has no UTF-8 form, and the tokenizer raises on the whole
    batch it is in."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode: lone surrogate {text[exc.start]!r} at character {exc.start}"
    return None


_TAG = re.compile(r"<[^>]+>")
_WS = re.compile(r"\s+")


def texts_from(table: pa.Table, cfg: DataConfig, source: str = "") -> list:
    """Join the text columns with a space and clean them; None where every text column is null, INVALID_TEXT where
    one is not UTF-8."""
    cols = []
    for name in cfg.text_columns:
        col = table.column(name)
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_null(col.type)):
            raise DataError(f"{source}: text column {name!r} has type {col.type}, expected strings")
        cols.append(strings(col))
    out: list = []
    for parts in zip(*cols):
        if any(p is INVALID_TEXT for p in parts):
            out.append(INVALID_TEXT)
            continue
        present = [p for p in parts if p is not None]
        out.append(clean(" ".join(present), cfg) if present else None)
    return out


def clean(text: str, cfg: DataConfig) -> str:
    if cfg.clean_html:
        text = html.unescape(_TAG.sub(" ", text))
    if cfg.normalize_whitespace:
        text = _WS.sub(" ", text).strip()
    return text


@dataclass
class Labeled:
    texts: list[str]
    labels: np.ndarray  # int64 class ids (n,); multi-label: 0/1 per label (n, labels)
    label_names: list[str]
    report: dict = field(default_factory=dict)  # rows read / used / dropped by reason
    pairs: list[str] | None = None  # the second text of each pair (data.text_pair_column)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def is_multi_label(cfg: DataConfig, table: pa.Table) -> bool:
    """data.task, or for 'auto' what the label column holds: lists (or delimited strings) make it multi-label."""
    if cfg.task != "auto":
        return cfg.task == "multi_label"
    return cfg.label_delimiter is not None or (cfg.label_column in table.column_names
                                                 and _is_list(table.column(cfg.label_column).type))


def _label_lists(col: pa.ChunkedArray, cfg: DataConfig, source: str) -> list:
    """Each row's labels as a list (None for a null row): list columns as they are, strings split at
    data.label_delimiter, a single id or name as a one-label list."""
    t = col.type
    if _is_list(t):
        inner = t.value_type
        if not (pa.types.is_integer(inner) or pa.types.is_string(inner) or pa.types.is_large_string(inner)
                or pa.types.is_null(inner)):
            raise DataError(f"{source}: label column {cfg.label_column!r} holds lists of {inner}, expected lists of "
                            "integer ids or string names")
        return col.to_pylist()
    values = col.to_pylist()
    if cfg.label_delimiter is not None and (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return [None if v is None else [x.strip() for x in v.split(cfg.label_delimiter) if x.strip()] for v in values]
    return [None if v is None else [v] for v in values]


def label_names_for(uri: str, cfg: DataConfig, table: pa.Table) -> list[str]:
    """Class names in id order: the config, else a Hugging Face ClassLabel feature, else labels.json beside the
    data, else inferred from the column."""
    from bertray import hf_data

    if cfg.labels:
        return list(cfg.labels)
    if (declared := hf_data.class_names(table, cfg.label_column)) is not None:
        return declared
    beside = "*" if hf_data.is_named(uri) else storage.join(
        uri.rsplit("/", 1)[0] if not storage.is_dir(uri) else uri, "labels.json")
    if "*" not in beside and storage.exists(beside):
        names = json.loads(storage.read_text(beside))
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    col = table.column(cfg.label_column)
    if is_multi_label(cfg, table):  # every label any row has
        lists = _label_lists(col, cfg, uri)
        col = pa.chunked_array([pa.array([v for row in lists if row for v in row])])
    values = [v for v in pc.unique(col.drop_null()).to_pylist()]
    if pa.types.is_integer(col.type):
        if not values:
            return []
        if min(values) < 0:
            raise DataError(f"{uri}: label column {cfg.label_column!r} has negative ids; set data.labels or use names")
        # Integer ids imply the classes 0..max; ids with no rows there are a 1-based or sparse id scheme, which
        # would train (and score) classes nobody has.
        absent = sorted(set(range(max(values) + 1)) - set(values))
        if absent:
            raise DataError(f"{uri}: label column {cfg.label_column!r} has ids {_ranges(sorted(values))}, so classes "
                            f"0-{max(values)}, of which {len(absent):,} have no rows ({_ranges(absent)}); declare the "
                            "classes with data.labels or a labels.json beside the data, or use 0-based ids")
        return [str(i) for i in range(max(values) + 1)]
    return sorted(str(v) for v in values)


def _ranges(ids: list[int], shown: int = 4) -> str:
    """'0, 2-7, 9' for sorted ids; the first `shown` runs, then how many more."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:shown])
    return text + (f" and {len(runs) - shown} more runs" if len(runs) > shown else "")


def check_classes(train: Labeled) -> list[str]:
    """A DataError if the training rows hold fewer than two classes (multi-label: no label at all); returns the
    declared classes with no training rows (a warning: the model can never learn to answer them)."""
    counts = label_counts(train)
    present = [n for n, c in zip(train.label_names, counts) if c]
    if train.multi_label:
        if not present:
            raise DataError(f"{train.report.get('source', 'training data')}: no usable training row has any label")
        return [n for n, c in zip(train.label_names, counts) if not c]
    if len(present) < 2:
        raise DataError(f"{train.report.get('source', 'training data')}: every usable training row has the label "
                        f"{present[0]!r}: a classifier needs at least two classes" if present else
                        "no usable training rows")
    return [n for n, c in zip(train.label_names, counts) if not c]


def label_counts(d: Labeled) -> np.ndarray:
    """Rows per class (multi-label: rows carrying each label)."""
    if d.multi_label:
        return d.labels.sum(axis=0).astype(np.int64)
    return np.bincount(d.labels, minlength=len(d.label_names))


def _text_problem(t) -> str | None:
    if t is INVALID_TEXT:
        return "invalid_text"
    if t is None:
        return "null_text"
    return None if t else "empty_text"


def load_labeled(uri: str, cfg: DataConfig, label_names: list[str] | None = None) -> Labeled:
    """Read texts (and pairs) and labels; rows with null/empty text or a missing/unknown label are dropped and
    counted. Multi-label rows may carry no label at all (none applies); they are kept."""
    wanted = [*cfg.text_columns, *([cfg.text_pair_column] if cfg.text_pair_column else []), cfg.label_column]
    table = read_table(uri, list(dict.fromkeys(wanted)))
    names = label_names if label_names is not None else label_names_for(uri, cfg, table)
    texts = texts_from(table, cfg, uri)
    pairs = (texts_from(table, dataclasses.replace(cfg, text_columns=[cfg.text_pair_column]), uri)
             if cfg.text_pair_column else None)
    col = table.column(cfg.label_column)
    multi = is_multi_label(cfg, table)
    raw = _label_lists(col, cfg, uri) if multi else col.to_pylist()
    index = {n: i for i, n in enumerate(names)}
    kind = col.type.value_type if multi and _is_list(col.type) else col.type
    is_int = pa.types.is_integer(kind)
    if not (is_int or pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise DataError(f"{uri}: label column {cfg.label_column!r} has type {col.type}, expected integer ids or "
                        "string names" + (" (or lists of them)" if cfg.task != "single_label" else ""))

    def label_id(y):
        return (int(y) if 0 <= int(y) < len(names) else None) if is_int else index.get(str(y))

    dropped: Counter = Counter()
    first_bad: dict[str, int] = {}
    keep_t, keep_p, keep_y = [], [], []
    for row, (t, y) in enumerate(zip(texts, raw)):
        reason = _text_problem(t) or (_text_problem(pairs[row]) if pairs is not None else None)
        if reason is None and y is None:
            reason = "null_label"
        elif reason is None and multi:
            yid = [label_id(v) for v in y if v is not None]
            if None in yid:
                reason = "unknown_label"
        elif reason is None:
            yid = label_id(y)
            if yid is None:
                reason = "unknown_label"
        if reason:
            dropped[reason] += 1
            first_bad.setdefault(reason, row)
            continue
        keep_t.append(t)
        keep_y.append(yid)
        if pairs is not None:
            keep_p.append(pairs[row])
    report = {
        "source": uri,
        "rows_read": table.num_rows,
        "rows_used": len(keep_t),
        "dropped": dict(dropped),
        "first_dropped_row": first_bad,  # 0-based row across the files, in sorted file order
    }
    if not keep_t:
        raise DataError(f"{uri}: no usable rows ({table.num_rows} read; dropped: {dict(dropped) or 'none'})")
    if multi:
        labels = np.zeros((len(keep_y), len(names)), dtype=np.int8)
        for i, ids in enumerate(keep_y):
            labels[i, ids] = 1
    else:
        labels = np.asarray(keep_y, dtype=np.int64)
    return Labeled(keep_t, labels, names, report, keep_p if pairs is not None else None)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): `fraction` of each class, at least one row, seeded. Multi-label:
    iterative stratification, which keeps each label's share close to the whole's."""
    if labels.ndim == 2:
        return _iterative_split(labels.astype(bool), fraction, seed)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = max(1, int(round(len(idx) * fraction))) if len(idx) > 1 else 0
        val.append(idx[:n])
    val_idx = np.sort(np.concatenate(val)) if val else np.array([], dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def _iterative_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Iterative stratification (Sechidis, Tsoumakas and Vlahavas, 2011) into train and validation: the rarest
    label still unplaced goes first, each of its rows to the side that most lacks that label. Written here because
    the package that implements it (iterative-stratification) installs a top-level `tests` package into
    site-packages, which shadows the tests of whatever project installs it."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    rows_wanted = np.array([1 - fraction, fraction]) * n
    label_wanted = np.outer([1 - fraction, fraction], labels.sum(axis=0))
    side = np.full(n, -1)
    left = np.ones(n, dtype=bool)
    while True:
        counts = labels[left].sum(axis=0)
        if not counts.any():
            break
        rarest = int(np.argmin(np.where(counts > 0, counts, n + 1)))
        for r in rng.permutation(np.flatnonzero(left & labels[:, rarest])):
            want = label_wanted[:, rarest]
            best = np.flatnonzero(want == want.max())
            if len(best) > 1:  # tie: the side that wants more rows, then a coin
                best = best[rows_wanted[best] == rows_wanted[best].max()]
            s = int(rng.choice(best))
            side[r], left[r] = s, False
            label_wanted[s] -= labels[r]
            rows_wanted[s] -= 1
    for r in rng.permutation(np.flatnonzero(left)):  # rows with no label: where rows are still wanted
        s = int(np.argmax(rows_wanted))
        side[r] = s
        rows_wanted[s] -= 1
    return np.flatnonzero(side == 0), np.flatnonzero(side == 1)


def subset(d: Labeled, idx: np.ndarray) -> Labeled:
    return Labeled([d.texts[i] for i in idx], d.labels[idx], d.label_names, dict(d.report),
                   [d.pairs[i] for i in idx] if d.pairs is not None else None)


def sample(d: Labeled, n: int | None, seed: int) -> Labeled:
    if n is None or n >= len(d.texts):
        return d
    idx = np.sort(np.random.default_rng(seed).choice(len(d.texts), size=n, replace=False))
    out = subset(d, idx)
    out.report["sampled_rows"] = n
    return out


def load_texts(uri: str, cfg: DataConfig) -> tuple[list[str], dict]:
    """Unlabeled texts (for masked-LM evaluation samples and small corpora), with the drop report."""
    table = read_table(uri, list(cfg.text_columns))
    texts = texts_from(table, cfg, uri)
    kept = [t for t in texts if t]
    report = {"source": uri, "rows_read": table.num_rows, "rows_used": len(kept),
              "dropped": {k: v for k, v in {"null_text": sum(t is None for t in texts),
                                            "empty_text": sum(t == "" for t in texts),
                                            "invalid_text": sum(t is INVALID_TEXT for t in texts)}.items() if v}}
    return kept, report

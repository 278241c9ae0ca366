"""Hugging Face datasets as training, validation and evaluation data.

A dataset is read into a pyarrow Table with the columns asked for, which `bertray.data` then checks, cleans and
counts exactly as it does a Parquet file. Two forms are accepted wherever a data path is:

    hf://OWNER/NAME[/CONFIG]?split=SPLIT   a dataset on the Hugging Face Hub, e.g. hf://stanfordnlp/imdb?split=train
                                           or hf://nyu-mll/glue/sst2?split=validation; ids without an owner
                                           (hf://imdb?split=train) take the config as &config=CONFIG
    FOLDER[?split=SPLIT]                   a folder written by Dataset.save_to_disk, or by DatasetDict.save_to_disk
                                           with the split chosen by ?split= (or FOLDER/SPLIT, the split's own
                                           folder); local or s3://
    hf://BUILDER?data_files=PATH           one of the library's file builders (csv, json, parquet, text, arrow) over
                                           a file, folder or glob, local or s3://: load_dataset(BUILDER,
                                           data_files=...), e.g. hf://text?data_files=s3://bucket/corpus/*.txt for
                                           plain text, one example per line in a `text` column

A `ClassLabel` label column names the classes, in id order; its -1 ("no label", as in many test splits) counts as a
null label. Hub datasets are downloaded into the Hugging Face cache on the driver (`datasets.load_dataset`);
offline (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1) only a cached copy loads. A file builder reads its files on the
driver (S3 files through bertray's storage, so no s3fs), into a scratch cache removed once the table is read.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from bertray import storage
from bertray.data import DataError

HUB = "hf://"
STATE = "state.json"  # in a Dataset.save_to_disk folder: its Arrow files (and split)
INFO = "dataset_info.json"  # ... and its features
SPLITS = "dataset_dict.json"  # in a DatasetDict.save_to_disk folder: its splits, one subfolder each
# Where Hugging Face keeps a table's features (ClassLabel names and all) in Arrow schema metadata; Parquet written by
# `Dataset.to_parquet` carries it too.
_META = b"huggingface"
_OPTIONS = ("split", "config", "data_files")
# The `datasets` library's packaged builders over files (load_dataset(NAME, data_files=...)).
BUILDERS = ("csv", "json", "parquet", "text", "arrow")
# A trailing ?key=value[&key=value]: '?' alone is a glob wildcard (part-?.parquet), so only this form is options.
_QUERY = re.compile(r"\?([A-Za-z_]+=[^/?&]*(?:&[A-Za-z_]+=[^/?&]*)*)$")


def is_named(uri: str) -> bool:
    """Whether `uri` names a Hugging Face dataset by its form alone (hf://, or ?split=...), with no storage call."""
    return str(uri).startswith(HUB) or _QUERY.search(str(uri)) is not None


def is_hf(uri: str) -> bool:
    """Whether `uri` is a Hugging Face dataset: a hub id, options, or a save_to_disk folder."""
    if is_named(uri):
        return True
    if any(ch in uri for ch in "*?["):
        return False
    return any(storage.exists(storage.join(uri, marker)) for marker in (STATE, SPLITS))


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """The dataset's rows with only `columns`; ClassLabel names ride along in the schema metadata (class_names)."""
    location, options = _parse(uri)
    if location.startswith(HUB):
        table, labels = _read_hub(uri, location, options)
    else:
        folder = _split_folder(uri, location, options.get("split"))
        table, labels = _read_folder(folder)
    missing = [c for c in columns or [] if c not in table.column_names]
    if missing:
        raise DataError(f"{uri}: missing column(s) {', '.join(map(repr, missing))}; the dataset has: "
                        f"{', '.join(table.column_names)}")
    table = table.select(columns) if columns else table
    return _with_class_labels(table, {c: n for c, n in labels.items() if c in table.column_names})


def data_files(uri: str) -> list[str]:
    """The files holding the dataset's rows (what a run's fingerprint lists, as it lists Parquet files): Arrow files,
    or a file builder's own files."""
    location, options = _parse(uri)
    if _builder(uri, location, options):
        return _builder_files(uri, options["data_files"])
    if location.startswith(HUB):
        return [f["filename"] for f in _load_hub(uri, location, options).cache_files]
    folder = _split_folder(uri, location, options.get("split"))
    return [storage.join(folder, f["filename"]) for f in _read_json(storage.join(folder, STATE))["_data_files"]]


def class_names(table: pa.Table, column: str) -> list[str] | None:
    """The names of `column`'s ClassLabel feature, in id order, if the table's Hugging Face metadata declares one."""
    meta = (table.schema.metadata or {}).get(_META)
    if not meta:
        return None
    try:
        features = json.loads(meta)["info"]["features"]
    except (ValueError, KeyError, TypeError):  # metadata some other writer put under that key
        return None
    return _class_labels(features).get(column) if isinstance(features, dict) else None


def _class_labels(features: dict) -> dict[str, list[str]]:
    """{column: class names} of the ClassLabel columns (and list-of-ClassLabel ones: multi-label) of a features
    mapping as Hugging Face serializes it ({"label": {"_type": "ClassLabel", "names": [...]}, ...})."""
    out = {}
    for column, f in features.items():
        if isinstance(f, dict) and f.get("_type") in ("List", "LargeList", "Sequence"):
            f = f.get("feature")
        if isinstance(f, dict) and f.get("_type") == "ClassLabel" and isinstance(f.get("names"), list):
            out[column] = [str(n) for n in f["names"]]
    return out


# --------------------------------------------------------------------------------------------------- parsing


def _parse(uri: str) -> tuple[str, dict[str, str]]:
    """(location, {option: value}) of a dataset URI; a DataError naming an unknown option. A hub URI's options
    start at its first '?' and may hold a path (data_files=s3://bucket/part-?.txt); a folder's are a trailing
    ?key=value[&key=value]. Values are taken as written (no URL decoding: a file name may hold '+' or '%')."""
    if uri.startswith(HUB) and "?" in uri:
        location, query = uri.split("?", 1)
    elif m := _QUERY.search(uri):
        location, query = uri[: m.start()], m.group(1)
    else:
        location, query = uri, ""
    options = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in query.split("&") if kv)
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise DataError(f"{uri}: unknown option(s) {', '.join(unknown)}; a Hugging Face dataset takes "
                        f"{', '.join('?' + o + '=' for o in _OPTIONS)}")
    for key, value in options.items():
        if not value:
            raise DataError(f"{uri}: ?{key}= needs a value")
    location = location.rstrip("/")
    _builder(uri, location, options)  # checks data_files goes with a builder, and a builder's options
    return location, options


def _builder(uri: str, location: str, options: dict) -> str | None:
    """The file builder a hub URI names (hf://text?data_files=...), else None; a DataError if its options do not fit."""
    name = location[len(HUB):] if location.startswith(HUB) else None
    if name not in BUILDERS:
        if "data_files" in options:
            raise DataError(f"{uri}: ?data_files= goes with a file builder, hf://{{{','.join(BUILDERS)}}}"
                            "?data_files=PATH")
        return None
    if "data_files" not in options:
        raise DataError(f"{uri}: the {name} builder reads files: hf://{name}?data_files=PATH (a file, folder or glob; "
                        "local or s3://)")
    if options.get("split", "train") != "train" or "config" in options:
        raise DataError(f"{uri}: a builder over data_files makes one split, train; pass each split's files as a "
                        "data path of its own")
    return name


# --------------------------------------------------------------------------------------------------- folders


def _split_folder(uri: str, folder: str, split: str | None) -> str:
    """The save_to_disk folder holding one Dataset: `folder` itself, or its `split` if it holds a DatasetDict."""
    if storage.exists(storage.join(folder, SPLITS)):
        splits = list(_read_json(storage.join(folder, SPLITS)).get("splits") or [])
        if split is None:
            raise DataError(f"{uri}: a DatasetDict with splits {', '.join(splits)}; choose one with "
                            f"?split=NAME, e.g. {folder}?split={splits[0] if splits else 'train'}")
        if split not in splits:
            raise DataError(f"{uri}: no split {split!r}; the DatasetDict has: {', '.join(splits)}")
        return storage.join(folder, split)
    if not storage.exists(storage.join(folder, STATE)):
        raise DataError(f"{uri}: not a Hugging Face dataset folder (no {STATE} or {SPLITS}: write one with "
                        "Dataset.save_to_disk or DatasetDict.save_to_disk); ?split= applies only to those")
    if split is not None:
        own = _read_json(storage.join(folder, STATE)).get("_split")
        if split != own:
            raise DataError(f"{uri}: holds one Dataset" + (f" (split {own!r})" if own else "")
                            + f", not a DatasetDict with a split {split!r}; drop ?split=")
    return folder


def _read_folder(folder: str) -> tuple[pa.Table, dict[str, list[str]]]:
    """A Dataset.save_to_disk folder's rows and ClassLabel names, through bertray's pyarrow filesystems (so s3://
    honours AWS_ENDPOINT_URL like every other read); `datasets` would need s3fs and settings of its own."""
    state = _read_json(storage.join(folder, STATE))
    if state.get("_indices_data_files"):  # save_to_disk writes selected rows out; an index means another writer
        raise DataError(f"{folder}: an indices mapping is not supported; save the dataset again with "
                        "Dataset.flatten_indices().save_to_disk(...)")
    fs, root = storage.filesystem(folder)
    tables = []
    for f in state.get("_data_files") or []:
        path = f"{root}/{f['filename']}"
        try:
            # save_to_disk writes the Arrow IPC stream format. A local file is mapped, not read: only the pages of
            # the columns used are touched (the table keeps the mapping alive).
            source = pa.memory_map(path) if isinstance(fs, pafs.LocalFileSystem) else fs.open_input_file(path)
            tables.append(pa.ipc.open_stream(source).read_all())
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{storage.join(folder, f['filename'])}: cannot read as a Hugging Face Arrow file: "
                            f"{exc}") from None
    if not tables:
        raise DataError(f"{folder}: {STATE} lists no data files")
    table = pa.concat_tables(tables)
    info = _read_json(storage.join(folder, INFO)) if storage.exists(storage.join(folder, INFO)) else {}
    return table, _class_labels(info.get("features") or {})


def _read_json(uri: str) -> dict:
    try:
        out = json.loads(storage.read_text(uri))
    except (ValueError, OSError) as exc:
        raise DataError(f"{uri}: cannot read ({exc})") from None
    if not isinstance(out, dict):
        raise DataError(f"{uri}: expected a JSON object")
    return out


# --------------------------------------------------------------------------------------------------- the Hub


def _read_hub(uri: str, location: str, options: dict) -> tuple[pa.Table, dict[str, list[str]]]:
    if builder := _builder(uri, location, options):
        return _read_builder(uri, builder, options["data_files"]), {}
    ds = _load_hub(uri, location, options)
    return ds.with_format("arrow")[:], _class_labels(ds.features.to_dict())


def _builder_files(uri: str, pattern: str) -> list[str]:
    files = storage.list_files(pattern)
    if not files:
        raise DataError(f"{uri}: no files at {pattern}")
    return files


def _read_builder(uri: str, builder: str, pattern: str) -> pa.Table:
    """load_dataset(builder, data_files=...) on local copies of remote files, with a scratch cache: the rows are
    read once into this process, so nothing need stay in the Hugging Face cache."""
    import datasets

    files = _builder_files(uri, pattern)
    with tempfile.TemporaryDirectory(prefix="bertray-hf-") as tmp:
        local = []
        for i, f in enumerate(files):
            if storage.is_remote(f):
                copy = Path(tmp, "files", f"{i:06d}-{f.rsplit('/', 1)[-1]}")
                copy.parent.mkdir(exist_ok=True)
                fs, path = storage.filesystem(f)
                with fs.open_input_stream(path) as src, copy.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
                f = str(copy)
            local.append(f)
        # Quiet while it reads: a progress bar per split, and a parse error logged before it is raised (the one
        # line below says it, naming the file).
        bars, verbosity = not datasets.utils.are_progress_bars_disabled(), datasets.logging.get_verbosity()
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
        try:
            # keep_in_memory: the rows are read out of the scratch cache before it is removed.
            ds = datasets.load_dataset(builder, data_files=local, split="train", cache_dir=str(Path(tmp, "cache")),
                                       keep_in_memory=True)
        except Exception as exc:  # the builder's own parse errors come in many types (Arrow, pandas, datasets)
            while exc.__cause__ is not None:  # "An error occurred while generating the dataset" wraps the reason
                exc = exc.__cause__
            raise DataError(f"{uri}: the {builder} builder could not read {pattern}: {_first_line(exc)}") from None
        finally:
            datasets.logging.set_verbosity(verbosity)
            if bars:
                datasets.enable_progress_bars()
        return ds.with_format("arrow")[:]


def _load_hub(uri: str, location: str, options: dict):
    """The split as a `datasets.Dataset` (downloaded into, or read from, the Hugging Face cache)."""
    import datasets

    parts = location[len(HUB):].split("/")
    if not all(parts) or len(parts) > 3 or (len(parts) == 3 and "config" in options):
        raise DataError(f"{uri}: expected hf://OWNER/NAME[/CONFIG]?split=SPLIT or hf://NAME?split=SPLIT&config=CONFIG")
    name = "/".join(parts[:2])
    config = parts[2] if len(parts) == 3 else options.get("config")
    split = options.get("split")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except ConnectionError:
        local = name.rsplit("/", 1)[-1]
        args = ", ".join(repr(a) for a in (name, config) if a)
        raise DataError(
            f"{uri}: could not reach the Hugging Face Hub, and the local cache has no copy (offline: "
            f"HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or no network); on a machine that can reach it run "
            f"`python -c \"import datasets; datasets.load_dataset({args}).save_to_disk('{local}')\"`, copy the "
            f"folder here and pass {local}?split={split or 'SPLIT'}") from None
    except (FileNotFoundError, ValueError) as exc:  # no such dataset, config or split: the library says which
        raise DataError(f"{uri}: {_first_line(exc)}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{uri}: a dataset with splits {', '.join(ds)}; choose one with ?split=NAME, e.g. "
                        f"{location}?split={next(iter(ds), 'train')}")
    return ds


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------------------------------- labels


def _with_class_labels(table: pa.Table, labels: dict[str, list[str]]) -> pa.Table:
    """`table` with each ClassLabel column's -1 made null (Hugging Face's "no label") and the names recorded in
    the schema metadata, in Hugging Face's own layout, for class_names."""
    for column in labels:
        ids = table.column(column)
        if pa.types.is_integer(ids.type):
            table = table.set_column(table.column_names.index(column), column,
                                     pc.if_else(pc.equal(ids, -1), pa.scalar(None, ids.type), ids))
    if not labels:
        return table
    features = {c: {"_type": "ClassLabel", "names": n} for c, n in labels.items()}
    meta = dict(table.schema.metadata or {})
    meta[_META] = json.dumps({"info": {"features": features}}).encode()
    return table.replace_schema_metadata(meta)

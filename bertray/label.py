"""Bulk labeling: `bertray label --model M --input I --output O`, Parquet in, Parquet out, on Ray Data.

The driver plans before any work: it reads only the Parquet footers, checks every file's columns, and splits each
file into *units* of at most `rows_per_file` rows along its row groups. A pool of actors (each loads the model
once) labels one unit at a time and writes `part-<unit>.parquet` atomically, with the unit's counts in the file's
metadata. A unit whose part file exists is done, so re-running the same command resumes where a killed run stopped
and the output holds every input row exactly once. `_SUCCESS` (the manifest) is written last: a folder without it
is not finished.

Output folder:
    _plan.json              files, row counts, units and the settings that shape the output (a re-run must match)
    part-FFFFF-RRRRRRRRRRRR.parquet   one per unit: file index F, first row R; rows in input order
    _skipped-<unit>.json    a unit whose input could not be read (only with on_bad_file=skip)
    _summary.json, _SUCCESS run summary and manifest, written when every unit is done
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bertray import checkpoint, data, modeling, storage
from bertray.config import ConfigError, LabelConfig

log = logging.getLogger(__name__)

PLAN = "_plan.json"
SUCCESS = "_SUCCESS"
SUMMARY = "_summary.json"
UNIT_META = b"bertray.label.unit"  # Parquet key-value metadata holding a part file's unit summary
PLAN_VERSION = 1
# Rows tokenized and predicted together inside a unit: large enough that sorting by length leaves little padding,
# small enough that the token ids (Python ints, ~36 bytes each) stay in the tens of MB for 512-token texts.
CHUNK_ROWS = 2048
# A small corpus is cut into about TARGET_UNITS units (never under MIN_UNIT_ROWS rows: each unit opens its input
# and writes a part file) so a pool of actors shares it.
TARGET_UNITS = 64
MIN_UNIT_ROWS = 256
PROGRESS_EVERY_S = 5.0
FOOTER_THREADS = 16  # footers are latency-bound on S3; read many at once
# Settings that change what the output holds; a re-run with any of them changed is a different job.
_PLAN_KEYS = ("model", "text_column", "id_column", "passthrough", "probabilities", "rows_per_file", "max_length",
              "quantize", "on_empty", "on_bad_file")


@dataclass(frozen=True)
class Unit:
    uid: str  # FFFFF-RRRRRRRRRRRR: file index and first row, so ids are stable across runs
    path: str
    start: int  # row range [start, stop) within the file
    stop: int


@dataclass
class Plan:
    files: list[dict]  # path, size, rows, row_groups
    skipped_files: list[dict]  # path, reason (on_bad_file=skip)
    units: list[Unit]
    schema: pa.Schema  # output schema, identical for every part file
    label_names: list[str]
    meta: dict  # the checkpoint's bertray.json ({} for a plain HF folder)

    def to_json(self, cfg: LabelConfig) -> dict:
        return {
            "version": PLAN_VERSION,
            "config": {k: getattr(cfg, k) for k in _PLAN_KEYS},
            "input": cfg.input,
            "labels": self.label_names,
            "files": self.files,
            "skipped_files": self.skipped_files,
            "units": [dataclasses.asdict(u) for u in self.units],
        }


# --------------------------------------------------------------------------------------------------- entry


def run(cfg: LabelConfig) -> dict:
    """Label `cfg.input` into `cfg.output`; returns (and prints, and saves) the run summary."""
    import ray

    from bertray import runtime

    t0 = time.time()
    # Actors on other nodes read the input, load the model and write the output themselves.
    runtime.check_shared_storage(cfg.input, "input")
    runtime.check_shared_storage(cfg.output, "output")
    if not storage.is_remote(cfg.model) and storage.exists(cfg.model):
        runtime.check_shared_storage(cfg.model, "model")
    plan = make_plan(cfg)
    done = _prepare_output(cfg, plan)
    if done.get("finished"):
        log.info("label: %s is already finished (%s exists); nothing to do. Pass --overwrite to redo it.",
                 cfg.output, SUCCESS)
        summary = json.loads(storage.read_text(storage.join(cfg.output, SUCCESS)))
        summary.pop("output_files", None)
        print(json.dumps(summary, indent=2))
        return summary
    earlier: dict[str, dict] = done["units"]
    pending = [u for u in plan.units if u.uid not in earlier]
    total_rows = sum(u.stop - u.start for u in plan.units)
    actors = _pool_size(cfg, len(pending), ray.cluster_resources())
    log.info("label: %d file(s) (%d skipped), %s rows in %d unit(s) of <= %s rows; %d done earlier, %d to do "
             "on %d actor(s); output %s", len(plan.files), len(plan.skipped_files), f"{total_rows:,}", len(plan.units),
             f"{max((u.stop - u.start for u in plan.units), default=0):,}", len(earlier), len(pending), actors, cfg.output)
    t_plan = time.time() - t0
    summaries = dict(earlier)
    t1 = time.time()
    if pending:
        summaries.update(_execute(cfg, plan, pending, actors, earlier))
    t_label = time.time() - t1
    this_run = [summaries[u.uid] for u in pending]
    summary = _finish(cfg, plan, summaries, this_run, actors, {"plan": t_plan, "label": t_label,
                                                               "total": time.time() - t0})
    print(json.dumps(summary, indent=2))
    return summary


# --------------------------------------------------------------------------------------------------- planning


def make_plan(cfg: LabelConfig) -> Plan:
    """List and check every input file from its footer (no data read); split files into units."""
    label_names, meta = _model_info(cfg.model)
    files = data.data_files(cfg.input)
    not_parquet = [f for f in files if not f.lower().endswith((".parquet", ".pq"))]
    if not_parquet:
        raise data.DataError(f"{cfg.input}: label reads Parquet files only; found {len(not_parquet)} other file(s), "
                             f"e.g. {not_parquet[0]}")
    _check_output_location(cfg, files)
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(files))) as pool:
        footers = list(pool.map(_read_footer, files))
    good, skipped, problems = [], [], []
    for path, footer in zip(files, footers):
        if isinstance(footer, str):  # unreadable: the message says why
            if cfg.on_bad_file == "skip":
                skipped.append({"path": path, "reason": footer})
                log.warning("label: skipping unreadable file %s: %s", path, footer)
                continue
            problems.append(f"{path}: cannot read as Parquet ({footer}); fix or remove it, or pass --skip-bad-files")
            continue
        problems.extend(_column_problems(cfg, path, footer[0]))
        good.append((path, footer))
    if problems:
        raise data.DataError(f"{cfg.input}: {len(problems)} problem(s) before labeling started:\n"
                             + "\n".join(f"  - {p}" for p in problems))
    schema = _output_schema(cfg, label_names, good)
    plan_files, units = [], []
    cap = unit_rows(sum(sum(f[1]) for _, f in good), cfg.rows_per_file)
    for index, (path, (file_schema, rg_rows, size)) in enumerate(good):
        plan_files.append({"path": path, "size": size, "rows": sum(rg_rows), "row_groups": len(rg_rows)})
        units.extend(Unit(f"{index:05d}-{start:012d}", path, start, stop)
                     for start, stop in split_rows(rg_rows, cap))
    return Plan(plan_files, skipped, units, schema, label_names, meta)


def unit_rows(total_rows: int, rows_per_file: int) -> int:
    """Rows per unit: `rows_per_file`, or fewer for a small corpus so that every actor gets work (one 7k-row unit
    kept one of two actors busy and the other idle: half the machine). Depends only on the input, so a re-run
    plans the same units and resumes."""
    return min(rows_per_file, max(MIN_UNIT_ROWS, math.ceil(total_rows / TARGET_UNITS)))


def split_rows(row_group_rows: list[int], rows_per_file: int) -> list[tuple[int, int]]:
    """Row ranges of at most `rows_per_file` rows, cut at row-group boundaries where the groups allow."""
    ranges, start, pos = [], 0, 0
    for n in row_group_rows:
        if pos > start and pos - start + n > rows_per_file:
            ranges.append((start, pos))
            start = pos
        pos += n
        while pos - start > rows_per_file:  # one row group bigger than a unit: cut inside it
            ranges.append((start, start + rows_per_file))
            start += rows_per_file
    if pos > start:
        ranges.append((start, pos))
    return ranges


def _model_info(uri: str) -> tuple[list[str], dict]:
    """Label names and bertray meta, checked on the driver so a wrong model fails before any actor starts."""
    if storage.is_remote(uri):
        cfg_uri = storage.join(uri, "config.json")
        if not storage.exists(cfg_uri):
            raise modeling.ModelError(f"{uri}: no config.json there; expected a classifier checkpoint folder")
        hf = json.loads(storage.read_text(cfg_uri))
        meta = checkpoint.read_meta(uri) or {}
    else:
        from transformers import AutoConfig

        path = modeling.resolve(uri)  # a local folder, or a hub id (no bertray.json then)
        meta = (checkpoint.read_meta(path) or {}) if storage.exists(path) else {}
        try:
            hf = AutoConfig.from_pretrained(path).to_dict()
        except OSError as exc:
            raise modeling.ModelError(f"{uri}: cannot read the model config: {exc}") from None
    if meta.get("kind", "classifier") != "classifier":
        raise modeling.ModelError(f"{uri}: is a {meta['kind']!r} checkpoint, not a classifier; fine-tune it first")
    arch = hf.get("architectures") or []
    if not hf.get("id2label") or not any("ForSequenceClassification" in a for a in arch):
        raise modeling.ModelError(f"{uri}: not a sequence-classification model (config.json architectures: {arch})")
    id2label = {int(k): v for k, v in hf["id2label"].items()}
    return [id2label[i] for i in range(len(id2label))], meta


def _check_output_location(cfg: LabelConfig, files: list[str]) -> None:
    out = storage.filesystem(cfg.output)[1].rstrip("/") + "/"
    inside = [f for f in files if storage.filesystem(f)[1].startswith(out)]
    if inside:
        raise ConfigError([f"output: {cfg.output!r} holds input files (e.g. {inside[0]}); a re-run would label "
                           "its own output. Choose an output folder outside the input"], "label")


def _read_footer(path: str) -> tuple[pa.Schema, list[int], int] | str:
    """(arrow schema, rows per row group, bytes) from the footer alone, or why the file cannot be read."""
    fs, p = storage.filesystem(path)
    try:
        with fs.open_input_file(p) as f:
            size = f.size()
            md = pq.ParquetFile(f).metadata
            return md.schema.to_arrow_schema(), [md.row_group(i).num_rows for i in range(md.num_row_groups)], size
    except (pa.ArrowInvalid, OSError) as exc:  # truncated, not Parquet, permission denied, ...
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t) or pa.types.is_null(t)


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def _column_problems(cfg: LabelConfig, path: str, schema: pa.Schema) -> list[str]:
    problems = []
    names = schema.names
    if cfg.text_column not in names:
        problems.append(f"{path}: no text column {cfg.text_column!r}; the file has: {_describe(schema)}. "
                        "Set --text-column")
    elif not _is_text(schema.field(cfg.text_column).type):
        problems.append(f"{path}: text column {cfg.text_column!r} has type {schema.field(cfg.text_column).type}, "
                        f"expected strings; the file has: {_describe(schema)}")
    if cfg.id_column and cfg.id_column not in names:
        problems.append(f"{path}: no id column {cfg.id_column!r}; the file has: {_describe(schema)}. Set "
                        "--id-column, or --id-column none to keep source_file/source_row instead")
    missing = [c for c in cfg.passthrough if c not in names]
    if missing:
        problems.append(f"{path}: no passthrough column(s) {', '.join(map(repr, missing))}; the file has: "
                        f"{_describe(schema)}")
    return problems


def _output_columns(cfg: LabelConfig, label_names: list[str]) -> list[tuple[str, pa.DataType]]:
    cols = [("label", pa.string()), ("label_id", pa.int32()), ("score", pa.float32())]
    if cfg.probabilities:
        cols += [(f"prob_{n}", pa.float32()) for n in label_names]
    if cfg.on_empty == "null":
        cols.append(("reason", pa.string()))  # why label is null: null_text / empty_text
    return cols


def _output_schema(cfg: LabelConfig, label_names: list[str], good: list) -> pa.Schema:
    """Input columns kept (their type agreed across files) + the label columns."""
    keep = ([cfg.id_column] if cfg.id_column else []) + list(cfg.passthrough)
    fields: list[pa.Field] = []
    for name in keep:
        types = {}
        for path, (schema, _, _) in good:
            t = schema.field(name).type
            if not pa.types.is_null(t):  # an all-null column in one file takes the others' type
                types.setdefault(t, path)
        if len(types) > 1:
            (t1, p1), (t2, p2) = list(types.items())[:2]
            raise data.DataError(f"column {name!r} has type {t1} in {p1} but {t2} in {p2}; the output files would "
                                 "disagree. Make the input types consistent")
        fields.append(pa.field(name, next(iter(types), pa.null())))
    if not cfg.id_column:
        fields += [pa.field("source_file", pa.string()), pa.field("source_row", pa.int64())]
    out = _output_columns(cfg, label_names)
    clash = sorted({f.name for f in fields} & {n for n, _ in out})
    if clash:
        raise ConfigError([f"passthrough: input column(s) {clash} would clash with the output column(s) of the same "
                           "name; leave them out of --passthrough/--id-column"], "label")
    return pa.schema(fields + [pa.field(n, t) for n, t in out])


# --------------------------------------------------------------------------------------------------- output folder


def _prepare_output(cfg: LabelConfig, plan: Plan) -> dict:
    """Start, resume or refuse. Returns {'finished': bool, 'units': {uid: summary of units done earlier}}."""
    names = _listing(cfg.output)
    ours = [n for n in names if _is_ours(n)]
    foreign = [n for n in names if not _is_ours(n)]
    if foreign:
        raise ConfigError([f"output: {cfg.output!r} holds files that bertray label did not write (e.g. {foreign[0]}); "
                           "choose an empty or new folder"], "label")
    if cfg.overwrite and ours:
        log.info("label: --overwrite: deleting %d file(s) of an earlier run in %s", len(ours), cfg.output)
        for n in ours:
            storage.delete(storage.join(cfg.output, n))
        ours = []
    new = json.loads(json.dumps(plan.to_json(cfg)))  # as it reads back from the file
    if PLAN in ours:
        old = json.loads(storage.read_text(storage.join(cfg.output, PLAN)))
        # The input may be named differently (folder vs glob); what matters is the files and how they are cut.
        changed = [f"config.{k}" for k in _PLAN_KEYS if old.get("config", {}).get(k) != new["config"][k]]
        changed += [k for k in ("version", "labels", "files", "skipped_files", "units") if old.get(k) != new[k]]
        if changed:
            raise ConfigError([f"output: {cfg.output!r} holds an earlier run with a different plan (changed: "
                               f"{', '.join(changed)}); pass --overwrite to start over or choose another folder"],
                              "label")
    elif [n for n in ours if n.startswith(("part-", "_skipped-"))]:
        raise ConfigError([f"output: {cfg.output!r} holds part files but no {PLAN}; pass --overwrite to start over"],
                          "label")
    else:
        storage.write_text(storage.join(cfg.output, PLAN), json.dumps(new, indent=1))
    if SUCCESS in ours:
        return {"finished": True, "units": {}}
    for n in ours:  # temp files of writers that were killed mid-write
        if n.startswith(".tmp-"):
            storage.delete(storage.join(cfg.output, n))
    return {"finished": False, "units": _done_units(cfg.output, ours, {u.uid for u in plan.units})}


def _listing(folder: str) -> list[str]:
    """Names of the files directly in `folder` (including hidden and marker files)."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


def _is_ours(name: str) -> bool:
    return (name in (PLAN, SUCCESS, SUMMARY) or name.startswith(".tmp-")
            or (name.startswith("part-") and name.endswith(".parquet"))
            or (name.startswith("_skipped-") and name.endswith(".json")))


def part_name(uid: str) -> str:
    return f"part-{uid}.parquet"


def _done_units(output: str, names: list[str], planned: set[str]) -> dict[str, dict]:
    """Summaries of units finished by earlier runs, read back from the part files' footers."""
    parts = [n for n in names if n.startswith("part-") and n[5:-8] in planned]
    skipped = [n for n in names if n.startswith("_skipped-") and n[9:-5] in planned]

    def read(name: str) -> dict:
        uri = storage.join(output, name)
        if name.startswith("_skipped-"):
            return json.loads(storage.read_text(uri))
        fs, p = storage.filesystem(uri)
        with fs.open_input_file(p) as f:
            return json.loads(pq.ParquetFile(f).metadata.metadata[UNIT_META])

    names = parts + skipped
    if not names:
        return {}
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(names))) as pool:
        return {s["uid"]: s for s in pool.map(read, names)}


# --------------------------------------------------------------------------------------------------- execution


def _pool_size(cfg: LabelConfig, pending: int, resources: dict) -> int:
    if cfg.actors:
        n = cfg.actors
    elif cfg.gpus_per_actor:
        n = int(resources.get("GPU", 0) // cfg.gpus_per_actor)
        if n == 0:
            raise ConfigError([f"gpus_per_actor: {cfg.gpus_per_actor} but the Ray cluster has no GPUs; set "
                               "--gpus-per-actor 0 for CPU actors"], "label")
    else:
        n = max(1, int(resources.get("CPU", 1) // cfg.cpus_per_actor))
    return max(1, min(n, pending))  # every actor loads the model: no more of them than there is work


def _execute(cfg: LabelConfig, plan: Plan, pending: list[Unit], actors: int, earlier: dict) -> dict[str, dict]:
    """Label the pending units on an actor pool; stream their summaries back and report progress."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # our progress lines below say units/rows/throughput; the bars only repeat it
    try:
        # One block per unit, so the pool spreads units over actors instead of one actor taking them all.
        ds = ray.data.from_items([dataclasses.asdict(u) for u in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            LabelWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor or None,
            fn_constructor_kwargs={"cfg": cfg, "schema": plan.schema, "label_names": plan.label_names})
        return _collect(cfg, ds.iter_rows(), pending, plan, earlier)
    finally:
        ctx.enable_progress_bars = bars


def _collect(cfg: LabelConfig, rows, pending: list[Unit], plan: Plan, earlier: dict) -> dict[str, dict]:
    total_units, total_rows = len(plan.units), sum(u.stop - u.start for u in plan.units)
    done_rows = sum(s["rows_read"] + s.get("rows_unreadable", 0) for s in earlier.values())
    out: dict[str, dict] = {}
    start = last = time.time()
    rows_now = tokens_now = 0
    for row in rows:
        s = json.loads(row["summary"])
        if s.get("error") and cfg.on_bad_file == "error":
            raise data.DataError(f"{s['path']}: cannot read rows {s['start']}-{s['stop']}: {s['error']}; fix or "
                                 "remove the file, or pass --skip-bad-files (finished units are kept; re-run to resume)")
        if s.get("error"):
            log.warning("label: skipped unreadable rows %d-%d of %s: %s", s["start"], s["stop"], s["path"], s["error"])
        out[s["uid"]] = s
        rows_now += s["rows_read"] + s.get("rows_unreadable", 0)
        tokens_now += s["tokens"]
        now = time.time()
        if now - last >= PROGRESS_EVERY_S or len(out) == len(pending):
            last = now
            rate = rows_now / max(now - start, 1e-9)
            left = total_rows - done_rows - rows_now
            log.info("label: %d/%d units, %s/%s rows (%.0f%%), %s rows/s, %s tokens/s, eta %s",
                     len(earlier) + len(out), total_units, f"{done_rows + rows_now:,}", f"{total_rows:,}",
                     100 * (done_rows + rows_now) / max(total_rows, 1), f"{rate:,.0f}",
                     f"{tokens_now / max(now - start, 1e-9):,.0f}", _eta(left / rate if rate else None))
    missing = [u.uid for u in pending if u.uid not in out]
    if missing:  # Ray Data returned fewer results than it was given units: never finish silently
        raise RuntimeError(f"label: {len(missing)} unit(s) returned no result (e.g. {missing[0]}); re-run to resume")
    return out


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


class LabelWorker:
    """One inference actor: loads the model once, then labels one unit per call."""

    def __init__(self, cfg: LabelConfig, schema: pa.Schema, label_names: list[str]):
        import torch

        from bertray.predictor import Predictor

        # Ray gives the actor `cpus_per_actor` CPUs; match torch's threads so actors don't oversubscribe cores.
        torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.cfg = cfg
        self.schema = schema
        self.predictor = Predictor(cfg.model, device="cuda" if cfg.gpus_per_actor else "cpu",
                                   quantize=cfg.quantize,
                                   max_length=cfg.max_length, token_budget=cfg.token_budget)
        if self.predictor.label_names != label_names:
            raise modeling.ModelError(f"{cfg.model}: labels changed since planning: {self.predictor.label_names} "
                                      f"vs {label_names}")

    def __call__(self, batch: dict) -> dict:
        summaries = []
        for i in range(len(batch["uid"])):
            unit = Unit(str(batch["uid"][i]), str(batch["path"][i]), int(batch["start"][i]), int(batch["stop"][i]))
            summaries.append(json.dumps(self.label_unit(unit)))
        return {"summary": np.array(summaries, dtype=object)}

    def label_unit(self, unit: Unit) -> dict:
        t0 = time.time()
        try:
            kept, texts_done, stats = self._predict(unit)
        except (pa.ArrowInvalid, OSError) as exc:  # corrupt pages behind a good footer, vanished file, ...
            return self._unreadable(unit, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        table, counts = self._table(unit, kept, *texts_done)
        stats.update(counts, uid=unit.uid, path=unit.path, start=unit.start, stop=unit.stop,
                     seconds=round(time.time() - t0, 3))
        assert stats["rows_read"] == stats["rows_written"] + stats["rows_skipped"] == unit.stop - unit.start, stats
        buf = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata({UNIT_META: json.dumps(stats).encode()}), buf)
        # storage.write_bytes renames a temp file locally and PUTs once on S3, so a part file is whole or absent.
        storage.write_bytes(storage.join(self.cfg.output, part_name(unit.uid)), buf.getvalue().to_pybytes())
        return stats

    def _unreadable(self, unit: Unit, reason: str) -> dict:
        stats = {"uid": unit.uid, "path": unit.path, "start": unit.start, "stop": unit.stop, "error": reason,
                 "rows_read": 0, "rows_written": 0, "rows_skipped": 0, "rows_unreadable": unit.stop - unit.start,
                 "tokens": 0, "truncated": 0, "label_counts": {}, "reasons": {}, "score_sum": 0.0,
                 "low_confidence": 0, "seconds": 0.0}
        if self.cfg.on_bad_file == "skip":
            storage.write_text(storage.join(self.cfg.output, f"_skipped-{unit.uid}.json"), json.dumps(stats))
        return stats

    def _predict(self, unit: Unit) -> tuple[dict[str, list], tuple[np.ndarray, list], dict]:
        """Read the unit's rows chunk by chunk (only the needed columns), predict the non-empty texts."""
        cfg = self.cfg
        keep = [f.name for f in self.schema if f.name in self._input_columns()]
        fs, p = storage.filesystem(unit.path)
        n = unit.stop - unit.start
        probs = np.full((n, len(self.predictor.label_names)), np.nan, dtype=np.float32)
        reasons: list[str | None] = [None] * n
        kept: dict[str, list] = {c: [] for c in keep}
        tokens = truncated = 0
        with fs.open_input_file(p) as f:
            pf = pq.ParquetFile(f)
            groups, pos = _row_groups(pf.metadata, unit.start, unit.stop)
            at = 0  # rows of this unit seen so far
            for batch in pf.iter_batches(batch_size=CHUNK_ROWS, row_groups=groups, columns=[cfg.text_column, *keep]):
                lo, hi = max(unit.start - pos, 0), min(unit.stop - pos, batch.num_rows)
                pos += batch.num_rows
                if hi <= lo:
                    continue
                batch = batch.slice(lo, hi - lo)
                for c in keep:
                    kept[c].append(batch.column(c))
                texts = batch.column(cfg.text_column).to_pylist()
                todo = []
                for j, t in enumerate(texts):
                    if t is None:
                        reasons[at + j] = "null_text"
                    elif not t.strip():
                        reasons[at + j] = "empty_text"
                    else:
                        todo.append(j)
                if todo:
                    ids, cut = self.predictor.encode([texts[j] for j in todo])
                    probs[at + np.asarray(todo)] = self.predictor.predict_ids(ids)
                    tokens += sum(len(x) for x in ids)
                    truncated += cut
                at += batch.num_rows
        if at != n:
            raise OSError(f"expected {n} rows in {unit.start}-{unit.stop}, read {at}")
        return kept, (probs, reasons), {"rows_read": n, "tokens": tokens, "truncated": truncated}

    def _input_columns(self) -> list[str]:
        return ([self.cfg.id_column] if self.cfg.id_column else []) + list(self.cfg.passthrough)

    def _table(self, unit: Unit, kept: dict, probs: np.ndarray, reasons: list) -> tuple[pa.Table, dict]:
        names = self.predictor.label_names
        n = len(reasons)
        has = np.array([r is None for r in reasons], dtype=bool)
        top = np.where(has, np.nan_to_num(probs, nan=0.0).argmax(axis=1), 0)
        score = np.where(has, np.nan_to_num(probs, nan=0.0).max(axis=1), 0.0).astype(np.float32)
        cols: dict[str, pa.Array] = {}
        for f in self.schema:
            if f.name in kept:
                cols[f.name] = pa.concat_arrays([c.cast(f.type) for c in kept[f.name]]) if kept[f.name] \
                    else pa.array([], f.type)
        if not self.cfg.id_column:
            cols["source_file"] = pa.array([unit.path] * n, pa.string())
            cols["source_row"] = pa.array(np.arange(unit.start, unit.stop, dtype=np.int64))
        mask = ~has  # pyarrow masks mark nulls
        cols["label"] = pa.array([names[k] if h else None for k, h in zip(top, has)], pa.string())
        cols["label_id"] = pa.array(top.astype(np.int32), mask=mask)
        cols["score"] = pa.array(score, mask=mask)
        if self.cfg.probabilities:
            for k, name in enumerate(names):
                cols[f"prob_{name}"] = pa.array(probs[:, k], mask=mask)
        if self.cfg.on_empty == "null":
            cols["reason"] = pa.array(reasons, pa.string())
        table = pa.table([cols[f.name] for f in self.schema], schema=self.schema)
        reason_counts = Counter(r for r in reasons if r)
        skipped = 0
        if self.cfg.on_empty == "skip":
            table = table.filter(pa.array(has))
            skipped = int(mask.sum())
        counts = {
            "rows_written": table.num_rows,
            "rows_skipped": skipped,
            "reasons": dict(reason_counts),
            "label_counts": {names[k]: int(c) for k, c in zip(*np.unique(top[has], return_counts=True))},
            "score_sum": float(score[has].sum()),
            "low_confidence": int((score[has] < self.cfg.confidence_threshold).sum()),
        }
        return table, counts


def _row_groups(md: pq.FileMetaData, start: int, stop: int) -> tuple[list[int], int]:
    """Indices of the row groups overlapping rows [start, stop), and the file row where the first one begins."""
    groups, first, pos = [], None, 0
    for i in range(md.num_row_groups):
        n = md.row_group(i).num_rows
        if pos < stop and pos + n > start:
            groups.append(i)
            first = pos if first is None else first
        pos += n
    return groups, first or 0


# --------------------------------------------------------------------------------------------------- finish


def _finish(cfg: LabelConfig, plan: Plan, summaries: dict[str, dict], this_run: list[dict], actors: int,
            seconds: dict) -> dict:
    """Check counts, then write _summary.json and, last, the _SUCCESS manifest."""
    units = [summaries[u.uid] for u in plan.units]
    total = Counter()
    labels: Counter = Counter()
    reasons: Counter = Counter()
    for s in units:
        total.update({k: s[k] for k in ("rows_read", "rows_written", "rows_skipped", "tokens", "truncated",
                                        "low_confidence", "score_sum")})
        total["rows_unreadable"] += s.get("rows_unreadable", 0)
        labels.update(s["label_counts"])
        reasons.update(s["reasons"])
    planned = sum(u.stop - u.start for u in plan.units)
    # Counts in = counts out: every planned row was read or reported unreadable, and every read row is written or
    # counted as skipped. A mismatch means lost rows; refuse to mark the job finished.
    if total["rows_read"] + total["rows_unreadable"] != planned or \
            total["rows_read"] != total["rows_written"] + total["rows_skipped"]:
        raise RuntimeError(f"label: row counts do not add up (planned {planned}, {dict(total)}); "
                           f"{SUCCESS} not written")
    labeled = sum(labels.values())
    run_rows = sum(s["rows_read"] for s in this_run)
    run_tokens = sum(s["tokens"] for s in this_run)
    bad_units = [{"path": s["path"], "rows": f"{s['start']}-{s['stop']}", "reason": s["error"]}
                 for s in units if s.get("error")]
    summary = {
        "output": cfg.output,
        "model": cfg.model,
        "quantize": cfg.quantize,
        "files": len(plan.files),
        "files_skipped": plan.skipped_files,
        "units": len(plan.units),
        "units_unreadable": bad_units,
        "units_done_earlier": len(plan.units) - len(this_run),
        "rows_read": total["rows_read"],
        "rows_written": total["rows_written"],
        "rows_labeled": labeled,
        "rows_without_label": dict(reasons) if cfg.on_empty == "null" else {},
        "rows_skipped": total["rows_skipped"],
        "rows_skipped_by_reason": dict(reasons) if cfg.on_empty == "skip" else {},
        "rows_unreadable": total["rows_unreadable"],
        "truncated": total["truncated"],
        "tokens": total["tokens"],
        "label_counts": {n: labels.get(n, 0) for n in plan.label_names},
        "label_distribution": {n: round(labels.get(n, 0) / labeled, 6) if labeled else 0.0 for n in plan.label_names},
        "mean_score": round(total["score_sum"] / labeled, 6) if labeled else None,
        "confidence_threshold": cfg.confidence_threshold,
        "low_confidence": total["low_confidence"],
        "drift": drift(plan.meta.get("train_label_distribution"), labels, cfg.drift_threshold),
        "actors": actors,
        "this_run": {"rows": run_rows, "tokens": run_tokens, "seconds": round(seconds["label"], 3)},
        "rows_per_s": round(run_rows / seconds["label"], 1) if seconds["label"] > 0 else None,
        "tokens_per_s": round(run_tokens / seconds["label"], 1) if seconds["label"] > 0 else None,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    d = summary["drift"]
    if d.get("warning"):
        log.warning("label: predicted label distribution is %.3f (total variation) from the training distribution, "
                    "past drift_threshold=%s: the corpus may differ from the training data. predicted=%s train=%s",
                    d["tvd"], cfg.drift_threshold, summary["label_distribution"], d["train"])
    manifest = {**summary, "output_files": [part_name(s["uid"]) for s in units if not s.get("error")]}
    storage.write_text(storage.join(cfg.output, SUMMARY), json.dumps(summary, indent=2))
    storage.write_text(storage.join(cfg.output, SUCCESS), json.dumps(manifest, indent=2))
    missing = ", ".join(f"{k} {v}" for k, v in reasons.items()) or "none"
    log.info("label: finished: %s rows read, %s labeled, %s %s (%s), %s unreadable, %s truncated; %s part file(s) "
             "and %s in %s", f"{total['rows_read']:,}", f"{labeled:,}", f"{sum(reasons.values()):,}",
             "skipped" if cfg.on_empty == "skip" else "without a label", missing, f"{total['rows_unreadable']:,}",
             f"{total['truncated']:,}", len(manifest["output_files"]), SUCCESS, cfg.output)
    return summary


def drift(train: dict | None, predicted: Counter, threshold: float) -> dict:
    """Total-variation distance between the training and predicted label distributions (0 same, 1 disjoint)."""
    if not train:
        return {"tvd": None, "note": "the checkpoint records no train_label_distribution"}
    n_pred = sum(predicted.values())
    if not n_pred:
        return {"tvd": None, "note": "no rows were labeled"}
    n_train = sum(train.values())
    names = set(train) | set(predicted)
    tvd = 0.5 * sum(abs(train.get(k, 0) / n_train - predicted.get(k, 0) / n_pred) for k in names)
    return {"tvd": round(tvd, 6), "threshold": threshold, "warning": tvd > threshold,
            "train": {k: round(v / n_train, 6) for k, v in train.items()}}

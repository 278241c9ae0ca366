"""Bulk labeling: `bertray label --model M --input I --output O`, Parquet in, Parquet out, on Ray Data.

The driver plans before any work: it reads only the Parquet footers, checks every file's columns, and splits each
file into *units* of at most `rows_per_file` rows along its row groups. Each unit then goes, as one row of one
block, through three Ray Data stages, each scaled on the resources it needs:
  1. read_tokenize (CPU tasks): read the unit's rows (only the needed columns), give each row without a usable
     text its reason (null_text, empty_text, invalid_text), tokenize the rest into int32 ids + offsets;
  2. Infer (the actor pool, on GPUs or CPUs; each actor loads the model once): token ids in, probabilities out,
     in the Predictor's length-sorted, token-budgeted passes; the text never reaches it;
  3. build_write (CPU tasks): the output table, written as `part-<unit>.parquet` atomically with the unit's counts
     in the file's metadata; the unit's summary goes back to the driver.
A unit that cannot be read flows through as an "unreadable" summary. A unit whose part file exists is done, so
re-running the same command resumes where a killed run stopped and the output holds every input row exactly once.
`_SUCCESS` (the manifest) is written last: a folder without it is not finished.

Output folder:
    _plan.json              files, row counts, units and the settings that shape the output (a re-run must match)
    part-FFFFF-RRRRRRRRRRRR.parquet   one per unit: file index F, first row R; rows in input order
    _skipped-<unit>.json    a unit whose input could not be read (only with on_bad_file=skip)
    _summary.json, _SUCCESS run summary and manifest, written when every unit is done
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# No bertray.predictor here: it imports torch and the model classes, which only the inference actors use; a fresh
# Ray worker spends seconds importing them.
from bertray import data, modeling, runtime, storage
from bertray.config import ConfigError, LabelConfig
from bertray.metrics import labels_on

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
# Settings that change what the output holds; a re-run with any of them changed is a different job. Not
# on_bad_file: a run stopped by a corrupt page resumes with --skip-bad-files, as its error message suggests (a file
# unreadable at planning changes the plan's files and units anyway).
_PLAN_KEYS = ("model", "text_column", "text_pair_column", "long_text", "id_column", "passthrough", "probabilities", "rows_per_file",
              "max_length",
              "quantize", "backend", "on_empty")


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
    multi_label: bool = False  # a multi-label model: a list of labels per row

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
    # The whole summary is in _summary.json (and _SUCCESS); the terminal gets the lines a person reads.
    print(f"labeled {summary['rows_written']:,} of {summary['rows_read']:,} rows into {cfg.output} in "
          f"{summary['seconds']['total']:.0f} s; label counts {summary.get('label_counts', {})}; "
          f"summary: {storage.join(cfg.output, SUMMARY)}")
    return summary


# --------------------------------------------------------------------------------------------------- planning


def make_plan(cfg: LabelConfig) -> Plan:
    """List and check every input file from its footer (no data read); split files into units."""
    # Checked on the driver, from the config files alone, so a wrong model fails before any actor starts.
    label_names, meta, multi_label = modeling.classifier_labels(cfg.model)
    if meta.get("text_pair") and not cfg.text_pair_column:
        raise ConfigError([f"text_pair_column: {cfg.model} was trained on sentence pairs; name the column of each "
                           "pair's second text (--text-pair-column)"], "label")
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
    schema = _output_schema(cfg, label_names, good, multi_label)
    plan_files, units = [], []
    cap = unit_rows(sum(sum(f[1]) for _, f in good), cfg.rows_per_file)
    for index, (path, (file_schema, rg_rows, size)) in enumerate(good):
        plan_files.append({"path": path, "size": size, "rows": sum(rg_rows), "row_groups": len(rg_rows)})
        units.extend(Unit(f"{index:05d}-{start:012d}", path, start, stop)
                     for start, stop in split_rows(rg_rows, cap))
    return Plan(plan_files, skipped, units, schema, label_names, meta, multi_label)


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


def _check_output_location(cfg: LabelConfig, files: list[str]) -> None:
    import pyarrow.fs as pafs

    fs, out_path = storage.filesystem(cfg.output)
    if fs.get_file_info(out_path).type == pafs.FileType.File:
        raise ConfigError([f"output: {cfg.output!r} is a file; give a folder (new, or one an earlier label run "
                           "wrote)"], "label")
    out = out_path.rstrip("/") + "/"
    inside = [f for f in files if storage.filesystem(f)[1].startswith(out)]
    if inside:
        raise ConfigError([f"output: {cfg.output!r} holds input files (e.g. {inside[0]}); a re-run would label "
                           "its own output. Choose an output folder outside the input"], "label")
    # The other way round: part files written inside the input folder would be read as input by the next run.
    in_path = storage.filesystem(cfg.input)[1].rstrip("/")
    if storage.is_dir(cfg.input) and out.startswith(in_path + "/"):
        raise ConfigError([f"output: {cfg.output!r} is inside the input folder {cfg.input!r}; its part files would "
                           "be read as input by the next run. Choose an output folder outside the input"], "label")


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
    for column, flag in ((cfg.text_column, "--text-column"), (cfg.text_pair_column, "--text-pair-column")):
        if column is None:
            continue
        if column not in names:
            problems.append(f"{path}: no text column {column!r}; the file has: {_describe(schema)}. Set {flag}")
        elif not _is_text(schema.field(column).type):
            problems.append(f"{path}: text column {column!r} has type {schema.field(column).type}, "
                            f"expected strings; the file has: {_describe(schema)}")
    if cfg.id_column and cfg.id_column not in names:
        problems.append(f"{path}: no id column {cfg.id_column!r}; the file has: {_describe(schema)}. Set "
                        "--id-column, or --id-column none to keep source_file/source_row instead")
    missing = [c for c in cfg.passthrough if c not in names]
    if missing:
        problems.append(f"{path}: no passthrough column(s) {', '.join(map(repr, missing))}; the file has: "
                        f"{_describe(schema)}")
    return problems


def _output_columns(cfg: LabelConfig, label_names: list[str], multi_label: bool = False) -> list[tuple[str, pa.DataType]]:
    if multi_label:  # every label at or over its threshold, most probable first, and their probabilities
        cols = [("labels", pa.list_(pa.string())), ("scores", pa.list_(pa.float32()))]
    else:
        cols = [("label", pa.string()), ("label_id", pa.int32()), ("score", pa.float32())]
    if cfg.probabilities:
        cols += [(f"prob_{n}", pa.float32()) for n in label_names]
    if cfg.on_empty == "null":
        cols.append(("reason", pa.string()))  # why label is null: null_text / empty_text
    return cols


def _output_schema(cfg: LabelConfig, label_names: list[str], good: list, multi_label: bool = False) -> pa.Schema:
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
    out = _output_columns(cfg, label_names, multi_label)
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


def _task_resources(cfg: LabelConfig, actors: int, resources: dict) -> tuple[float, int]:
    """(Ray CPUs each read+tokenize or build+write task reserves, tasks of each stage at once).

    The tasks share the CPUs the actors leave free. CPU actors fill the cluster by default, and a task that reserves
    a CPU would then never start; there the model is nearly all the work, so the tasks run beside the actors
    without a reservation, one per actor per stage at a time."""
    free = resources.get("CPU", 0) - actors * cfg.cpus_per_actor
    if free >= cfg.cpus_per_task:
        return cfg.cpus_per_task, max(1, int(free // cfg.cpus_per_task))
    return 0.0, actors


def _execute(cfg: LabelConfig, plan: Plan, pending: list[Unit], actors: int, earlier: dict) -> dict[str, dict]:
    """Label the pending units through three Ray Data stages; stream their summaries back and report progress."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # our progress lines below say units/rows/throughput; the bars only repeat it
    runtime.quiet_ray_data()  # the pipeline's own start/plan/end lines likewise
    task_cpus, tasks = _task_resources(cfg, actors, ray.cluster_resources())
    cpu_stage = dict(batch_size=1, batch_format="pyarrow", num_cpus=task_cpus,
                     compute=ray.data.TaskPoolStrategy(size=min(tasks, len(pending))))
    try:
        # One block per unit, and batch_size=1 in every stage: a unit is never split or merged, and units spread
        # over the tasks and actors instead of one of them taking them all.
        ds = ray.data.from_items([dataclasses.asdict(u) for u in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(read_tokenize, fn_kwargs={"cfg": cfg, "schema": plan.schema}, **cpu_stage)
        ds = ds.map_batches(
            Infer, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
            fn_constructor_kwargs={"cfg": cfg, "label_names": plan.label_names})
        thresholds = _thresholds(plan) if plan.multi_label else None
        ds = ds.map_batches(build_write, fn_kwargs={"cfg": cfg, "schema": plan.schema, "label_names": plan.label_names,
                                                    "thresholds": thresholds}, **cpu_stage)
        return _collect(cfg, ds.iter_rows(), pending, plan, earlier)
    finally:
        ctx.enable_progress_bars = bars


def _thresholds(plan: Plan) -> list[float]:
    """A multi-label model's decision threshold per label, as its Predictor applies them."""
    return modeling.thresholds(plan.meta, plan.label_names).tolist()


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


def _units(batch: pa.Table) -> list[Unit]:
    cols = batch.select(["uid", "path", "start", "stop"]).to_pylist()
    return [Unit(r["uid"], r["path"], r["start"], r["stop"]) for r in cols]


def _one(values: pa.Array | pa.ChunkedArray) -> pa.LargeListArray:
    """`values` as one list: a unit's rows travel as a single row of a block, so Ray Data never splits a unit."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return pa.LargeListArray.from_arrays(pa.array([0, len(values)], pa.int64()), values)


def _kept(cfg: LabelConfig, schema: pa.Schema) -> list[pa.Field]:
    """The input columns copied to the output (id and passthrough), with their output types."""
    wanted = ([cfg.id_column] if cfg.id_column else []) + list(cfg.passthrough)
    return [f for f in schema if f.name in wanted]


# ---- stage 1: read + tokenize (CPU tasks)


@functools.cache
def _encoder(model: str, max_length: int | None, long_text: str | None = None) -> tuple[Any, int, str, Any]:
    """(tokenizer, max_length, truncation, chunking) as the model's Predictor encodes, loaded once per worker process
    and without the weights, which a tokenize task has no use for."""
    enc = modeling.encoding(model, max_length, long_text, tokenize_only=True)
    return enc.tokenizer, enc.max_length, enc.truncation, enc.chunking


def reason(text) -> str | None:
    """Why a text gets no label (null_text, empty_text, invalid_text), or None: it is labeled."""
    if text is None:
        return "null_text"
    if text is data.INVALID_TEXT or data.invalid_text(text):  # bytes not UTF-8, or a lone surrogate
        return "invalid_text"
    return None if text.strip() else "empty_text"


def encode_texts(texts: list, encoder: tuple[Any, int, str, Any],
                 pairs: list | None = None) -> tuple[list, np.ndarray, np.ndarray, int, np.ndarray]:
    """Each text's reason, and the token ids of the texts that have none, as one int32 array and offsets
    (sequence i is ids[offsets[i]:offsets[i + 1]]): half the bytes of int64 ids, a ninth of a list of Python ints.
    Also how many texts were cut at max_length, and how many windows each text has (1 unless chunking, where a
    long text is several sequences). With `pairs`, a row needs both texts, encoded as one pair."""
    tokenizer, max_length, truncation, chunking = encoder
    reasons = [reason(t) for t in texts]
    if pairs is not None:
        reasons = [r or reason(p) for r, p in zip(reasons, pairs)]
    good = [t for t, r in zip(texts, reasons) if r is None]
    if not good:
        return reasons, np.zeros(0, np.int32), np.zeros(1, np.int64), 0, np.zeros(0, np.int64)
    good_pairs = [p for p, r in zip(pairs, reasons) if r is None] if pairs is not None else None
    ids, cut, windows = modeling.tokenize(tokenizer, good, max_length, truncation, chunking[0] if chunking else None,
                                          good_pairs)
    if windows is None:
        windows = np.ones(len(ids), np.int64)
    packed = modeling.TokenIds.from_lists(ids)
    return reasons, packed.values, packed.offsets, cut, windows


def read_tokenize(batch: pa.Table, cfg: LabelConfig, schema: pa.Schema) -> pa.Table:
    """Stage 1: read each unit's rows (only the needed columns) and tokenize its texts. The text goes no further:
    the row that leaves holds the unit, its token ids, the id/passthrough values and each row's reason."""
    return pa.concat_tables([_read_tokenize_unit(u, cfg, schema) for u in _units(batch)])


def _read_tokenize_unit(unit: Unit, cfg: LabelConfig, schema: pa.Schema) -> pa.Table:
    t0 = time.time()
    encoder = _encoder(cfg.model, cfg.max_length, cfg.long_text)
    kept = _kept(cfg, schema)
    columns: dict[str, list] = {f.name: [] for f in kept}
    reasons: list[str | None] = []
    flats, offsets, windows, truncated, at, tokens = [], [np.zeros(1, np.int64)], [np.zeros(0, np.int64)], 0, 0, 0
    try:
        pair = [cfg.text_pair_column] if cfg.text_pair_column else []
        for batch in _read_unit(unit, list(dict.fromkeys([cfg.text_column, *pair, *columns]))):
            for f in kept:
                columns[f.name].append(batch.column(f.name).cast(f.type))
            pairs = data.strings(batch.column(cfg.text_pair_column)) if pair else None
            r, flat, off, cut, win = encode_texts(data.strings(batch.column(cfg.text_column)), encoder, pairs)
            reasons += r
            windows.append(win)
            flats.append(flat)
            offsets.append(off[1:] + tokens)
            tokens += len(flat)
            truncated += cut
            at += batch.num_rows
        if at != unit.stop - unit.start:
            raise OSError(f"expected {unit.stop - unit.start} rows in {unit.start}-{unit.stop}, read {at}")
    except (pa.ArrowInvalid, OSError) as exc:  # corrupt pages behind a good footer, vanished file, ...
        error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _tokens_row(unit, cfg, kept, {f.name: [] for f in kept}, [], [np.zeros(0, np.int32)],
                           [np.zeros(1, np.int64)], [np.zeros(0, np.int64)], encoder, 0, t0, error)
    return _tokens_row(unit, cfg, kept, columns, reasons, flats, offsets, windows, encoder, truncated, t0, None)


def _read_unit(unit: Unit, columns: list[str]):
    """The unit's rows as record batches of at most CHUNK_ROWS rows."""
    fs, p = storage.filesystem(unit.path)
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        groups, pos = _row_groups(pf.metadata, unit.start, unit.stop)
        for batch in pf.iter_batches(batch_size=CHUNK_ROWS, row_groups=groups, columns=columns):
            lo, hi = max(unit.start - pos, 0), min(unit.stop - pos, batch.num_rows)
            pos += batch.num_rows
            if hi > lo:
                yield batch.slice(lo, hi - lo)


def _tokens_row(unit: Unit, cfg: LabelConfig, kept: list[pa.Field], columns: dict, reasons: list, flats: list,
                offsets: list, windows: list, encoder: tuple, truncated: int, t0: float, error: str | None) -> pa.Table:
    flat = np.concatenate(flats)
    row = {"uid": [unit.uid], "path": [unit.path], "start": [unit.start], "stop": [unit.stop], "error": [error],
           "ids": _one(pa.array(flat, pa.int32())), "offsets": _one(pa.array(np.concatenate(offsets), pa.int64())),
           "reasons": _one(pa.array(reasons, pa.string())), "tokens": [len(flat)], "truncated": [truncated],
           "windows": _one(pa.array(np.concatenate(windows), pa.int64())),
           "rows_chunked": [int((np.concatenate(windows) > 1).sum())],
           "max_length": [encoder[1]], "truncation": [encoder[2]], "chunking": [json.dumps(encoder[3])],
           "seconds_tokenize": [time.time() - t0]}
    for f in kept:  # "keep:" keeps them apart from the columns above, whatever the input names them
        values = pa.concat_arrays(columns[f.name]) if columns[f.name] else pa.array([], f.type)
        row[f"keep:{f.name}"] = _one(values)
    return pa.table(row)


# ---- stage 2: inference (the actor pool)


class Infer:
    """Stage 2, one inference actor: loads the model once, then turns each unit's token ids into class
    probabilities. It never sees the texts and never tokenizes."""

    def __init__(self, cfg: LabelConfig, label_names: list[str]):
        import torch

        from bertray.predictor import Predictor

        # Ray gives the actor `cpus_per_actor` CPUs; match torch's threads so actors don't oversubscribe cores.
        torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.cfg = cfg
        self.predictor = Predictor(cfg.model, device="cuda" if cfg.gpus_per_actor else "cpu",
                                   quantize=cfg.quantize, backend=cfg.backend, long_text=cfg.long_text,
                                   max_length=cfg.max_length, token_budget=cfg.token_budget)
        if self.predictor.label_names != label_names:
            raise modeling.ModelError(f"{cfg.model}: labels changed since planning: {self.predictor.label_names} "
                                      f"vs {label_names}")

    def __call__(self, batch: pa.Table) -> pa.Table:
        probs, seconds = [], []
        pred = self.predictor
        for i in range(batch.num_rows):
            t0 = time.time()
            settings = (batch.column("max_length")[i].as_py(), batch.column("truncation")[i].as_py(),
                        batch.column("chunking")[i].as_py())
            if settings != (pred.max_length, pred.truncation, json.dumps(pred.chunking)):
                raise modeling.ModelError(
                    f"{self.cfg.model}: unit tokenized with max_length, truncation, chunking {settings}, "
                    f"but the model runs with {(pred.max_length, pred.truncation, pred.chunking)}")
            flat = batch.column("ids")[i].values.to_numpy(zero_copy_only=False)
            offsets = batch.column("offsets")[i].values.to_numpy(zero_copy_only=False)
            windows = batch.column("windows")[i].values.to_numpy(zero_copy_only=False)
            probs.append(_one(pa.array(self.predict(flat, offsets, windows).ravel(), pa.float32())))
            seconds.append(time.time() - t0)
        # The ids are spent: only the probabilities travel on to the writer.
        return (batch.drop_columns(["ids", "offsets", "windows"]).append_column("probs", pa.chunked_array(probs))
                .append_column("seconds_predict", pa.array(seconds, pa.float64())))

    def predict(self, flat: np.ndarray, offsets: np.ndarray, windows: np.ndarray | None = None) -> np.ndarray:
        """(texts, classes) probabilities, CHUNK_ROWS texts at a time: predict_ids takes Python lists of ids.
        `windows`: how many sequences each text has (more than one where a long text was chunked)."""
        ids = modeling.TokenIds(flat, offsets)
        windows = np.ones(len(ids), np.int64) if windows is None else windows
        first = np.concatenate([[0], np.cumsum(windows)]).astype(np.int64)  # text t's sequences: first[t]..first[t+1]
        chunked = bool((windows != 1).any())
        out = np.zeros((len(windows), len(self.predictor.label_names)), np.float32)
        for lo in range(0, len(windows), CHUNK_ROWS):
            hi = min(lo + CHUNK_ROWS, len(windows))
            seqs = [ids[i].tolist() for i in range(first[lo], first[hi])]
            out[lo:hi] = self.predictor.predict_ids(seqs, pairs=self.cfg.text_pair_column is not None,
                                                    windows=windows[lo:hi] if chunked else None)
        return out


# ---- stage 3: build + write (CPU tasks)


def build_write(batch: pa.Table, cfg: LabelConfig, schema: pa.Schema, label_names: list[str],
                thresholds: list[float] | None = None) -> pa.Table:
    """Stage 3: build each unit's output table and write `part-<unit>.parquet` atomically, the unit summary in its
    metadata; returns the summaries (JSON) the driver collects. `thresholds`: a multi-label model's, per label."""
    summaries = []
    for i, unit in enumerate(_units(batch)):
        t0 = time.time()
        error = batch.column("error")[i].as_py()
        if error:
            summaries.append(json.dumps(_unreadable(cfg, unit, error)))
            continue
        reasons = batch.column("reasons")[i].values.to_pylist()
        kept = {f.name: batch.column(f"keep:{f.name}")[i].values for f in _kept(cfg, schema)}
        good = np.array([r is None for r in reasons], dtype=bool)
        probs = np.full((len(reasons), len(label_names)), np.nan, dtype=np.float32)
        probs[good] = batch.column("probs")[i].values.to_numpy(zero_copy_only=False).reshape(-1, len(label_names))
        table, counts = _table(cfg, schema, label_names, unit, kept, probs, reasons, thresholds)
        stats = {"rows_read": len(reasons), "tokens": batch.column("tokens")[i].as_py(),
                 "truncated": batch.column("truncated")[i].as_py(),
                 "rows_chunked": batch.column("rows_chunked")[i].as_py(), **counts, "uid": unit.uid, "path": unit.path,
                 "start": unit.start, "stop": unit.stop,
                 # seconds: the inference actor's time on the unit; the CPU stages' times beside it
                 "seconds": round(batch.column("seconds_predict")[i].as_py(), 3),
                 "seconds_tokenize": round(batch.column("seconds_tokenize")[i].as_py(), 3)}
        assert stats["rows_read"] == stats["rows_written"] + stats["rows_skipped"] == unit.stop - unit.start, stats
        buf = pa.BufferOutputStream()
        stats["seconds_write"] = round(time.time() - t0, 3)
        pq.write_table(table.replace_schema_metadata({UNIT_META: json.dumps(stats).encode()}), buf)
        # storage.write_bytes renames a temp file locally and PUTs once on S3, so a part file is whole or absent.
        storage.write_bytes(storage.join(cfg.output, part_name(unit.uid)), buf.getvalue().to_pybytes())
        summaries.append(json.dumps(stats))
    return pa.table({"summary": pa.array(summaries, pa.string())})


def _unreadable(cfg: LabelConfig, unit: Unit, reason: str) -> dict:
    stats = {"uid": unit.uid, "path": unit.path, "start": unit.start, "stop": unit.stop, "error": reason,
             "rows_read": 0, "rows_written": 0, "rows_skipped": 0, "rows_unreadable": unit.stop - unit.start,
             "tokens": 0, "truncated": 0, "label_counts": {}, "reasons": {}, "score_sum": 0.0,
             "low_confidence": 0, "seconds": 0.0}
    if cfg.on_bad_file == "skip":
        storage.write_text(storage.join(cfg.output, f"_skipped-{unit.uid}.json"), json.dumps(stats))
    return stats


def _table(cfg: LabelConfig, schema: pa.Schema, names: list[str], unit: Unit, kept: dict[str, pa.Array],
           probs: np.ndarray, reasons: list, thresholds: list[float] | None = None) -> tuple[pa.Table, dict]:
    n = len(reasons)
    has = np.array([r is None for r in reasons], dtype=bool)
    top = np.where(has, np.nan_to_num(probs, nan=0.0).argmax(axis=1), 0)
    score = np.where(has, np.nan_to_num(probs, nan=0.0).max(axis=1), 0.0).astype(np.float32)
    cols: dict[str, pa.Array] = dict(kept)
    if not cfg.id_column:
        cols["source_file"] = pa.array([unit.path] * n, pa.string())
        cols["source_row"] = pa.array(np.arange(unit.start, unit.stop, dtype=np.int64))
    mask = ~has  # pyarrow masks mark nulls
    if thresholds is not None:
        label_counts = _multi_label_columns(cols, names, np.nan_to_num(probs, nan=0.0), has, thresholds)
    else:
        cols["label"] = pa.array([names[k] if h else None for k, h in zip(top, has)], pa.string())
        cols["label_id"] = pa.array(top.astype(np.int32), mask=mask)
        cols["score"] = pa.array(score, mask=mask)
        label_counts = {names[k]: int(c) for k, c in zip(*np.unique(top[has], return_counts=True))}
    if cfg.probabilities:
        for k, name in enumerate(names):
            cols[f"prob_{name}"] = pa.array(probs[:, k], mask=mask)
    if cfg.on_empty == "null":
        cols["reason"] = pa.array(reasons, pa.string())
    table = pa.table([cols[f.name] for f in schema], schema=schema)
    reason_counts = Counter(r for r in reasons if r)
    skipped = 0
    if cfg.on_empty == "skip":
        table = table.filter(pa.array(has))
        skipped = int(mask.sum())
    counts = {
        "rows_written": table.num_rows,
        "rows_skipped": skipped,
        "reasons": dict(reason_counts),
        "rows_labeled": int(has.sum()),
        "label_counts": label_counts,
        "score_sum": float(score[has].sum()),
        "low_confidence": int((score[has] < cfg.confidence_threshold).sum()),
    }
    return table, counts


def _multi_label_columns(cols: dict, names: list[str], probs: np.ndarray, has: np.ndarray,
                         thresholds: list[float]) -> dict:
    """`labels` and `scores` list columns: each row's labels at or over their thresholds, most probable first (an
    empty list where none is; null where the row has no text). Returns the rows per label."""
    order, chosen = labels_on(probs, np.asarray(thresholds, dtype=np.float32))
    chosen &= has[:, None]
    offsets = pa.array(np.concatenate([[0], np.cumsum(chosen.sum(axis=1))]).astype(np.int32))
    nulls = pa.array(~has)
    values = pa.array(np.asarray(names, dtype=object)[order[chosen]], pa.string())
    cols["labels"] = pa.ListArray.from_arrays(offsets, values, mask=nulls)
    cols["scores"] = pa.ListArray.from_arrays(
        offsets, pa.array(np.take_along_axis(probs, order, axis=1)[chosen], pa.float32()), mask=nulls)
    return {names[k]: int(c) for k, c in enumerate(np.bincount(order[chosen], minlength=len(names))) if c}


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
        total["rows_chunked"] += s.get("rows_chunked", 0)
        labels.update(s["label_counts"])
        reasons.update(s["reasons"])
        # Units written before rows_labeled was counted: one label per labeled row.
        total["rows_labeled"] += s.get("rows_labeled", sum(s["label_counts"].values()))
    planned = sum(u.stop - u.start for u in plan.units)
    # Counts in = counts out: every planned row was read or reported unreadable, and every read row is written or
    # counted as skipped. A mismatch means lost rows; refuse to mark the job finished.
    if total["rows_read"] + total["rows_unreadable"] != planned or \
            total["rows_read"] != total["rows_written"] + total["rows_skipped"]:
        raise RuntimeError(f"label: row counts do not add up (planned {planned}, {dict(total)}); "
                           f"{SUCCESS} not written")
    labeled = total["rows_labeled"]
    run_rows = sum(s["rows_read"] for s in this_run)
    run_tokens = sum(s["tokens"] for s in this_run)
    bad_units = [{"path": s["path"], "rows": f"{s['start']}-{s['stop']}", "reason": s["error"]}
                 for s in units if s.get("error")]
    summary = {
        "output": cfg.output,
        "model": cfg.model,
        "quantize": cfg.quantize,
        "backend": cfg.backend,
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
        # long_text chunk: rows longer than one window, each scored as several windows pooled (tokens count them all)
        "rows_chunked": total["rows_chunked"],
        "tokens": total["tokens"],
        "label_counts": {n: labels.get(n, 0) for n in plan.label_names},
        # Multi-label: each label's share of the labeled rows (they add up to the mean labels per row, not 1).
        "label_distribution": {n: round(labels.get(n, 0) / labeled, 6) if labeled else 0.0 for n in plan.label_names},
        "mean_score": round(total["score_sum"] / labeled, 6) if labeled else None,
        "confidence_threshold": cfg.confidence_threshold,
        "low_confidence": total["low_confidence"],
        "drift": (rate_drift(plan.meta.get("train_label_distribution"), labels, labeled, cfg.drift_threshold)
                  if plan.multi_label else drift(plan.meta.get("train_label_distribution"), labels, cfg.drift_threshold)),
        "actors": actors,
        "this_run": {"rows": run_rows, "tokens": run_tokens, "seconds": round(seconds["label"], 3)},
        "rows_per_s": round(run_rows / seconds["label"], 1) if seconds["label"] > 0 else None,
        "tokens_per_s": round(run_tokens / seconds["label"], 1) if seconds["label"] > 0 else None,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    d = summary["drift"]
    if d.get("warning") and plan.multi_label:
        log.warning("label: label %r is predicted for %.1f%% of rows against %.1f%% in training, past "
                    "drift_threshold=%s: the corpus may differ from the training data", d["label"],
                    100 * d["predicted_rate"], 100 * d["train_rate"], cfg.drift_threshold)
    elif d.get("warning"):
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


def rate_drift(train: dict | None, predicted: Counter, labeled: int, threshold: float) -> dict:
    """Multi-label: the largest change in one label's rate (share of rows carrying it) between training and the
    predictions; the labels are not one distribution, so no total variation."""
    if not train:
        return {"max_rate_change": None, "note": "the checkpoint records no train_label_distribution"}
    if not labeled:
        return {"max_rate_change": None, "note": "no rows were labeled"}
    changes = {k: predicted.get(k, 0) / labeled - train.get(k, 0.0) for k in set(train) | set(predicted)}
    worst = max(sorted(changes), key=lambda k: abs(changes[k]))
    return {"max_rate_change": round(abs(changes[worst]), 6), "label": worst, "threshold": threshold,
            "warning": abs(changes[worst]) > threshold, "train_rate": round(train.get(worst, 0.0), 6),
            "predicted_rate": round(predicted.get(worst, 0) / labeled, 6),
            "train": {k: round(v, 6) for k, v in train.items()}}

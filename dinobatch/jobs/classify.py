"""The classify job: under the output's lock, list -> fingerprint -> decode+infer what is new -> group ->
rows -> summary. The stages (dinobatch.stages) do the work, an engine schedules them; the job owns the
lock, the run id, the content cache and file index (and their commit order) and the summary."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dinobatch import __version__
from dinobatch.config import ClassifyConfig
from dinobatch.engines import Engine, Progress, open_engine
from dinobatch.errors import OutputError
from dinobatch.imaging import decode_budget
from dinobatch.io.lock import exclusive
from dinobatch.io.walk import check_folder, walk_table
from dinobatch.jobs import unchanged
from dinobatch.models.file import (
    LoadedModel,
    imagenet_weights_member,
    imagenet_weights_name,
    model_file_fingerprint,
    resolve_model,
)
from dinobatch.runtime import faults
from dinobatch.runtime.device import Runtime, default_batch_size, resolve_runtime
from dinobatch.runtime.memory import release_memory, retuned, tune_process, untuned_process
from dinobatch.schema import Col, cache_schema, file_index_schema, row_schema, schema_metadata
from dinobatch.stages.decode import Contents
from dinobatch.stages.group import duplicates
from dinobatch.stages.infer import Predictor
from dinobatch.stages.rows import FileOutcomes, RowContext, RowStats, file_errors, path_order, row_batches, row_stats
from dinobatch.store.results import ResultsDir
from dinobatch.store.species import default_species_csv, load_species

__all__ = ["classify", "RunSummary", "Progress"]

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What a run did, as written to _summary.json and printed by the CLI."""

    run_id: str
    rows_file: str
    files: int
    counts: dict[str, int]
    inferred: int
    reused: int
    duplicate_groups: int
    seconds: float
    images_per_second: float | None
    model: dict[str, Any]
    runtime: str
    config: dict[str, Any]
    process: dict[str, Any]  # process-wide speed settings applied (allocator, threads, layout)
    started: str
    finished: str
    version: str = __version__
    errors: list[dict[str, str]] = field(default_factory=list)  # the first few, for a quick look
    warnings: list[str] = field(default_factory=list)  # optional steps after the commit that failed

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def new_run_id(now: datetime) -> str:
    """Run id that sorts in start order (microseconds) and stays unique (random suffix)."""
    return now.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)


def classify(cfg: ClassifyConfig, progress: Progress | None = None) -> RunSummary:
    """Run the classify job over cfg.folder and write its rows and summary under cfg.out."""
    t0 = time.monotonic()
    # absolute paths in the saved configuration: curate --html and export run from other folders
    cfg = dataclasses.replace(cfg, folder=check_folder(cfg.folder), out=os.path.abspath(cfg.out))
    decode_budget.from_env()  # a bad DINOBATCH_DECODE_MEMORY is refused now, not after the folder is hashed
    out = ResultsDir(cfg.out)
    out.ensure()
    # the lock first: a run that finds the output in use exits 9 at once, before torch and the model load
    with exclusive(out.path / ".lock", wait=cfg.wait):
        hashed_at = time.time_ns()  # before any file (the model too) is statted or read: see write_file_index
        files = walk_table(cfg.folder, exclude=cfg.out)  # one walk, whichever path the run takes
        if not files.num_rows:  # before the model: offline, torchvision's weights may not be fetchable
            return _classify_empty(cfg, out, files, t0=t0, hashed_at=hashed_at)
        found = unchanged.find(cfg, out, files)
        if found is not None:  # nothing to infer: the rows come from the cache, torch is never imported
            return _rerun_unchanged(cfg, out, found, t0=t0, hashed_at=hashed_at)
        model_stat = unchanged.model_stat(cfg.model)  # before it is read: indexed only if it held still
        runtime = resolve_runtime(cfg.device, cfg.precision)
        process = tune_process(runtime)  # before the model allocates: the allocator settings apply from here
        model = resolve_model(cfg.model)
        tuned, runtime = runtime, runtime.for_model(model.spec.precision, cfg.precision)  # an int8 file: CPU, int8
        process = retuned(process, tuned, runtime)  # the precision that runs, and why (an int8 file: int8)
        model_row = unchanged.model_seen(model_stat, unchanged.model_stat(cfg.model), model.fingerprint)
        species = load_species(cfg.species if cfg.species else default_species_csv())
        started = _start_time(out)
        out.remove_leftovers()
        metadata = schema_metadata(version=__version__, model_name=model.name, model_fingerprint=model.fingerprint,
                                   labels=list(model.spec.labels), folder=cfg.folder)
        with open_engine(cfg, runtime, model, progress=progress) as engine:  # the Ray engine: joined for the run
            run = _Run(cfg=cfg, out=out, run_id=new_run_id(started), t0=t0, started=started, runtime=runtime,
                       model=model, species=species, process=process, metadata=metadata, engine=engine,
                       hashed_at=hashed_at, model_row=model_row)
            return _classify_locked(run, files)


def _start_time(out: ResultsDir) -> datetime:
    """The run's start, under the lock and after every earlier run's, so that 'newest run' is the run
    that scanned last, even after a --wait or a clock stepped back."""
    return max(datetime.now(timezone.utc), out.newest_run_time() + timedelta(microseconds=1))


def _classify_empty(cfg: ClassifyConfig, out: ResultsDir, files: pa.Table, *, t0: float,
                    hashed_at: int) -> RunSummary:
    """A folder with nothing to classify (a quiet night in cron, or a newcomer's first run): the rows file (no
    rows), summary and file index any run writes, with the model named but neither loaded nor fetched."""
    log.info("no files to classify under %s (names starting with '.', such as .gitkeep, are skipped): "
             "put the images there, in any sub-folders, and run again", cfg.folder)
    model, model_row = _unloaded_model(cfg.model)
    _check_asked_runtime(cfg)
    shas = pa.chunked_array([], pa.string())
    written = _write_cached_rows(cfg, out, files, shas, files[Col.ERROR], cache_schema().empty_table(),
                                 model_name=model["name"], fingerprint=model["fingerprint"] or "", labels=[])
    summary = RunSummary(
        run_id=written.run_id, rows_file=str(written.rows_file), files=0, counts=written.stats.counts, inferred=0,
        reused=0, duplicate_groups=0, seconds=round(time.monotonic() - t0, 3), images_per_second=None,
        model=model, runtime=NO_RUNTIME, config=cfg.to_dict(), process=untuned_process(_EMPTY),
        started=written.started.isoformat(), finished=datetime.now(timezone.utc).isoformat())
    return _record(out, summary, _seen(files, shas, model_row), hashed_at, written.metadata)


@dataclass(frozen=True)
class _Written:
    """A rows file written without inference, and what its summary and record need."""

    run_id: str
    started: datetime
    rows_file: Path
    stats: RowStats
    metadata: dict[bytes, bytes]


def _write_cached_rows(cfg: ClassifyConfig, out: ResultsDir, files: pa.Table, shas: pa.ChunkedArray,
                       errors: pa.ChunkedArray, content: pa.Table, *, model_name: str, fingerprint: str,
                       labels: list[str]) -> _Written:
    """The rows of a run that infers nothing (a folder with nothing to classify, an unchanged rerun): every
    file's row from content, the cache's predictions, under a run id taken as any run takes it."""
    species = load_species(cfg.species if cfg.species else default_species_csv())
    started = _start_time(out)
    out.remove_leftovers()
    run_id = new_run_id(started)
    metadata = schema_metadata(version=__version__, model_name=model_name, model_fingerprint=fingerprint,
                               labels=labels, folder=cfg.folder)
    ctx = RowContext(run_id=run_id, model_name=model_name, model_fingerprint=fingerprint, labels=labels,
                     top_k=cfg.top_k, embeddings=cfg.embeddings, species=species)
    outcomes = _outcomes(cfg, files, shas, errors, _Inferred({}, set(), 0.0, None), content)
    stats = row_stats(outcomes)
    rows_file = out.write_rows(run_id, row_batches(outcomes, content, ctx), row_schema(metadata))
    return _Written(run_id, started, rows_file, stats, metadata)


# A run that loads no model: its summary's runtime, and its saved configuration keeps the device and precision
# as asked (e.g. auto: valid input for a rerun), since nothing was resolved.
NO_RUNTIME = "none: nothing to classify, no model loaded"
# Why a run imported no torch, in its summary's process field (runtime.memory.untuned_process).
_EMPTY = "nothing to classify"
_UNCHANGED = "an unchanged rerun, every prediction came from the cache"


def _unloaded_model(ref: str) -> tuple[dict[str, Any], pa.Table | None]:
    """The summary's model and the file index's row for a run that loads none: a model file by its name and
    sha256 (read, not loaded: a path that is not a readable file is refused as loading refuses it);
    torchvision's weights by the name asked, with no fingerprint (that of a cached file fetching may need)."""
    weights_name = imagenet_weights_name(ref)
    if weights_name is not None:
        if weights_name != "DEFAULT":  # a name asked for is checked (torchvision's enum), never fetched
            imagenet_weights_member("resnet50", weights_name)
        return {"name": ref, "fingerprint": None, "arch": None, "classes": None}, None
    before = unchanged.model_stat(ref)
    fingerprint = model_file_fingerprint(ref)
    model = {"name": Path(ref).name, "fingerprint": fingerprint, "arch": None, "classes": None}
    return model, unchanged.model_seen(before, unchanged.model_stat(ref), fingerprint)


def _check_asked_runtime(cfg: ClassifyConfig) -> None:
    """A device or precision asked for (not auto) is checked on a night with nothing to classify too, as a
    run with files checks it (exit 5 where it is missing), so a wrong cron line fails the first night, not
    the first night with images; auto, the CPU and fp32 are left unresolved (always there: no torch import on a
    quiet night)."""
    if cfg.device not in ("auto", "cpu") or cfg.precision not in ("auto", "fp32"):
        resolve_runtime(cfg.device, cfg.precision)


def _rerun_unchanged(cfg: ClassifyConfig, out: ResultsDir, found: unchanged.Unchanged, *, t0: float,
                     hashed_at: int) -> RunSummary:
    """The rows, summary and file index the normal path writes when it finds nothing to infer, rebuilt
    from the cache: the model, runtime and resolved configuration are the last run's, which asked the same."""
    model = found.previous["model"]
    written = _write_cached_rows(cfg, out, found.files, found.shas, found.errors, found.content,
                                 model_name=model["name"], fingerprint=model["fingerprint"], labels=found.labels)
    log.info("unchanged rerun: %d files, every prediction from the cache (torch not imported)", found.files.num_rows)
    stats = written.stats
    summary = RunSummary(
        run_id=written.run_id, rows_file=str(written.rows_file), files=found.files.num_rows, counts=stats.counts,
        inferred=0, reused=found.content.num_rows, duplicate_groups=stats.groups,
        seconds=round(time.monotonic() - t0, 3), images_per_second=None, model=model,
        runtime=found.previous["runtime"], config=found.config,
        process=untuned_process(_UNCHANGED, found.previous.get("process")), started=written.started.isoformat(),
        finished=datetime.now(timezone.utc).isoformat(), errors=stats.errors)
    return _record(out, summary, _seen(found.files, found.shas, found.model_row), hashed_at, written.metadata)


def _seen(files: pa.Table, shas: pa.ChunkedArray, model_row: pa.Table | None) -> pa.Table:
    """The file index to save: each hashed file's stat and sha256, and the model file's (when known),
    so that the next run trusts both without reading them."""
    schema = file_index_schema()
    seen = files.select([Col.ABSPATH, Col.BYTES, Col.MTIME_NS, Col.CTIME_NS, Col.INODE]).append_column(Col.SHA256, shas)
    tables = [seen.filter(shas.is_valid())] + ([model_row] if model_row is not None else [])
    return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables])


@dataclass(frozen=True)
class _Run:
    """One run's fixed parts, while this process alone writes to cfg.out."""

    cfg: ClassifyConfig
    out: ResultsDir
    run_id: str
    t0: float  # time.monotonic() at the start, for the summary's seconds
    started: datetime
    runtime: Runtime
    model: LoadedModel
    species: dict[str, dict[str, Any]]
    process: dict[str, Any]  # what tune_process applied
    metadata: dict[bytes, bytes]  # the rows' and cache parts' schema metadata
    engine: Engine
    hashed_at: int  # time.time_ns() before any file was statted: the file index's racy-clean rule
    model_row: pa.Table | None  # the model file's stat and sha256 for the file index (None: not a file)


@dataclass(frozen=True)
class _Inferred:
    """What the decode+infer stages left besides the cache parts they committed."""

    failed: dict[str, str]  # sha256 -> why the content could not be decoded or inferred
    changed: set[str]  # files whose bytes were not their sha256 any more when they were read
    seconds: float
    batch_size: int | None  # None: nothing to infer, so no batch was sized


def _classify_locked(run: _Run, files: pa.Table) -> RunSummary:
    """The run itself over the walked files (an --out inside the folder is not input): fingerprint ->
    decode+infer what is new -> group -> rows -> summary."""
    cfg, out, model = run.cfg, run.out, run.model
    log.info("found %d files under %s", files.num_rows, cfg.folder)
    index = file_index_schema().empty_table() if cfg.force else out.read_file_index()
    shas, errors = run.engine.fingerprint(files, index)
    del index

    cached = pa.array([], pa.string()) if cfg.force else out.cached_shas(model.fingerprint,
                                                                          with_embeddings=cfg.embeddings)
    todo = Contents(files[Col.ABSPATH], shas, cached)
    reused = pc.count_distinct(shas.filter(pc.is_in(shas, value_set=cached))).as_py()
    del cached
    log.info("%d unique contents to decode and infer, %d already have predictions from this model",
             len(todo), reused)
    release_memory()  # here and below: one stage's freed temporaries never add to the next one's peak

    inferred = _infer(run, todo)
    # contents that fail to decode are not cached, so each run counts them again among those to infer
    log.info("inferred %d new contents, %d could not be decoded (rows with status error; tried again next run)",
             len(todo) - len(inferred.failed), len(inferred.failed))
    release_memory()
    failed = pa.array(list(inferred.failed), pa.string())
    wanted = pc.unique(shas.drop_null())
    content = out.read_cache(model.fingerprint, wanted.filter(pc.invert(pc.is_in(wanted, value_set=failed))),
                             with_embeddings=cfg.embeddings)
    release_memory()
    outcomes = _outcomes(cfg, files, shas, errors, inferred, content)
    stats = row_stats(outcomes)
    rows_file = out.write_rows(run.run_id, row_batches(outcomes, content, _row_context(run)),
                               row_schema(run.metadata))
    release_memory()
    n_inferred = len(todo) - len(inferred.failed)
    summary = RunSummary(
        run_id=run.run_id, rows_file=str(rows_file), files=files.num_rows, counts=stats.counts,
        inferred=n_inferred, reused=reused, duplicate_groups=stats.groups,
        seconds=round(time.monotonic() - run.t0, 3),
        images_per_second=round(n_inferred / inferred.seconds, 2) if n_inferred and inferred.seconds > 0 else None,
        model={"name": model.name, "fingerprint": model.fingerprint, "arch": model.spec.arch,
               "classes": len(model.spec.labels)},
        runtime=run.runtime.describe(), config=_resolved_config(run, inferred), process=run.process,
        started=run.started.isoformat(), finished=datetime.now(timezone.utc).isoformat(), errors=stats.errors)
    return _record(out, summary, _seen(files, shas, run.model_row), run.hashed_at, run.metadata)


def _infer(run: _Run, todo: Contents) -> _Inferred:
    """Decode and infer each new content through the engine; commit every batch to the cache as it
    finishes, so that a run killed midway keeps what it had inferred."""
    cfg = run.cfg
    writer = run.out.cache_writer(run.model.fingerprint, run.run_id, run.metadata)
    failed: dict[str, str] = {}
    changed: set[str] = set()
    t = time.monotonic()
    if not todo:
        return _Inferred(failed, changed, time.monotonic() - t, None)
    predictor = Predictor(run.model, run.runtime, batch_size=cfg.batch_size, embeddings=cfg.embeddings,
                          compile=cfg.compile)
    for batch in run.engine.infer(todo, predictor, jpeg_on_device=cfg.gpu_decode and run.runtime.is_cuda):
        writer.write(batch.rows)
        failed.update(batch.failed)
        changed.update(batch.changed)
        faults.point("batch")
    return _Inferred(failed, changed, time.monotonic() - t, predictor.batch_size)


def _outcomes(cfg: ClassifyConfig, files: pa.Table, shas: pa.ChunkedArray, errors: pa.ChunkedArray, inferred: _Inferred,
              content: pa.Table) -> FileOutcomes:
    """Each file's final error, prediction row and duplicate group (the group stage), in path order."""
    failed = pa.table({Col.SHA256: pa.array(list(inferred.failed), pa.string()),
                       Col.ERROR: pa.array(list(inferred.failed.values()), pa.string())})
    changed = pa.array([os.fsencode(p) for p in inferred.changed], pa.binary())
    errors, own = file_errors(shas, errors, abspaths=files[Col.ABSPATH], changed=changed, failed=failed,
                              content=content)
    order = path_order(files)
    groups = duplicates(content, own, order, phash_max=cfg.phash_max, dhash_max=cfg.dhash_max)
    return FileOutcomes(files=files, shas=shas, errors=errors, own=own, groups=groups, order=order)


def _row_context(run: _Run) -> RowContext:
    return RowContext(run_id=run.run_id, model_name=run.model.name, model_fingerprint=run.model.fingerprint,
                      labels=run.model.spec.labels, top_k=run.cfg.top_k, embeddings=run.cfg.embeddings,
                      species=run.species)


def _resolved_config(run: _Run, inferred: _Inferred) -> dict[str, Any]:
    """The configuration as it ran, valid input for a rerun that means the same run: the device and
    precision resolved, the batch size used (with nothing to infer, the rule's where it needs no
    model: on CPU) and what the engine chose (the decode workers; None: a burst pool of every core)."""
    batch_size = inferred.batch_size or run.cfg.batch_size
    if batch_size is None and not run.runtime.is_cuda:
        batch_size = default_batch_size(run.runtime)
    return {**run.cfg.to_dict(), **run.runtime.resolved(), "batch_size": batch_size, **run.engine.resolved()}


def _record(out: ResultsDir, summary: RunSummary, seen: pa.Table, hashed_at: int,
            metadata: dict[bytes, bytes]) -> RunSummary:
    """After the rows file: the run's summary first, then the optional work (file index, cache
    compaction), whose failures are added to the summary as warnings."""
    _write_summary(out, summary)
    summary.warnings = _after_commit(out, seen, hashed_at, summary.model["fingerprint"], summary.run_id, metadata)
    if summary.warnings:  # best effort: the summary written above stands if this cannot be written
        try:
            out.write_summary(summary.run_id, summary.to_dict())
        except OutputError as exc:
            log.warning("_summary.json does not list these warnings: %s", exc)
    return summary


def _write_summary(out: ResultsDir, summary: RunSummary) -> None:
    """Record a run whose rows file is committed, before any optional work can use up the space;
    when it cannot be written, say exactly what was committed."""
    try:
        out.write_summary(summary.run_id, summary.to_dict())
    except OutputError as exc:
        raise OutputError(f"{exc}. This run's rows were committed ({summary.rows_file}) and are the current "
                          f"rows; _summary.json was removed rather than left describing an earlier run. Free "
                          f"space and rerun to write a summary") from exc


def _after_commit(out: ResultsDir, seen: pa.Table, hashed_at: int, fingerprint: str | None, run_id: str,
                  metadata: dict[bytes, bytes]) -> list[str]:
    """Save the file index and compact the cache, once the run is committed and recorded. Both only
    save later runs work, so a failure (a full disk) is a warning, not a failed run: the old index
    and every cache part are left as they were, and the next run tries again. A run that loaded no model
    (fingerprint None) has no cache to compact."""
    steps = [("the file index was not updated", "the next run hashes again the files it does not list",
              lambda: out.write_file_index(seen, hashed_at)),
             ("the cache was not compacted", "its parts are intact and the next run tries again",
              lambda: out.compact_cache(fingerprint, run_id, metadata) if fingerprint else 0)]
    warnings = []
    for what, consequence, step in steps:
        try:
            step()
        except OutputError as exc:
            warnings.append(f"{what} ({exc}); {consequence}")
            log.warning("%s", warnings[-1])
    return warnings


